"""Scheduler configuration: the frozen `config` mapping, and reading / writing `scheduler_config.json`.

The on-disk format and the rules for carrying a config from one scheduler class to another are diffusers'
(`ConfigMixin.from_config` / `extract_init_dict`), so that `X.from_config(pipe.scheduler.config)` picks the
same values in diffship as in diffusers. In particular:

- keys the source scheduler never set (listed in `_use_default_values`) are dropped, so the target class uses its
  *own* default for them rather than the source class's default (PNDM's `timestep_spacing="leading"` default
  must not leak into Euler, whose default is "linspace");
- keys that belong to another scheduler class are carried along unused ("hidden"), so switching back restores them;
- keys that no scheduler knows are reported once, in one warning listing them all.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffship.checks import read_json_object
from diffship.errors import DiffshipError
from diffship.layout import SCHEDULER, SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = SCHEDULER_CONFIG  # diffusers' name for it
# The diffusers release whose scheduler numerics and config format these schedulers mirror; written into
# saved configs as `_diffusers_version` because diffusers reads that key (it is informational there).
DIFFUSERS_REFERENCE_VERSION = "0.42.1"


class FrozenConfig(dict):
    """A read-only dict with attribute access, like diffusers' FrozenDict (`config.beta_schedule`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' has no attribute {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "A scheduler config is frozen. Build a new scheduler instead: "
            "`type(scheduler).from_config(scheduler.config, key=value)`."
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _refuse
    update = setdefault = pop = popitem = clear = _refuse

    def __reduce__(self):  # pickling / copy.deepcopy would otherwise go through the refused __setitem__
        return (FrozenConfig, (dict(self),))


def register_to_config(init):
    """Decorate a scheduler's `__init__` so that its arguments become `self.config` (diffusers' decorator).

    Also records which arguments were left at their defaults (`_use_default_values`), which `from_config` of
    another class needs to apply its own defaults instead.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        bound = signature.bind(self, *args, **public)
        passed = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        config = {**private, **values}
        defaults = sorted(set(values) - passed)
        if defaults:
            config["_use_default_values"] = defaults
        config["_class_name"] = type(self).__name__
        self._internal_dict = FrozenConfig(config)
        init(self, *args, **public)

    inner_init.__signature__ = signature
    return inner_init


def init_keys(cls: type) -> set[str]:
    """The config keys a scheduler class takes: its `__init__` parameters."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def split_config(cls: type, config: Mapping[str, Any], known_elsewhere: set[str], overrides: dict[str, Any]):
    """Split `config` into `cls.__init__` arguments, hidden keys to carry along, and unknown keys.

    Mirrors diffusers' `ConfigMixin.extract_init_dict`.
    """
    used_defaults = set(config.get("_use_default_values", []))
    config = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
    original = dict(config)
    expected = init_keys(cls)

    init_kwargs: dict[str, Any] = {}
    for key in expected:
        if key in overrides:
            init_kwargs[key] = overrides.pop(key)
        elif key in config:
            init_kwargs[key] = config[key]
    if overrides:
        raise TypeError(f"{cls.__name__} got unexpected config arguments: {sorted(overrides)}")

    leftover = {k: v for k, v in config.items() if k not in init_kwargs}
    unknown = sorted(k for k in leftover if not k.startswith("_") and k not in known_elsewhere)
    hidden = {k: v for k, v in original.items() if k not in init_kwargs}
    if "_class_name" in hidden:
        hidden["_class_name"] = cls.__name__
    return init_kwargs, hidden, unknown


def report_ignored(cls: type, unknown: list[str], other_schedulers_keys: list[str]) -> None:
    """One line for all ignored keys: a warning for keys no scheduler knows, a log line for other classes' keys."""
    if unknown:
        warnings.warn(
            f"{cls.__name__}: ignoring config keys that no scheduler takes: {', '.join(unknown)}. "
            f"Check the {SCHEDULER_CONFIG_NAME} for typos.",
            UserWarning,
            stacklevel=3,
        )
    if other_schedulers_keys:
        logger.info(
            "%s: config keys of other scheduler classes carried along unused: %s",
            cls.__name__,
            ", ".join(other_schedulers_keys),
        )


def find_config_file(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """`scheduler_config.json` in `path` (a file, a scheduler dir, or a pipeline dir with `scheduler/`)."""
    path = Path(path)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    for candidate in (path / SCHEDULER_CONFIG_NAME, path / SCHEDULER / SCHEDULER_CONFIG_NAME):
        if candidate.is_file():
            return candidate
    raise DiffshipError(
        f"No {SCHEDULER_CONFIG_NAME} in {str(path)!r} nor in its 'scheduler/' folder. Pass an exported pipeline "
        f"directory, its 'scheduler' folder, or the path of a {SCHEDULER_CONFIG_NAME} file."
    )


def read_config_file(path: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any]:
    return read_json_object(find_config_file(path, subfolder))


def _json_ready(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def config_to_json(config: Mapping[str, Any], class_name: str) -> str:
    out = {k: _json_ready(v) for k, v in config.items() if k != "_use_default_values"}
    out["_class_name"] = class_name
    out.setdefault("_diffusers_version", DIFFUSERS_REFERENCE_VERSION)
    return json.dumps(out, indent=2, sort_keys=True) + "\n"
