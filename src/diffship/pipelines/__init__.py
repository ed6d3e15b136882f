"""numpy pipelines: tokenize, encode the prompt, denoise with a numpy scheduler, decode. No torch."""

from diffship.pipelines.base import DiffusionPipeline
from diffship.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["DiffusionPipeline", "StableDiffusionPipeline", "StableDiffusionPipelineOutput"]
