"""AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting: the pipeline class for a task,
picked from what a model is (model_index.json's `_class_name`, the UNet's input channels, whether the export holds
ControlNets), as diffusers' AutoPipeline classes do (with `controlnet=`: the task's ControlNet pipeline).
`from_pipe` builds the task's pipeline on an already-loaded pipeline's sessions.
"""

from __future__ import annotations

from pathlib import Path

from diffship.errors import DiffshipError
from diffship.layout import CONTROLNET, TRANSFORMER, UNET
from diffship.pipelines.base import _read_index, read_config

# What a UNet's input width says about a model, for errors: 9, a dedicated inpainting model; 5, depth-to-image.
_KINDS = {
    9: ("an inpainting model (its UNet takes 9 input channels: latents, mask and masked-image latents)",
        "AutoPipelineForInpainting"),
    5: ("a depth-to-image model (its UNet takes 5 input channels: latents and depth)",
        "AutoPipelineForImage2Image (depth-to-image)"),
    4: ("a text-to-image model (its UNet takes 4 input channels)", "AutoPipelineForText2Image, "
        "AutoPipelineForImage2Image or AutoPipelineForInpainting"),
}


def pipeline_class_for(task: str, class_name: str | None, in_channels: int | None, where,
                       controlnet: bool = False) -> type:
    """The diffship pipeline class that runs `task` on a model of `class_name` whose UNet takes `in_channels`
    (`controlnet`: with the model's ControlNets, the task's ControlNet pipeline)."""
    from diffship.families import diffusers_class_name, family_for

    family = family_for(class_name, where)
    name = diffusers_class_name(class_name or "StableDiffusionPipeline")
    if in_channels is None:
        in_channels = 5 if name == "StableDiffusionDepth2ImgPipeline" else 4
    pipeline_class = family.pipeline_for(task, name, in_channels, controlnet)
    if pipeline_class is None and controlnet:
        raise DiffshipError(f"{where} has ControlNets but diffship has no {family.name} ControlNet pipeline for "
                            f"{task} on a UNet of {in_channels} input channels")
    if pipeline_class is None:
        kind, use = _KINDS.get(in_channels, (f"a model whose UNet takes {in_channels} input channels", None))
        raise DiffshipError(f"{where} is {kind}; it cannot do {task}" + (f": use {use}" if use else ""))
    return pipeline_class


def pipeline_class_named(model_dir) -> type:
    """The pipeline class model_index.json's `_class_name` names, as diffusers' DiffusionPipeline.from_pretrained
    picks it (Optimum's ORT/OV prefixes removed): the family's pipeline of that name, else the family's pipeline
    for the first of its tasks the model's UNet runs."""
    from diffship.families import diffusers_class_name, family_for

    model_dir = Path(model_dir).expanduser()
    class_name = _read_index(model_dir).get("_class_name")
    family = family_for(class_name, model_dir)
    name = diffusers_class_name(class_name or "StableDiffusionPipeline")
    for pipeline in family.pipelines():
        if pipeline.__name__ == name:
            return pipeline
    in_channels = _denoiser_config(model_dir).get("in_channels")
    for task in family.tasks:
        pipeline = family.pipeline_for(task, name, in_channels or 4)
        if pipeline is not None:
            return pipeline
    raise DiffshipError(f"{model_dir}: no {family.name} pipeline runs a {name} whose UNet takes {in_channels} "
                        "input channels")


def _denoiser_config(model_dir: Path) -> dict:
    """The config of a model's denoiser: its UNet's, or its transformer's (SD3); {} when it has neither."""
    for name in (UNET, TRANSFORMER):
        if (model_dir / name).is_dir():
            return read_config(model_dir, name)
    return {}


class _AutoPipeline:
    task: str = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained(dir) or from_pipe(pipe)")

    @classmethod
    def pipeline_class(cls, model_dir) -> type:
        """The class `from_pretrained(model_dir)` would load, without loading anything."""
        model_dir = Path(model_dir).expanduser()
        index = _read_index(model_dir)
        from diffship.runtimes import holds_graph

        return pipeline_class_for(cls.task, index.get("_class_name"), _denoiser_config(model_dir).get("in_channels"),
                                  model_dir, controlnet=holds_graph(model_dir / CONTROLNET))

    @classmethod
    def from_pretrained(cls, model_dir, backend: str | None = None, *, revision: str | None = None, cache_dir=None,
                        token: str | bool | None = None, local_files_only: bool = False, **kwargs):
        """Load an exported pipeline (a directory or a hub repo id, fetched as DiffusionPipeline.from_pretrained
        says) as this task's pipeline; `kwargs` go to the pipeline's from_pretrained."""
        from diffship.hub import HubOptions, exported_pipeline

        model_dir, backend = exported_pipeline(model_dir, backend, HubOptions(revision, cache_dir, token,
                                                                              local_files_only))
        return cls.pipeline_class(model_dir).from_pretrained(model_dir, backend=backend, **kwargs)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """This task's pipeline on `pipe`'s loaded sessions, tokenizer and configs: nothing is reloaded or
        recompiled. `scheduler=` replaces the scheduler (default: a new one of `pipe`'s class and config)."""
        where = pipe.model_dir if getattr(pipe, "model_dir", None) is not None else f"the {type(pipe).__name__}"
        configs = getattr(pipe, "configs", {})
        pipeline_class = pipeline_class_for(cls.task, configs.get("model_index", {}).get("_class_name"),
                                            getattr(pipe, "denoiser_config", {}).get("in_channels"), where,
                                            controlnet=bool(getattr(pipe, "controlnets", None)))
        return pipeline_class.from_pipe(pipe, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text-to-image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image-to-image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
