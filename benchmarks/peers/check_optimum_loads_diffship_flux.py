"""The reverse interop check for Flux: does a diffship Flux export load in Optimum's ORT and OpenVINO Flux pipelines
and give diffusers' images? check_optimum_loads_diffship_sd3.py for Flux. Runs in the Optimum venv
(benchmarks/peers/setup_optimum_venv.sh):

    .venv-optimum/bin/python benchmarks/peers/check_optimum_loads_diffship_flux.py --export DIFFSHIP_EXPORT \
        --source TINY_FLUX [--out benchmarks/results/optimum_loads_diffship_flux]

DIFFSHIP_EXPORT is `diffship export TINY_FLUX DIFFSHIP_EXPORT --backend onnx,openvino --height 64 --width 64` of
`diffship tiny-model TINY_FLUX --kind flux` (its model_index names T5TokenizerFast for tokenizer_2).

What is compared: diffusers' FluxPipeline (torch) on TINY_FLUX and Optimum's ORTFluxPipeline / OVFluxPipeline
(ov_config INFERENCE_PRECISION_HINT f32) on DIFFSHIP_EXPORT, with the same prompt, packed latents (a fixed array),
48x80, 3 steps, guidance 3.5, max_sequence_length 64, output_type="np": the max abs difference of the images in
[0, 1], against the bound 1e-3. Writes OUT.json and OUT.md (also printed); exit status 1 if a pipeline fails to load
or run, or a difference exceeds the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

BOUND = 1e-3
CALL = dict(prompt="a red cat on the moon", num_inference_steps=3, guidance_scale=3.5, height=48, width=80,
            max_sequence_length=64, output_type="np")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optimum_loads_diffship_flux"))
    args = parser.parse_args()

    import importlib.metadata as md

    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(1)
    # Packed latents, as FluxPipeline takes them: a 48x80 image is 3x5 patches of 2x2 x 16 channels.
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 15, 64)).astype(np.float32))
    reference = FluxPipeline.from_pretrained(args.source)
    reference.set_progress_bar_config(disable=True)
    expected = reference(latents=latents, **CALL).images

    def ort():
        from optimum.onnxruntime import ORTFluxPipeline

        return ORTFluxPipeline.from_pretrained(args.export)

    def openvino():
        from optimum.intel import OVFluxPipeline

        return OVFluxPipeline.from_pretrained(args.export, ov_config={"INFERENCE_PRECISION_HINT": "f32"})

    results = {}
    for name, load in (("ORTFluxPipeline", ort), ("OVFluxPipeline", openvino)):
        try:
            pipe = load()
            pipe.set_progress_bar_config(disable=True)
            got = pipe(latents=latents, **CALL).images
            diff = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
            results[name] = {"max_abs": diff, "passed": diff < BOUND}
        except Exception as e:  # noqa: BLE001 - recorded: what failed is the finding
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3),
                             "passed": False}
    report = {"bound": BOUND, "call": CALL, "results": results,
              "versions": {p: md.version(p) for p in ("optimum", "optimum-onnx", "optimum-intel", "diffusers",
                                                       "transformers", "onnxruntime", "openvino")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| Optimum pipeline on diffship's Flux export | max abs vs diffusers | within 1e-3 |",
             "| --- | ---: | :---: |"]
    for name, result in results.items():
        figure = f"{result['max_abs']:.2e}" if "max_abs" in result else result["error"].splitlines()[0][:120]
        lines.append(f"| {name} | {figure} | {'yes' if result['passed'] else 'no'} |")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    text = "\n".join(lines) + f"\n\n48x80, 3 steps, guidance 3.5, same latents. Optimum venv: {versions}.\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
