"""The reverse interop check for SD3: does a diffship SD3 export load in Optimum's ORT and OpenVINO SD3 pipelines and
give diffusers' images? The SD3 counterpart of check_optimum_loads_diffship_sdxl.py, shorter. Runs in the Optimum
venv (benchmarks/peers/setup_optimum_venv.sh):

    .venv-optimum/bin/python benchmarks/peers/check_optimum_loads_diffship_sd3.py --export DIFFSHIP_EXPORT \
        --source TINY_SD3 [--out benchmarks/results/optimum_loads_diffship_sd3]

DIFFSHIP_EXPORT is `diffship export TINY_SD3 DIFFSHIP_EXPORT --backend onnx,openvino` of `diffship tiny-model TINY_SD3
--kind sd3` (its model_index names T5TokenizerFast and its tokenizer_3 config is one transformers 4 reads).

What is compared: diffusers' StableDiffusion3Pipeline (torch) on TINY_SD3 and Optimum's ORTStableDiffusion3Pipeline /
OVStableDiffusion3Pipeline (ov_config INFERENCE_PRECISION_HINT f32) on DIFFSHIP_EXPORT, with the same prompt,
negative prompt, latents (a fixed array), 48x80, 3 steps, guidance 5.0, output_type="np": the max abs difference of
the images in [0, 1], against the bound 1e-3. Writes OUT.json and OUT.md (also printed); exit status 1 if a pipeline
fails to load or run, or a difference exceeds the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np

BOUND = 1e-3
CALL = dict(prompt="a red cat on the moon", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
            height=48, width=80, output_type="np")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/optimum_loads_diffship_sd3"))
    args = parser.parse_args()

    import importlib.metadata as md

    import torch
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 16, 6, 10)).astype(np.float32))
    reference = StableDiffusion3Pipeline.from_pretrained(args.source)
    reference.set_progress_bar_config(disable=True)
    expected = reference(latents=latents, **CALL).images

    def ort():
        from optimum.onnxruntime import ORTStableDiffusion3Pipeline

        return ORTStableDiffusion3Pipeline.from_pretrained(args.export)

    def openvino():
        from optimum.intel import OVStableDiffusion3Pipeline

        return OVStableDiffusion3Pipeline.from_pretrained(args.export, ov_config={"INFERENCE_PRECISION_HINT": "f32"})

    results = {}
    for name, load in (("ORTStableDiffusion3Pipeline", ort), ("OVStableDiffusion3Pipeline", openvino)):
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
    lines = ["| Optimum pipeline on diffship's SD3 export | max abs vs diffusers | within 1e-3 |", "| --- | ---: | :---: |"]
    for name, result in results.items():
        figure = f"{result['max_abs']:.2e}" if "max_abs" in result else result["error"].splitlines()[0][:120]
        lines.append(f"| {name} | {figure} | {'yes' if result['passed'] else 'no'} |")
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    text = "\n".join(lines) + f"\n\n48x80, 3 steps, guidance 5.0, same latents. Optimum venv: {versions}.\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
