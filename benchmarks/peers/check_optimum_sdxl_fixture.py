"""Optimum's own SDXL pipelines run the committed SDXL fixture (tests/fixtures/optimum-sdxl/, made by
`make_optimum_fixtures.sh --kind sdxl`) and give diffusers' images. Runs in the Optimum venv:

    .venv-optimum/bin/python benchmarks/peers/check_optimum_sdxl_fixture.py [--fixtures tests/fixtures/optimum-sdxl]
        [--io]

What is compared: diffusers' StableDiffusionXLPipeline (torch, this venv's transformers 4.x) on tiny-sdxl/, and
optimum.onnxruntime.ORTStableDiffusionXLPipeline.from_pretrained(onnx/) and
optimum.intel.OVStableDiffusionXLPipeline.from_pretrained(openvino/, ov_config={"INFERENCE_PRECISION_HINT": "f32"}),
with the same prompts (a batch of 2), latents (a fixed array), scheduler (the fixture's EulerDiscreteScheduler),
64x64, 2 steps, with guidance (5.0, SDXL's default) and without (1.0), output_type="np": the max abs difference of
the images in [0, 1], against the bound 1e-3. --io also prints every graph's inputs and outputs (name, dtype,
shape) as the ONNX files and the OpenVINO IR declare them.

Exit status 1 if a pipeline fails or a difference exceeds the bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ATOL = 1e-3
PROMPTS = ["a red circle on the left", "an oil painting of a castle at sunset"]
STEPS = 2
SIZE = 64
GUIDANCE = (5.0, 1.0)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
VERSIONS = ["optimum", "optimum-onnx", "optimum-intel", "onnxruntime", "openvino", "diffusers", "transformers",
            "torch", "numpy"]
DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "optimum-sdxl"


def latents(batch: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 4, SIZE // 8, SIZE // 8))
                            .astype(np.float32))


def generate(pipe, guidance_scale: float) -> np.ndarray:
    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
               latents=latents(len(PROMPTS)), output_type="np")
    return np.asarray(out.images)


def graph_io(fixtures: Path) -> None:
    import onnx
    import openvino as ov

    names = {v: k.lower() for k, v in vars(onnx.TensorProto).items() if isinstance(v, int) and k.isupper()}

    def dims(t):
        return "[" + ",".join(d.dim_param or str(d.dim_value) if d.HasField("dim_value") or d.dim_param else "?"
                              for d in t.type.tensor_type.shape.dim) + "]"

    for comp in COMPONENTS:
        graph = onnx.load(str(fixtures / "onnx" / comp / "model.onnx"), load_external_data=False).graph
        print(f"onnx/{comp}/model.onnx")
        for kind, items in (("in ", graph.input), ("out", graph.output)):
            for t in items:
                print(f"    {kind} {t.name}: {names[t.type.tensor_type.elem_type]} {dims(t)}")
    core = ov.Core()
    for comp in COMPONENTS:
        model = core.read_model(str(fixtures / "openvino" / comp / "openvino_model.xml"))
        print(f"openvino/{comp}/openvino_model.xml")
        for kind, items in (("in ", model.inputs), ("out", model.outputs)):
            for p in items:
                print(f"    {kind} {', '.join(sorted(p.get_names()))}: {p.get_element_type().get_type_name()} "
                      f"{p.get_partial_shape()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--io", action="store_true", help="also print each graph's inputs and outputs")
    args = parser.parse_args(argv)
    fixtures = args.fixtures

    from diffusers import StableDiffusionXLPipeline
    from optimum.intel import OVStableDiffusionXLPipeline
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    print("versions: " + ", ".join(f"{n} {version(n)}" for n in VERSIONS))
    print(f"fixtures: {fixtures}; prompts: batch of {len(PROMPTS)}, {SIZE}x{SIZE}, {STEPS} steps, "
          f"guidance {', '.join(map(str, GUIDANCE))}, same latents, output_type np")
    if args.io:
        graph_io(fixtures)

    torch.manual_seed(0)
    reference = StableDiffusionXLPipeline.from_pretrained(str(fixtures / "tiny-sdxl"), add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    ref = {g: generate(reference, g) for g in GUIDANCE}
    print(f"diffusers StableDiffusionXLPipeline ({type(reference.scheduler).__name__}): images "
          f"{ref[GUIDANCE[0]].shape}, range [{min(r.min() for r in ref.values()):.3f}, "
          f"{max(r.max() for r in ref.values()):.3f}], std {ref[GUIDANCE[0]].std():.3f}, "
          + ", ".join(f"guidance={g}: {np.mean((r > 0) & (r < 1)):.0%} of values inside (0, 1)"
                      for g, r in ref.items()))

    loads = {
        "ORTStableDiffusionXLPipeline(onnx/)": lambda: ORTStableDiffusionXLPipeline.from_pretrained(
            str(fixtures / "onnx")),
        "OVStableDiffusionXLPipeline(openvino/, f32)": lambda: OVStableDiffusionXLPipeline.from_pretrained(
            str(fixtures / "openvino"), ov_config=F32),
    }
    ok = True
    for name, load in loads.items():
        t0 = time.perf_counter()
        try:
            pipe = load()
        except Exception as exc:  # noqa: BLE001 -- report and go on to the other pipeline
            print(f"{name}: FAILED to load: {type(exc).__name__}: {exc}")
            ok = False
            continue
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        parts = []
        for g in GUIDANCE:
            try:
                images = generate(pipe, g)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} guidance={g}: FAILED: {type(exc).__name__}: {exc}")
                ok = False
                continue
            diff = float(np.abs(images - ref[g]).max()) if images.shape == ref[g].shape else float("inf")
            ok &= diff <= ATOL
            parts.append(f"guidance={g}: {images.shape} max abs diff {diff:.2e}")
        print(f"{name} [{type(pipe.scheduler).__name__}, loaded in {load_s:.1f} s]: " + "; ".join(parts))
    print(f"result: {'PASS' if ok else 'FAIL'} (bound {ATOL:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
