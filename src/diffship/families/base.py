"""What a model family declares: the diffusers pipelines it covers, its graph components by role with the bounds
their validation is judged by, how its components are exported, and its numpy pipeline per task."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One model family. Its module (diffship.families.<name>) holds both halves: `export_specs` (imported only at
    export, with torch) and the numpy pipelines in `tasks`."""

    name: str
    # diffusers pipeline class names (model_index.json `_class_name`) whose models this family exports and runs.
    class_names: tuple[str, ...]
    # Graph components by role -> the fp32 max-abs bound each is validated at (overridable with --atol).
    components: dict[str, float]
    # "module:function": (diffusers pipeline, ExportShapes) -> [ComponentSpec]; needs torch.
    export_specs: str
    # task -> the UNet's input channels -> the numpy pipeline class that runs it.
    tasks: dict[str, dict[int, type]] = field(default_factory=dict)
    # Pipelines a model_index class name asks for in place of `tasks`' (LCM's own text-to-image pipeline).
    by_class: dict[str, dict[str, type]] = field(default_factory=dict)
    # Plain files the export copies from the source model (tokenizers, scheduler, preprocessors).
    copied: tuple[str, ...] = ()
    # Step caches its export can add graphs for (`export(..., deepcache=True)`; the pipelines' `cache=`).
    step_caches: tuple[str, ...] = ()
    # task -> the pipeline that runs it with ControlNets (an export made with --controlnet).
    controlnet_tasks: dict[str, type] = field(default_factory=dict)
    # export() options only this family's graphs have (True/False flags export_specs takes by keyword), e.g. SD3's
    # "skip_layer_guidance".
    export_flags: tuple[str, ...] = ()

    def specs(self, pipe, shapes, deepcache_branch: int | None = None, controlnets=(), **flags) -> list:
        module, function = self.export_specs.split(":")
        export_specs = getattr(importlib.import_module(module), function)
        options = {"deepcache_branch": deepcache_branch} if deepcache_branch is not None else {}
        if controlnets:
            options["controlnets"] = list(controlnets)
        options.update({flag: True for flag, on in flags.items() if on})
        return export_specs(pipe, shapes, **options)

    def pipelines(self) -> list[type]:
        """Every pipeline class of the family, once each."""
        classes = [c for by_channels in self.tasks.values() for c in by_channels.values()]
        classes += [c for by_task in self.by_class.values() for c in by_task.values()]
        classes += list(self.controlnet_tasks.values())
        return list(dict.fromkeys(classes))

    def pipeline_for(self, task: str, class_name: str, in_channels: int, controlnet: bool = False) -> type | None:
        """The pipeline that runs `task` on a model of `class_name` whose UNet takes `in_channels` (`controlnet`:
        with the export's ControlNets); None if none."""
        if controlnet:
            pipeline = self.controlnet_tasks.get(task)
            return pipeline if pipeline is not None and in_channels in pipeline.unet_in_channels else None
        override = self.by_class.get(class_name, {}).get(task)
        return override or self.tasks.get(task, {}).get(in_channels)

    def controlnet_class_name(self, class_name: str) -> str | None:
        """The diffusers class name of a ControlNet pipeline for a model of `class_name` (model_index.json's), as
        diffusers saves a ControlNet pipeline; None where the family has none for that model's task."""
        task = next((task for task, by_channels in self.tasks.items()
                     if any(c.__name__ == class_name for c in by_channels.values())), "text-to-image")
        if "Img2Img" in class_name:
            task = "image-to-image"
        pipeline = self.controlnet_tasks.get(task)
        return pipeline.__name__ if pipeline is not None else None
