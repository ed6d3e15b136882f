"""numpy schedulers with diffusers' names, configs and numerics; no torch.

`SCHEDULERS` maps diffusers class names to classes; `scheduler_from_config` picks the class from a config's
`_class_name`; `scheduler_by_name` takes the short names of the command line ("euler_a", "dpm++2m-karras", ...).
"""

from __future__ import annotations

from .base import Scheduler
from .config import FrozenConfig
from .ddim import DDIMScheduler
from .euler_discrete import EulerDiscreteScheduler
from .output import SchedulerOutput
from .pndm import PNDMScheduler
from .registry import SCHEDULERS, SHORT_NAMES, scheduler_by_name, scheduler_from_config

__all__ = [
    "SCHEDULERS",
    "SHORT_NAMES",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "FrozenConfig",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerOutput",
    "scheduler_by_name",
    "scheduler_from_config",
]
