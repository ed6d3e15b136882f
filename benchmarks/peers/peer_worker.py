"""A benchmark worker for diffship's peers, speaking diffship's worker protocol (src/diffship/benchmarking/protocol.py,
loaded by file path: the Optimum venv has no diffship):

    .venv/bin/python benchmarks/peers/peer_worker.py            # diffusers on PyTorch (eager, CPU)
    .venv-optimum/bin/python benchmarks/peers/peer_worker.py    # Optimum's ORT / OpenVINO pipelines

The spec's `kind` picks the pipeline: "diffusers" (StableDiffusionPipeline on the diffusers source directory),
"optimum-ort" (ORTStableDiffusionPipeline) or "optimum-ov" (OVStableDiffusionPipeline, with `ov_config` or, where it
is None, Optimum Intel's defaults; optionally reshaped to static shapes) on the exported directory. Each gets the same prompt, latents (a .npy file), scheduler
(a diffusers class name) and steps as diffship. Stages are timed by wrapping the pipeline's component calls
(text encoder, UNet, VAE decode/encode) as diffship's worker wraps its Sessions; the rest is scheduler and glue.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_PROTOCOL = Path(__file__).resolve().parents[2] / "src" / "diffship" / "benchmarking" / "protocol.py"
_spec = importlib.util.spec_from_file_location("diffship_bench_protocol", _PROTOCOL)
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)


def _wrap_method(obj, method: str, recorder, stage: str) -> None:
    """Time every call of obj.method (an instance attribute shadows the class's method)."""
    setattr(obj, method, recorder.wrap(getattr(obj, method), stage))


def load_diffusers(spec: dict, recorder):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(spec["model_dir"], safety_checker=None,
                                                   requires_safety_checker=False)
    _wrap_method(pipe.text_encoder, "forward", recorder, "text_encoder")
    _wrap_method(pipe.unet, "forward", recorder, "unet")
    _wrap_method(pipe.vae, "decode", recorder, "vae_decode")
    _wrap_method(pipe.vae, "encode", recorder, "vae_encode")
    info = {"pipeline": type(pipe).__name__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "attention": type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__}
    return pipe, info


def load_optimum_ort(spec: dict, recorder):
    import onnxruntime
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(spec["model_dir"])
    for attr, stage in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae_decode"),
                        ("vae_encoder", "vae_encode")):
        if getattr(pipe, attr, None) is not None:
            _wrap_method(getattr(pipe, attr), "forward", recorder, stage)
    info = {"pipeline": type(pipe).__name__, "onnxruntime": onnxruntime.__version__,
            "providers": pipe.unet.session.get_providers(), "use_io_binding": pipe.unet.use_io_binding}
    return pipe, info


def load_optimum_ov(spec: dict, recorder):
    import openvino
    from optimum.intel import OVStableDiffusionPipeline

    # ov_config None: Optimum Intel's defaults (its performance hint; the plugin's inference precision, bf16 on CPUs
    # that have it). compile=False then compile() is what from_pretrained does by itself, with a reshape between.
    config = {} if spec.get("ov_config") is None else {"ov_config": spec["ov_config"]}
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["model_dir"], compile=False, **config)
    if spec.get("static"):  # static shapes, as Optimum Intel's documentation recommends on CPU
        pipe.reshape(batch_size=1, height=spec["height"], width=spec["width"], num_images_per_prompt=1)
    pipe.compile()
    for attr, stage in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae_decode"),
                        ("vae_encoder", "vae_encode")):
        if getattr(pipe, attr, None) is not None:
            _wrap_method(getattr(pipe, attr), "forward", recorder, stage)
    compiled = pipe.unet.request
    used = {k: str(v) for k, v in (getattr(pipe, "ov_config", None) or {}).items()}
    info = {"pipeline": type(pipe).__name__, "openvino": openvino.__version__, "static": bool(spec.get("static")),
            "ov_config": spec.get("ov_config"), "ov_config_used": used,
            "unet_inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "unet_performance_hint": str(compiled.get_property("PERFORMANCE_HINT"))}
    return pipe, info


LOADERS = {"diffusers": load_diffusers, "optimum-ort": load_optimum_ort, "optimum-ov": load_optimum_ov}


def load(spec: dict):
    import numpy as np
    import torch

    recorder = protocol.StageRecorder()
    pipe, info = LOADERS[spec["kind"]](spec, recorder)
    pipe.set_progress_bar_config(disable=True)
    if spec.get("scheduler"):
        import diffusers

        pipe.scheduler = getattr(diffusers, spec["scheduler"]).from_config(pipe.scheduler.config)
    info["scheduler"] = type(pipe.scheduler).__name__
    latents = torch.from_numpy(np.load(spec["latents"]))

    def run() -> dict:
        recorder.reset()
        start = time.perf_counter()
        pipe(spec["prompt"], negative_prompt=spec.get("negative_prompt"), height=spec["height"],
             width=spec["width"], num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"],
             latents=latents.clone(), output_type="pil", **(spec.get("call_kwargs") or {}))
        timings = recorder.timings(time.perf_counter() - start)
        if not timings["unet_steps"] or timings["vae_decode"] is None:
            raise RuntimeError(f"the component timers saw no UNet or VAE decoder call: {timings}")
        return timings

    return run, info


if __name__ == "__main__":
    sys.exit(protocol.serve(load))
