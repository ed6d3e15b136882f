"""Whole denoising trajectories, diffship vs diffusers, for every scheduler x option x step count.

See parity.py for the stand-in model, the noise replay, the float type (float32) and the tolerance (1e-5 relative).
"""

from __future__ import annotations

import pytest

from .options import OPTIONS, STEPS
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
    case = Case(class_name, option["config"], steps, option["set_kwargs"], option["step_kwargs"])
    check_case(case)
