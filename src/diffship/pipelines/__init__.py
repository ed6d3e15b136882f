"""numpy pipelines: tokenize, encode the prompt, denoise with a numpy scheduler, decode. No torch."""

from diffship.pipelines.auto_pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
)
from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput
from diffship.pipelines.stable_diffusion_depth2img import StableDiffusionDepth2ImgPipeline
from diffship.pipelines.stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffship.pipelines.stable_diffusion_inpaint import StableDiffusionInpaintPipeline

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "AutoPipelineForText2Image",
    "DiffusionPipeline",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
]
