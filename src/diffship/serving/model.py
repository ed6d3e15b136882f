"""What a model replica holds and runs: the exported pipeline, loaded once, with a pipeline per task on the same
sessions, and `run`, which takes a batch of requests, splits it into sub-batches whose requests can share one
pipeline call (GenerationRequest.batch_key), and runs each as one call: prompts, negative prompts and one
generator per image as lists. No Ray here: a test or a script runs it directly.

Why a batch never changes an image: each image is drawn from its own generator (the request's seed + k), and the
pipelines draw item i's latents and scheduler noise from generator i (diffusers' list convention), so only the
graphs' batch arithmetic can differ; ONNX Runtime's CPU kernels give the same bits at any batch on the test model,
OpenVINO differs within its own run-to-run noise (tests/test_serve.py measures both).
"""

from __future__ import annotations

import inspect
import io
import time
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from diffship.checks import software_exif
from diffship.errors import DiffshipError
from diffship.serving.requests import IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE, GenerationRequest

# The defaults a request leaves out: the task pipeline's own (its __call__'s), read from its signature.
DEFAULTED = ("num_inference_steps", "guidance_scale", "strength")


@dataclass
class GenerationResult:
    """One request's answer: PNG bytes per image, or `error` (the pipeline refused or failed)."""

    request_id: str
    pngs: list[bytes] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # the pipeline call's stages in seconds (the whole sub-batch)
    batch_size: int = 0  # images in the pipeline call this request ran in
    error: str | None = None
    error_status: int = 500


def encode_png(image) -> bytes:
    """PNG bytes as `diffship generate` writes its .png files (EXIF naming diffship), so that the same image gives
    the same file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=software_exif())
    return buffer.getvalue()


class ServedModel:
    """An exported pipeline loaded for serving: `describe()` for the checks a request needs, `run(requests)`."""

    def __init__(self, model_dir: str, backend: str | None = None, threads: int | None = None, **options):
        from diffship.pipelines import (
            AutoPipelineForImage2Image,
            AutoPipelineForInpainting,
            AutoPipelineForText2Image,
            DiffusionPipeline,
        )

        start = time.perf_counter()
        if threads is not None:
            options.update(self.thread_options(model_dir, backend, threads))
        pipe = DiffusionPipeline.from_pretrained(model_dir, backend=backend, **options)
        self.load_seconds = time.perf_counter() - start
        self.model_dir = str(model_dir)
        self.backend = pipe.backend
        self.pipeline_class = type(pipe).__name__
        self.pipelines, self.unavailable = {}, {}
        for task, auto in ((TEXT_TO_IMAGE, AutoPipelineForText2Image), (IMAGE_TO_IMAGE, AutoPipelineForImage2Image),
                           (INPAINTING, AutoPipelineForInpainting)):
            try:
                task_pipe = auto.from_pipe(pipe)
            except DiffshipError as e:
                self.unavailable[task] = str(e)
                continue
            if task != TEXT_TO_IMAGE and getattr(task_pipe, "vae_encoder", None) is None:
                self.unavailable[task] = f"{model_dir} has no vae_encoder (export it with the VAE encoder)"
                continue
            task_pipe.set_progress_bar_config(disable=True)
            self.pipelines[task] = task_pipe
        if not self.pipelines:
            raise DiffshipError(f"{model_dir}: no task diffship serves runs on this model ({self.unavailable})")
        self.default_scheduler = pipe.scheduler
        self._schedulers = {}

    @staticmethod
    def thread_options(model_dir, backend: str | None, threads: int) -> dict:
        """The backend's option for `threads` per graph: a replica keeps to the CPUs Ray reserved for it."""
        from diffship.runtimes import choose_backend, graph_folders
        from diffship.hub import is_local
        from pathlib import Path

        if backend is None and is_local(model_dir):
            backend = choose_backend(graph_folders(Path(model_dir).expanduser()))
        if backend == "openvino":
            return {"config": {"INFERENCE_NUM_THREADS": threads}}
        if backend == "tensorrt":
            return {}  # the GPU runs the graphs: no CPU thread pool to bound (the CPUs are still reserved)
        return {"intra_op_num_threads": threads}

    def describe(self) -> dict:
        """What the ingress checks requests against, before any work: the tasks this model runs (with each task
        pipeline's defaults), the sizes it takes and its schedule's bound."""
        first = next(iter(self.pipelines.values()))
        tasks = {}
        for task, pipe in self.pipelines.items():
            parameters = inspect.signature(type(pipe).__call__).parameters
            tasks[task] = {name: parameters[name].default for name in DEFAULTED if name in parameters}
        return {
            "model_dir": self.model_dir, "backend": self.backend, "pipeline": self.pipeline_class,
            "tasks": tasks, "unavailable": self.unavailable,
            # the kind of scheduler its denoiser takes (schedulers.scheduler_kind): a request naming another is a 400
            "scheduler_kind": first.denoiser_kind,
            "default_height": first.default_height, "default_width": first.default_width,
            "size_multiple": first.size_multiple,
            # More steps than the noise levels the model was trained on have no meaning (the pipelines' own check).
            "max_inference_steps": first.scheduler.config.get("num_train_timesteps") or 1000,
            "load_seconds": self.load_seconds,
        }

    def scheduler(self, name: str | None):
        """The scheduler a request names (one instance per name, from the model's config), or the model's own."""
        if name is None:
            return self.default_scheduler
        if name not in self._schedulers:
            from diffship.schedulers import scheduler_by_name

            self._schedulers[name] = scheduler_by_name(name, self.default_scheduler.config)
        return self._schedulers[name]

    def run(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Each request's result, in order. Compatible requests (equal batch_key) run as one pipeline call; the
        others apart, one call per key, never mixed."""
        results: dict[int, GenerationResult] = {}
        order = sorted(range(len(requests)), key=lambda i: repr(requests[i].batch_key()))
        for _, group in groupby(order, key=lambda i: repr(requests[i].batch_key())):
            indices = list(group)
            for i, result in zip(indices, self.run_compatible([requests[i] for i in indices])):
                results[i] = result
        return [results[i] for i in range(len(requests))]

    def run_compatible(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One pipeline call for requests that share a batch_key; a failure answers each of them with it."""
        first = requests[0]
        pipe = self.pipelines[first.task]
        # One entry per image: request r's image k is prompt r with generator seed + k.
        items = [(r, seed) for r in requests for seed in r.seeds]
        kwargs = dict(
            prompt=[r.prompt for r, _ in items],
            negative_prompt=None if first.negative_prompt is None else [r.negative_prompt for r, _ in items],
            num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
            generator=[np.random.default_rng(seed) for _, seed in items],
        )
        if first.task == TEXT_TO_IMAGE:
            kwargs.update(height=first.height, width=first.width)
        else:
            kwargs.update(image=[r.image for r, _ in items], strength=first.strength)
        if first.task == INPAINTING:
            kwargs.update(mask_image=[r.mask_image for r, _ in items], height=first.height, width=first.width)
        pipe.scheduler = self.scheduler(first.scheduler)
        try:
            output = pipe(**kwargs)
        except (DiffshipError, ValueError, TypeError) as e:  # a request the ingress's checks let through
            return [GenerationResult(r.request_id, error=str(e), error_status=400) for r in requests]
        except Exception as e:  # the backend failed: answered, not dropped
            return [GenerationResult(r.request_id, error=f"generation failed: {type(e).__name__}: {e}")
                    for r in requests]
        pngs = [encode_png(image) for image in output.images]
        results, start = [], 0
        for r in requests:
            results.append(GenerationResult(r.request_id, pngs=pngs[start:start + r.num_images], seeds=r.seeds,
                                            timings=dict(output.timings), batch_size=len(items)))
            start += r.num_images
        return results
