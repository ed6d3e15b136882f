"""diffusers' loading surface where it makes sense without torch: DiffusionPipeline.from_pretrained returns the
class model_index.json names, and the schedulers import from the top level; side by side with diffusers."""

from __future__ import annotations

import numpy as np
import pytest

import diffship
from diffship import DiffusionPipeline, StableDiffusionPipeline
from diffship.pipelines.auto_pipeline import pipeline_class_named


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1-inpaint", "sd2-depth", "sd1-lcm", "sdxl", "sdxl-refiner",
                                  "sdxl-inpaint"])
def test_the_class_model_index_names_is_diffusers_choice(kind, tiny_model_dirs):
    import diffusers

    source = tiny_model_dirs(kind)
    theirs = diffusers.DiffusionPipeline.from_pretrained(source)
    assert pipeline_class_named(source).__name__ == type(theirs).__name__


def test_diffusion_pipeline_from_pretrained_loads_that_class(exported_dirs):
    pipe = DiffusionPipeline.from_pretrained(exported_dirs("sd1"), inference_precision="f32")
    assert type(pipe) is StableDiffusionPipeline
    same = StableDiffusionPipeline.from_pretrained(exported_dirs("sd1"), inference_precision="f32")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = [p("a red circle", num_inference_steps=2, latents=latents, output_type="np").images for p in (pipe, same)]
    np.testing.assert_array_equal(*images)


def test_schedulers_import_from_the_top_level():
    import diffusers

    for name in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "LCMScheduler",
                 "UniPCMultistepScheduler", "PNDMScheduler"):
        ours, theirs = getattr(diffship, name), getattr(diffusers, name)
        assert ours is getattr(diffship.schedulers, name) and ours.__name__ == theirs.__name__
        assert name in diffship.__all__
