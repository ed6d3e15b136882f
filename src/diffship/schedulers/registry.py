"""Finding a scheduler class: by diffusers class name (from a config) or by a short command-line name; and what
kind of model output a scheduler expects (noise prediction or a flow-matching velocity)."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from diffship.errors import DiffshipError

# diffusers class name -> module in this package holding it (one file per algorithm)
_MODULES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms_discrete",
    "EulerDiscreteScheduler": "euler_discrete",
    "EulerAncestralDiscreteScheduler": "euler_ancestral_discrete",
    "HeunDiscreteScheduler": "heun_discrete",
    "KDPM2DiscreteScheduler": "k_dpm_2_discrete",
    "KDPM2AncestralDiscreteScheduler": "k_dpm_2_ancestral_discrete",
    "DPMSolverMultistepScheduler": "dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep",
    "UniPCMultistepScheduler": "unipc_multistep",
    "DEISMultistepScheduler": "deis_multistep",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "FlowMatchEulerDiscreteScheduler": "flow_match_euler_discrete",
    "FlowMatchHeunDiscreteScheduler": "flow_match_heun_discrete",
}

# What the denoiser's output is, which decides the families a scheduler can serve. The two kinds are not
# interchangeable: a noise-prediction scheduler (epsilon, v_prediction or sample, on a variance-preserving
# diffusion: the UNet families) turns a flow model's velocity into garbage, and the other way round.
NOISE = "noise"
FLOW = "flow"
# The flow-matching classes; every other class is NOISE, except the multistep solvers that diffusers lets the flow
# families use when configured for flow (use_flow_sigmas=True, prediction_type="flow_prediction"): see
# scheduler_kind.
FLOW_MATCHING = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

# diffusers schedulers diffship knows of but does not run, and why
UNSUPPORTED = {
    "DPMSolverSDEScheduler": (
        "its noise comes from torchsde's Brownian tree (BrownianTreeNoiseSampler), which has no numpy equivalent "
        "that reproduces diffusers' samples; use DPMSolverMultistepScheduler with "
        "algorithm_type='sde-dpmsolver++' (short name 'dpm++2m-sde') for a stochastic DPM-Solver++ instead"
    ),
}


def _load_all() -> dict[str, type]:
    found = {}
    for class_name, module in _MODULES.items():
        try:
            found[class_name] = getattr(importlib.import_module(f"{__package__}.{module}"), class_name)
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.{module}":
                raise
    return found


SCHEDULERS: dict[str, type] = _load_all()


def scheduler_class(class_name: str) -> type:
    """The scheduler class named `class_name` (a diffusers class name); a DiffshipError if there is none."""
    if class_name in SCHEDULERS:
        return SCHEDULERS[class_name]
    if class_name in UNSUPPORTED:
        raise DiffshipError(f"{class_name} is not supported by diffship: {UNSUPPORTED[class_name]}.")
    raise DiffshipError(
        f"Unknown scheduler class {class_name!r}. Supported: {', '.join(sorted(SCHEDULERS))}. "
        "Pass one of these as class_name, or fix `_class_name` in scheduler_config.json."
    )


def scheduler_from_config(config: Mapping[str, Any], class_name: str | None = None, **kwargs):
    """A scheduler built from `config`, of class `class_name` or else of the class the config names."""
    class_name = class_name or config.get("_class_name")
    if not class_name:
        raise DiffshipError(
            "The scheduler config has no `_class_name`; pass class_name=, one of: " + ", ".join(sorted(SCHEDULERS))
        )
    return scheduler_class(class_name).from_config(config, **kwargs)


def scheduler_kind(scheduler) -> str:
    """NOISE or FLOW: what the model driving `scheduler` (an instance, or a config with `_class_name`) must
    predict. FLOW for the flow-matching classes and for a solver whose prediction_type is "flow_prediction"
    (DPMSolverMultistep / Singlestep, UniPC, DEIS with use_flow_sigmas=True, as diffusers' SD3 / Flux / Sana docs
    configure them); NOISE otherwise."""
    from .config import init_keys

    config = scheduler if isinstance(scheduler, Mapping) else getattr(scheduler, "config", None) or {}
    class_name = config.get("_class_name") if isinstance(scheduler, Mapping) else type(scheduler).__name__
    if class_name in FLOW_MATCHING:
        return FLOW
    cls = SCHEDULERS.get(class_name)
    # a solver that takes flow sigmas, set to predict flow (not a prediction_type carried along unused from
    # another class's config)
    if cls is not None and "use_flow_sigmas" in init_keys(cls) and config.get("prediction_type") == "flow_prediction":
        return FLOW
    return NOISE


def schedulers_for(kind: str) -> list[str]:
    """The class names that can serve a model of `kind`: for FLOW, the flow-matching classes and the solvers that
    take use_flow_sigmas."""
    from .config import init_keys

    if kind == NOISE:
        return [name for name in SCHEDULERS if name not in FLOW_MATCHING]
    if kind == FLOW:
        return [name for name in SCHEDULERS if name in FLOW_MATCHING or "use_flow_sigmas" in init_keys(SCHEDULERS[name])]
    raise ValueError(f"kind must be {NOISE!r} or {FLOW!r}, got {kind!r}")


def check_scheduler_kind(scheduler, kind: str, user: str) -> None:
    """A DiffshipError unless `scheduler` expects a model output of `kind` (what `user`, a pipeline, runs)."""
    found = scheduler_kind(scheduler)
    if found == kind:
        return
    name = type(scheduler).__name__
    if kind == NOISE:
        raise DiffshipError(
            f"{user} runs a noise-prediction model, but {name} "
            + ("is a flow-matching scheduler (for SD3 / Flux)" if name in FLOW_MATCHING
               else "is configured for flow matching (prediction_type='flow_prediction')")
            + f"; use one of {', '.join(n for n in schedulers_for(NOISE))} (e.g. "
            "EulerDiscreteScheduler.from_config(pipe.scheduler.config), or the short names euler, dpm++2m-karras, ...)"
        )
    raise DiffshipError(
        f"{user} runs a flow-matching model (its output is a velocity), but {name} is a noise-prediction "
        "scheduler; use FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler (short names flow-euler, "
        "flow-heun), or DPMSolverMultistepScheduler / UniPCMultistepScheduler with use_flow_sigmas=True and "
        "prediction_type='flow_prediction' (flow-dpm++2m, flow-unipc)"
    )


# Short names (as on the command line and in other UIs) -> (class name, config overrides).
SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun-karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2-a-karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2s-karras": (
        "DPMSolverSinglestepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    # flow matching (SD3, Flux): a flow model's scheduler, never a UNet's (see scheduler_kind)
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    # the solvers configured for a flow model, as diffusers' docs switch SD3 / Flux to them (flow_shift: the base
    # config's shift, see scheduler_by_name)
    "flow-dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "flow-unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}


def normalize_name(name: str) -> str:
    """'Euler_A' -> 'euler-a', 'DPM++ 2M Karras' -> 'dpm++-2m-karras' -> 'dpm++2m-karras'."""
    name = name.strip().lower().replace("_", "-").replace(" ", "-")
    return name.replace("++-", "++")


def scheduler_by_name(name: str, base_config: Mapping[str, Any] | None = None):
    """A scheduler for a short name (see SHORT_NAMES) or a diffusers class name, configured from `base_config`
    (usually the pipeline's own scheduler config, which carries the model's beta schedule and prediction type)."""
    base_config = dict(base_config or {})
    if name in SCHEDULERS or name in UNSUPPORTED:
        return scheduler_class(name).from_config(base_config)
    key = normalize_name(name)
    if key not in SHORT_NAMES:
        raise DiffshipError(
            f"Unknown scheduler name {name!r}. Short names: {', '.join(SHORT_NAMES)}; "
            f"or a class name: {', '.join(sorted(SCHEDULERS))}."
        )
    class_name, overrides = SHORT_NAMES[key]
    cls = scheduler_class(class_name)
    # the short name's own settings win over the base config's (e.g. karras sigmas off in a DPM++ 2M config)
    settings = {
        k: False
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        if k not in overrides and k in base_config
    }
    # a flow model's config names its shift `shift` (FlowMatch*); the solvers call theirs `flow_shift`
    if overrides.get("use_flow_sigmas") and "shift" in base_config and "flow_shift" not in base_config:
        settings["flow_shift"] = base_config["shift"]
    return cls.from_config(base_config, **{**_applicable(cls, settings), **overrides})


def _applicable(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    from .config import init_keys

    keys = init_keys(cls)
    return {k: v for k, v in values.items() if k in keys}
