"""AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting: the pipeline class for a task,
picked from what a model is (model_index.json's `_class_name`, the UNet's input channels), as diffusers'
AutoPipeline classes do. `from_pipe` builds the task's pipeline on an already-loaded pipeline's sessions.
"""

from __future__ import annotations

from pathlib import Path

from diffship.errors import DiffshipError
from diffship.pipelines.base import _read_index, read_config
from diffship.pipelines.stable_diffusion import StableDiffusionPipeline
from diffship.pipelines.stable_diffusion_depth2img import StableDiffusionDepth2ImgPipeline
from diffship.pipelines.stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffship.pipelines.stable_diffusion_inpaint import StableDiffusionInpaintPipeline

# model_index.json class names of the Stable Diffusion 1.x/2.x family (Optimum writes diffusers' names).
STABLE_DIFFUSION_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                            "StableDiffusionInpaintPipeline", "StableDiffusionDepth2ImgPipeline")

# task -> UNet input channels -> pipeline class. 4: a regular model (inpainting then blends latents with the mask);
# 9: a dedicated inpainting model; 5: a depth-to-image model.
TASK_PIPELINES = {
    "text-to-image": {4: StableDiffusionPipeline},
    "image-to-image": {4: StableDiffusionImg2ImgPipeline, 5: StableDiffusionDepth2ImgPipeline},
    "inpainting": {4: StableDiffusionInpaintPipeline, 9: StableDiffusionInpaintPipeline},
}
_KINDS = {
    9: ("an inpainting model (its UNet takes 9 input channels: latents, mask and masked-image latents)",
        "AutoPipelineForInpainting"),
    5: ("a depth-to-image model (its UNet takes 5 input channels: latents and depth)",
        "AutoPipelineForImage2Image (depth-to-image)"),
    4: ("a text-to-image model (its UNet takes 4 input channels)", "AutoPipelineForText2Image, "
        "AutoPipelineForImage2Image or AutoPipelineForInpainting"),
}


def pipeline_class_for(task: str, class_name: str | None, in_channels: int | None, where) -> type:
    """The diffship pipeline class that runs `task` on a model of `class_name` whose UNet takes `in_channels`."""
    name = class_name or "StableDiffusionPipeline"
    for prefix in ("ORT", "OV"):  # Optimum's runtime class names, should a model_index carry one
        if name.startswith(prefix) and name[len(prefix):] in STABLE_DIFFUSION_CLASSES:
            name = name[len(prefix):]
    if name not in STABLE_DIFFUSION_CLASSES:
        raise DiffshipError(f"{where} holds a {class_name}; the AutoPipeline classes run "
                            f"{', '.join(STABLE_DIFFUSION_CLASSES)}")
    if in_channels is None:
        in_channels = 5 if name == "StableDiffusionDepth2ImgPipeline" else 4
    pipeline_class = TASK_PIPELINES[task].get(in_channels)
    if pipeline_class is None:
        kind, use = _KINDS.get(in_channels, (f"a model whose UNet takes {in_channels} input channels", None))
        raise DiffshipError(f"{where} is {kind}; it cannot do {task}" + (f": use {use}" if use else ""))
    return pipeline_class


class _AutoPipeline:
    task: str = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained(dir) or from_pipe(pipe)")

    @classmethod
    def pipeline_class(cls, model_dir) -> type:
        """The class `from_pretrained(model_dir)` would load, without loading anything."""
        model_dir = Path(model_dir).expanduser()
        index = _read_index(model_dir)
        unet_config = read_config(model_dir, "unet") if (model_dir / "unet").is_dir() else {}
        return pipeline_class_for(cls.task, index.get("_class_name"), unet_config.get("in_channels"), model_dir)

    @classmethod
    def from_pretrained(cls, model_dir, backend: str = "onnxruntime", **kwargs):
        """Load an exported directory as this task's pipeline; `kwargs` go to the pipeline's from_pretrained."""
        return cls.pipeline_class(model_dir).from_pretrained(model_dir, backend=backend, **kwargs)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """This task's pipeline on `pipe`'s loaded sessions, tokenizer and configs: nothing is reloaded or
        recompiled. `scheduler=` replaces the scheduler (default: a new one of `pipe`'s class and config)."""
        where = pipe.model_dir if getattr(pipe, "model_dir", None) is not None else f"the {type(pipe).__name__}"
        configs = getattr(pipe, "configs", {})
        pipeline_class = pipeline_class_for(cls.task, configs.get("model_index", {}).get("_class_name"),
                                            configs.get("unet", {}).get("in_channels"), where)
        return pipeline_class.from_pipe(pipe, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text-to-image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image-to-image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
