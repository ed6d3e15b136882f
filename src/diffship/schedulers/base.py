"""What every scheduler shares: its config (load, save, switch class) and the step-index bookkeeping.

The algorithms themselves live one per file; this holds only the plumbing diffusers keeps in `SchedulerMixin` and
`ConfigMixin`, so that each algorithm file reads like its paper.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import config as _config
from .config import FrozenConfig, SCHEDULER_CONFIG_NAME


class Scheduler:
    """Base of diffship's numpy schedulers: config handling and `begin_index` / `step_index`."""

    config_name = SCHEDULER_CONFIG_NAME
    order = 1
    _internal_dict: FrozenConfig
    _step_index: int | None = None
    _begin_index: int | None = None

    # ---- config -------------------------------------------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    def _register_hidden(self, hidden: Mapping[str, Any]) -> None:
        self._internal_dict = FrozenConfig({**self._internal_dict, **hidden})

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build this scheduler from a diffusers or diffship scheduler config (any scheduler class's).

        `kwargs` override config values: `EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)`.
        """
        config = dict(config or {})
        known_elsewhere = set().union(*(_config.init_keys(c) for c in _all_scheduler_classes()))
        init_kwargs, hidden, unknown = _config.split_config(cls, config, known_elsewhere, dict(kwargs))
        other = sorted(k for k in hidden if not k.startswith("_") and k not in unknown)
        _config.report_ignored(cls, unknown, other)
        scheduler = cls(**init_kwargs)
        scheduler._register_hidden(hidden)
        if return_unused_kwargs:
            return scheduler, {k: v for k, v in hidden.items() if not k.startswith("_")}
        return scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Read `scheduler_config.json` from a scheduler folder, a pipeline folder (its `scheduler/`), or a file."""
        return cls.from_config(_config.read_config_file(pretrained_model_name_or_path, subfolder), **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None) -> dict:
        return _config.read_config_file(pretrained_model_name_or_path, subfolder)

    def save_config(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Write `scheduler_config.json` into `save_directory` (created if missing); returns the file path."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a directory.")
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / SCHEDULER_CONFIG_NAME
        path.write_text(_config.config_to_json(self.config, type(self).__name__), encoding="utf-8")
        return path

    save_pretrained = save_config

    def __repr__(self) -> str:
        return f"{type(self).__name__} {_config.config_to_json(self.config, type(self).__name__)}"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes this one's config can be switched to: those for the same kind of model
        (registry.scheduler_kind): every noise-prediction class for a noise-prediction scheduler; for a flow model's,
        the flow-matching classes and the solvers that take use_flow_sigmas."""
        from .registry import SCHEDULERS, scheduler_kind, schedulers_for

        return [SCHEDULERS[name] for name in schedulers_for(scheduler_kind(self))]

    # ---- where in the schedule we are ---------------------------------------------------------------------
    # diffusers finds the first step index from the timestep passed to the first `step`/`scale_model_input`
    # unless a pipeline set `begin_index` (img2img starts part-way); `step` then advances it by one.
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """Index of `timestep` in the schedule; the second match when it appears twice (diffusers' rule, so
        that a second-order scheduler started part-way does not skip its first step)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = np.flatnonzero(schedule_timesteps == np.asarray(timestep).reshape(()))
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps {schedule_timesteps}.")
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _noise_step_indices(self, timesteps) -> list[int]:
        """Schedule indices whose sigma `add_noise` uses (diffusers' rule): by lookup of each timestep before a
        pipeline set begin_index; else the current step index, or begin_index before the first step."""
        timesteps = np.asarray(timesteps).reshape(-1)
        if self.begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        if self.step_index is not None:
            return [self.step_index] * timesteps.shape[0]
        return [self.begin_index] * timesteps.shape[0]

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index


def _all_scheduler_classes() -> list[type]:
    found, stack = [], list(Scheduler.__subclasses__())
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
