"""Whole denoising trajectories, diffship vs diffusers, for every scheduler x option x step count.

See parity.py for the stand-in model, the noise replay, the float type (float32) and the tolerance (1e-5 relative,
plus the computed bound of an ill-conditioned step, bounds.py).
"""

from __future__ import annotations

import pytest

import diffship.schedulers as ds
from diffship.schedulers.config import init_keys

from .options import EXPECTED_REFUSALS, OPTIONS, STEPS
from .parity import Case, check_case

# diffusers' own numpy-2 deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES = [
    pytest.param(class_name, option_name, steps, id=f"{class_name}-{option_name}-{steps}")
    for class_name, options in OPTIONS.items()
    for option_name in options
    for steps in STEPS
]


@pytest.mark.parametrize("class_name, option_name, steps", CASES)
def test_trajectory_matches_diffusers(class_name, option_name, steps):
    option = OPTIONS[class_name][option_name]
    case = Case(
        class_name,
        option["config"],
        steps,
        option["set_kwargs"],
        option["step_kwargs"],
        learned_variance=option["learned_variance"],
    )
    expected = "refused" if steps in EXPECTED_REFUSALS.get((class_name, option_name), ()) else "ok"
    assert check_case(case) == expected


# Config keys no option varies, and why.
NOT_VARIED = {
    "DPMSolverMultistepScheduler": {"variance_type": "'learned*' slices the model output to 3 channels (DeepFloyd IF); latents here have 4"},
    "DPMSolverSinglestepScheduler": {"variance_type": "as for DPMSolverMultistepScheduler"},
}


@pytest.mark.parametrize("class_name", sorted(ds.SCHEDULERS))
def test_every_config_key_is_varied_by_some_option(class_name):
    """Each scheduler is compared with every one of its config keys set away from its default somewhere."""
    assert class_name in OPTIONS
    varied = set().union(*(set(option["config"]) for option in OPTIONS[class_name].values()))
    missing = init_keys(ds.SCHEDULERS[class_name]) - varied - set(NOT_VARIED.get(class_name, {}))
    assert not missing, f"{class_name}: no option sets {sorted(missing)}"
