"""What `step` returns: a dataclass like diffusers' `SchedulerOutput`, also indexable like its tuple form."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


class _StepOutput:
    def to_tuple(self) -> tuple:
        """The non-None fields in order: what `step(..., return_dict=False)` returns."""
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class SchedulerOutput(_StepOutput):
    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None
