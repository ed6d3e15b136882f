"""The diffship worker: loads an exported pipeline on one backend and makes images on request (see protocol.py).

    python -m diffship.benchmarking.worker      # then speaks JSON lines on stdin/stdout

Each component Session is wrapped in a timer, so the figures are what the pipeline spends inside its graphs; the
rest of the wall time of the pipeline call is scheduler and glue (tokenizing, guidance, scheduler steps, images).
No torch here, as at run time.
"""

from __future__ import annotations

import sys
import time

from diffship.benchmarking.protocol import StageRecorder, serve
from diffship.pipelines.timing import stage_of


class TimedSession:
    """A Session whose `run` calls are timed; everything else is the wrapped session's."""

    def __init__(self, session, recorder: StageRecorder, stage: str):
        self._session = session
        self._recorder = recorder
        self._stage = stage

    def run(self, feeds):
        with self._recorder.stage(self._stage):
            return self._session.run(feeds)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_image(height: int, width: int):
    """A smooth, deterministic RGB picture for image-to-image (its content does not change the latency)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 9.0)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def load(spec: dict):
    """(run, info) for one diffship pipeline described by `spec` (see diffship.benchmarking.interleave)."""
    import numpy as np

    from diffship.pipelines import AutoPipelineForImage2Image, AutoPipelineForText2Image
    from diffship.schedulers import scheduler_by_name

    task = spec.get("task", "text-to-image")
    auto = AutoPipelineForText2Image if task == "text-to-image" else AutoPipelineForImage2Image
    static = bool(spec.get("static"))
    pipe = auto.from_pretrained(spec["model_dir"], backend=spec["backend"], compile=False, **spec.get("options", {}))
    guidance = spec.get("guidance_scale", 7.5)
    batch = spec.get("batch_size", 1)
    if static:
        pipe.reshape(batch, spec["height"], spec["width"], 1, guidance=guidance > 1)
    else:  # compiled for the request timed, as a server compiles for the size it serves
        pipe.compile(batch, spec["height"], spec["width"], 1, guidance=guidance > 1)
    if spec.get("scheduler"):
        pipe.scheduler = scheduler_by_name(spec["scheduler"], pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    recorder = StageRecorder()
    for name, session in list(pipe.sessions.items()):
        timed = TimedSession(session, recorder, stage_of(name))
        setattr(pipe, name, timed)
        pipe.sessions[name] = timed

    prompt = spec.get("prompt", "a photo of an astronaut riding a horse on mars")
    prompts = prompt if batch == 1 else [prompt] * batch
    kwargs = dict(negative_prompt=spec.get("negative_prompt"), num_inference_steps=spec["steps"],
                  guidance_scale=guidance, output_type=spec.get("output_type", "pil"))
    if task == "text-to-image":
        kwargs.update(height=spec["height"], width=spec["width"])
    else:
        kwargs.update(image=test_image(spec["height"], spec["width"]), strength=spec.get("strength", 0.75))
    kwargs.update(spec.get("call_kwargs") or {})  # any other call argument, as given (benchmarks/compare_peers.py)
    latents_file = spec.get("latents")
    seed = spec.get("seed", 0)

    def run() -> dict:
        if latents_file is not None:  # the same starting noise as the peers get
            kwargs["latents"] = np.load(latents_file)
        else:
            kwargs["generator"] = seed
        recorder.reset()
        start = time.perf_counter()
        pipe(prompts, **kwargs)
        return recorder.timings(time.perf_counter() - start)

    info = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "backend": pipe.backend,
            "static": static, "denoiser": pipe.denoiser, "unet_session": pipe.sessions[pipe.denoiser].settings(),
            "inference_precisions": pipe.inference_precisions}
    return run, info


if __name__ == "__main__":
    sys.exit(serve(load))
