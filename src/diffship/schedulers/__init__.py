"""numpy schedulers with diffusers' names, configs and numerics; no torch.

`SCHEDULERS` maps diffusers class names to classes; `scheduler_from_config` picks the class from a config's
`_class_name`; `scheduler_by_name` takes the short names of the command line ("euler-a", "dpm++2m-karras", ...);
`scheduler_kind` says whether a scheduler drives a noise-prediction model (NOISE: the UNet families) or a
flow-matching one (FLOW: SD3, Flux), which are not interchangeable.
"""

from __future__ import annotations

from .base import Scheduler
from .config import FrozenConfig
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis_multistep import DEISMultistepScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from .euler_discrete import EulerDiscreteScheduler
from .flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerOutput
from .flow_match_heun_discrete import FlowMatchHeunDiscreteScheduler, FlowMatchHeunDiscreteSchedulerOutput
from .heun_discrete import HeunDiscreteScheduler
from .k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteScheduler
from .k_dpm_2_discrete import KDPM2DiscreteScheduler
from .lcm import LCMScheduler, LCMSchedulerOutput
from .lms_discrete import LMSDiscreteScheduler
from .noise import randn
from .output import SchedulerOutput
from .pndm import PNDMScheduler
from .registry import (
    FLOW,
    NOISE,
    SCHEDULERS,
    SHORT_NAMES,
    UNSUPPORTED,
    check_scheduler_kind,
    scheduler_by_name,
    scheduler_class,
    scheduler_from_config,
    scheduler_kind,
    schedulers_for,
)
from .schedules import calculate_shift, calculate_shift_for, flux_default_sigmas
from .tcd import TCDScheduler, TCDSchedulerOutput
from .unipc_multistep import UniPCMultistepScheduler

__all__ = [
    "FLOW",
    "NOISE",
    "SCHEDULERS",
    "SHORT_NAMES",
    "UNSUPPORTED",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchEulerDiscreteSchedulerOutput",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchHeunDiscreteSchedulerOutput",
    "FrozenConfig",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerOutput",
    "TCDScheduler",
    "TCDSchedulerOutput",
    "UniPCMultistepScheduler",
    "calculate_shift",
    "calculate_shift_for",
    "check_scheduler_kind",
    "flux_default_sigmas",
    "randn",
    "scheduler_by_name",
    "scheduler_class",
    "scheduler_from_config",
    "scheduler_kind",
    "schedulers_for",
]
