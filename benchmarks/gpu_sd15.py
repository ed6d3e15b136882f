"""Full-size SD 1.5 on an NVIDIA GPU: 512x512, 50 steps, batch 1, fp16, guidance 7.5. Per-stage latency of PyTorch
(diffusers, fp16, SDPA attention: its fastest built-in), diffship on ONNX Runtime's CUDA provider (CUDA graph) and
diffship on TensorRT (a static engine, CUDA graph), run in turn, run by run, medians after warm-up, the GPU named.

Not yet run: written on a machine without a GPU. The published reference points for this setting are ONNX Runtime's
1.04 s (ORT CUDA with CUDA graph) and 1.00 s (TensorRT) on an A100.

    pip install 'diffship[export,tensorrt]' && pip uninstall -y onnxruntime && pip install 'diffship[gpu]'
    pip install torch --index-url https://download.pytorch.org/whl/cu124      # a CUDA build of torch
    python benchmarks/gpu_sd15.py [--work /tmp/gpu-sd15] [--runs 5] [--out benchmarks/results/gpu_sd15]

The model is SD 1.5's architecture with random weights (`diffship tiny-model --full-size`): latency does not depend
on weight values. Two fp16 exports: one fused for ONNX Runtime's CUDA provider (`--optimize --target cuda`: its
fused attention and GroupNorm ops, which TensorRT's parser does not know; `--static`, as its CUDA graph needs every
node on the GPU), one plain for TensorRT (engines built for
exactly this request, strongly typed: the graph's fp16, its VAE fp32 as the export keeps it). PyTorch runs the same
weights in fp16 (VAE included: diffusers' fp16 pipelines do).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

HEIGHT = WIDTH = 512
STEPS = 50
GUIDANCE = 7.5
PROMPT = "a photo of an astronaut riding a horse on mars"
STAGES = ("text_encoder", "unet", "unet_per_step", "vae_decode", "scheduler_and_glue", "total")


def gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown GPU (nvidia-smi gave nothing)"


def prepare(work: Path) -> dict[str, Path]:
    """The random-weight model and its two exports (made once; later runs reuse them)."""
    from diffship.exporters import export
    from diffship.testing.tiny_models import save_tiny_pipeline

    model = work / "sd15"
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline(model, "full-size")
    exports = {"ort": work / "sd15-onnx-fp16-cuda", "trt": work / "sd15-tensorrt-fp16"}
    if not (exports["ort"] / "model_index.json").is_file():
        # Static: a CUDA graph needs every node on the CUDA provider, and a dynamic graph's shape arithmetic runs on
        # the CPU provider (ONNX Runtime's own SD demo fixes the shapes too).
        export(model, exports["ort"], "onnx", height=HEIGHT, width=WIDTH, dtype="fp16", optimize=True,
               target="cuda", static=True)
    if not (exports["trt"] / "model_index.json").is_file():
        export(model, exports["trt"], ["onnx", "tensorrt"], height=HEIGHT, width=WIDTH, dtype="fp16",
               tensorrt_static=True)
    return {"model": model, **exports}


class TorchContestant:
    """diffusers in fp16 on CUDA; each module's forward timed (synchronized), the rest is scheduler and glue."""

    name = "PyTorch (diffusers fp16, SDPA)"

    def __init__(self, model: Path):
        import torch
        from diffusers import StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.torch = torch
        started = time.perf_counter()
        self.pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16, safety_checker=None)
        self.pipe = self.pipe.to("cuda")
        self.pipe.unet.set_attn_processor(AttnProcessor2_0())  # scaled_dot_product_attention (flash / mem-efficient)
        self.pipe.vae.set_attn_processor(AttnProcessor2_0())
        self.pipe.set_progress_bar_config(disable=True)
        self.load = time.perf_counter() - started
        self.seconds: dict[str, list[float]] = {}
        for stage, module in (("text_encoder", self.pipe.text_encoder), ("unet", self.pipe.unet),
                              ("vae_decode", self.pipe.vae.decoder)):
            self._time(stage, module)

    def _time(self, stage: str, module) -> None:
        starts = []

        def before(*_):
            self.torch.cuda.synchronize()
            starts.append(time.perf_counter())

        def after(*_):
            self.torch.cuda.synchronize()
            self.seconds.setdefault(stage, []).append(time.perf_counter() - starts.pop())

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def run(self, seed: int) -> dict:
        torch = self.torch
        self.seconds = {}
        generator = torch.Generator("cuda").manual_seed(seed)
        torch.cuda.synchronize()
        started = time.perf_counter()
        self.pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=generator, output_type="pil")
        torch.cuda.synchronize()
        total = time.perf_counter() - started
        unet = self.seconds.get("unet", [])
        stages = {"text_encoder": sum(self.seconds.get("text_encoder", [])), "unet": sum(unet),
                  "unet_per_step": sum(unet) / max(len(unet), 1), "vae_decode": sum(self.seconds.get("vae_decode", []))}
        stages["scheduler_and_glue"] = max(total - stages["text_encoder"] - stages["unet"] - stages["vae_decode"], 0)
        stages["total"] = total
        return stages


class DiffshipContestant:
    """A diffship pipeline on a GPU path; the pipeline's own per-stage timings."""

    def __init__(self, name: str, export: Path, backend: str, **options):
        from diffship.pipelines import AutoPipelineForText2Image

        self.name = name
        started = time.perf_counter()
        self.pipe = AutoPipelineForText2Image.from_pretrained(export, backend=backend, **options)
        self.pipe.set_progress_bar_config(disable=True)
        self.load = time.perf_counter() - started
        self.settings = self.pipe.unet.settings()

    def run(self, seed: int) -> dict:
        result = self.pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           generator=seed, output_type="pil")
        return {stage: result.timings.get(stage, 0.0) for stage in STAGES}


def markdown(report: dict) -> str:
    lines = [f"# Full-size SD 1.5 on {report['gpu']}", "",
             f"{HEIGHT}x{WIDTH}, {STEPS} steps, batch 1, fp16, guidance {GUIDANCE}; medians of {report['runs']} runs "
             f"after {report['warmup']} warm-up, run in turn ({report['date']}).", "",
             "| | " + " | ".join(STAGES) + " | load (s) |", "|---" * (len(STAGES) + 2) + "|"]
    for result in report["results"]:
        cells = [f"{result['median'][s] * 1000:.1f} ms" if s != "total" else f"{result['median'][s]:.3f} s"
                 for s in STAGES]
        lines.append(f"| {result['name']} | " + " | ".join(cells) + f" | {result['load']:.1f} |")
    lines += ["", "Reference points (ONNX Runtime's published figures, A100): ORT CUDA with CUDA graph 1.04 s, "
              "TensorRT 1.00 s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffship-gpu-sd15"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_sd15"))
    parser.add_argument("--skip", default="", help="contestants to leave out: torch,ort,trt")
    args = parser.parse_args()

    from diffship.benchmarking.machine import machine_info, now, versions
    from diffship.benchmarking.report import write_report
    from diffship.runtimes.engines import ShapeRange, check_tensorrt

    check_tensorrt()  # TensorRT, CUDA's binding and a GPU, before minutes of export
    paths = prepare(args.work)
    skip = set(filter(None, args.skip.split(",")))
    contestants = []
    if "torch" not in skip:
        contestants.append(TorchContestant(paths["model"]))
    if "ort" not in skip:
        contestants.append(DiffshipContestant("diffship ORT CUDA (CUDA graph)", paths["ort"], "onnxruntime",
                                              provider="cuda", cuda_graph=True))
    if "trt" not in skip:
        contestants.append(DiffshipContestant("diffship TensorRT (static, CUDA graph)", paths["trt"], "tensorrt",
                                              shapes=ShapeRange.static(1, HEIGHT, WIDTH), cuda_graph=True))
    for i in range(args.warmup):
        for c in contestants:
            c.run(seed=i)
    runs = {c.name: [] for c in contestants}
    for i in range(args.runs):
        for c in contestants:  # in turn, run by run: a slow drift of clocks or temperature hits each alike
            runs[c.name].append(c.run(seed=100 + i))
            print(f"run {i + 1} {c.name}: {runs[c.name][-1]['total']:.3f} s", flush=True)
    report = {"gpu": gpu_name(), "date": now(), "machine": machine_info(), "versions": versions(),
              "settings": {"height": HEIGHT, "width": WIDTH, "steps": STEPS, "batch_size": 1, "dtype": "fp16",
                           "guidance_scale": GUIDANCE},
              "runs": args.runs, "warmup": args.warmup,
              "results": [{"name": c.name, "load": c.load, "settings": getattr(c, "settings", None),
                           "median": {s: statistics.median(r[s] for r in runs[c.name]) for s in STAGES},
                           "runs": runs[c.name]} for c in contestants]}
    print(write_report(args.out, report, markdown(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
