"""What Flux.1's full-size components need to be exported here, from their configs (no weight is made or read):

    .venv/bin/python benchmarks/flux_memory.py [--out benchmarks/results/flux_memory]

Each component of FLUX.1-dev and FLUX.1-schnell (the 12 B transformer, with and without the guidance embedding; the
T5-XXL encoder, 4.7 B, which SD3 uses too as text_encoder_3; CLIP-L; the 16-channel VAE) is built from its published
config on PyTorch's meta device, so its parameters are counted without allocating them. For each: its bytes in fp32,
bf16 and fp16, and the export's expected peak resident memory, the measured multiplier (the peak RSS of a full-size
export over the largest component's fp32 weights: benchmarks/results/export_memory.json for SD 1.5's UNet,
full_size_sd3.json for SD3 Medium's transformer) times its fp32 bytes. diffship traces every graph in fp32 (its
`--dtype fp16` is a pass on the fp32 graph), so the fp32 figure is what an export needs whatever the dtype asked; the
bf16 column says what a bf16 trace (torch weights loaded in bf16, a bf16 graph written) would need at the same
multiplier, which diffship does not do today. Compared with this machine's memory (MemTotal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# The published configs (black-forest-labs/FLUX.1-dev and -schnell: transformer/, text_encoder/, text_encoder_2/,
# vae/ config.json), the fields that decide the parameter count.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FLUX_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def components() -> list[tuple[str, str, object]]:
    """(model, component, module on the meta device)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        return [
            ("FLUX.1-dev", "transformer", FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=True)),
            ("FLUX.1-schnell", "transformer", FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=False)),
            ("FLUX.1 (both); SD3 text_encoder_3", "text_encoder_2 (T5-XXL encoder)", T5EncoderModel(T5Config(**T5_XXL))),
            ("FLUX.1 (both)", "text_encoder (CLIP-L)", CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            ("FLUX.1 (both)", "vae (encoder + decoder)", AutoencoderKL(**FLUX_VAE)),
        ]


def multipliers() -> dict[str, dict]:
    """The measured export peaks over the largest component's fp32 weights, from the committed results."""
    found = {}
    memory = RESULTS / "export_memory.json"
    if memory.is_file():
        report = json.loads(memory.read_text())
        export = report.get("exports", {}).get("diffship")
        if export and export.get("peak_rss_x_unet_fp32"):
            found["SD 1.5 UNet (export_memory.json)"] = {"x": export["peak_rss_x_unet_fp32"],
                                                           "machine": report["machine"]["cpu"]}
    sd3 = RESULTS / "full_size_sd3.json"
    if sd3.is_file():
        report = json.loads(sd3.read_text())
        export = report.get("export") or {}
        if export.get("peak_rss_mb") and not export.get("returncode"):
            found["SD3 Medium transformer (full_size_sd3.json)"] = {
                "x": export["peak_rss_mb"] * 2**20 / report["transformer"]["fp32_bytes"],
                "machine": report["machine"]["cpu"]}
    return found


def to_markdown(r: dict) -> str:
    m = r["machine"]
    x = r["multiplier"]
    lines = ["# Flux.1's full-size components: what an export needs", "",
             f"{r['date']} · {m['cpu']}, {m['cores']} cores, **{m['memory_gb']} GB RAM** · made by "
             "`benchmarks/flux_memory.py` (parameters counted on PyTorch's meta device from the published configs; "
             "no weight made or read).", "",
             f"Expected export peak = {x['x']:.2f} x the component's fp32 bytes, the multiplier measured on "
             f"{x['source']} ({x['machine']}); in brackets, at the largest multiplier measured, "
             f"{max(v['x'] for v in r['multipliers'].values()):.2f}x. diffship traces in fp32 whatever `--dtype` says (fp16 is a pass on "
             "the fp32 graph), so the fp32 figure is the need; the bf16 column is what a bf16 trace would need at "
             "the same multiplier (diffship has none today).", "",
             "| model | component | parameters | fp32 | bf16 / fp16 | expected export peak (fp32 trace) | fits here | "
             "with a bf16 trace | fits here |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for c in r["components"]:
        lines.append(f"| {c['model']} | {c['component']} | {c['parameters'] / 1e9:.3f} B | "
                     f"{c['fp32_bytes'] / 2**30:.2f} GiB | {c['bf16_bytes'] / 2**30:.2f} GiB | "
                     f"{c['expected_peak_fp32_gib']:.1f} GiB ({c['expected_peak_fp32_gib_upper']:.1f}) | "
                     f"{'yes' if c['fits_fp32'] else '**no**'} | "
                     f"{c['expected_peak_bf16_gib']:.1f} GiB | {'yes' if c['fits_bf16'] else '**no**'} |")
    lines += ["", "Measured multipliers: " + "; ".join(f"{k}: {v['x']:.2f}x ({v['machine']})"
                                                     for k, v in r["multipliers"].items()) + ".", ""]
    lines += r["notes"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "flux_memory")
    args = parser.parse_args()

    from diffship.benchmarking.machine import machine_info, now, versions
    from diffship.benchmarking.report import write_report

    machine = machine_info()
    found = multipliers()
    if not found:
        raise SystemExit("no measured multiplier: run benchmarks/peers/export_peers.py or full_size_sd3.py first")
    # The SD3 transformer's multiplier where it was measured: Flux's transformer and T5 are stacks of Linear layers
    # as it is (whose transposed copies the tracer holds); the UNet's (activations at 512x512 on top) bounds it.
    sd3 = [kv for kv in found.items() if kv[0].startswith("SD3")]
    source, chosen = sd3[0] if sd3 else max(found.items(), key=lambda kv: kv[1]["x"])
    upper = max(v["x"] for v in found.values())
    memory_gib = machine["memory_gb"]
    rows = []
    for model, component, module in components():
        count = sum(p.numel() for p in module.parameters())
        fp32, half = 4 * count, 2 * count
        rows.append({"model": model, "component": component, "parameters": count, "fp32_bytes": fp32,
                     "bf16_bytes": half, "fp16_bytes": half,
                     "expected_peak_fp32_gib": chosen["x"] * fp32 / 2**30,
                     "expected_peak_bf16_gib": chosen["x"] * half / 2**30,
                     "expected_peak_fp32_gib_upper": upper * fp32 / 2**30,
                     "fits_fp32": chosen["x"] * fp32 / 2**30 < memory_gib,
                     "fits_bf16": chosen["x"] * half / 2**30 < memory_gib})
    notes = [
        "What was done about it:", "",
        "- The 12 B transformer (44 GiB in fp32, 22 GiB in bf16) cannot be exported on this 23.5 GiB machine in any "
        "dtype diffship offers: its fp32 weights alone exceed the memory, and even a bf16 trace would need about "
        f"{next(r for r in rows if r['model'] == 'FLUX.1-dev')['expected_peak_bf16_gib']:.0f} GiB. diffship's fp32 "
        "export of it needs a machine with about "
        f"{next(r for r in rows if r['model'] == 'FLUX.1-dev')['expected_peak_fp32_gib']:.0f} GiB.",
        "- T5-XXL (17.7 GiB in fp32) cannot be exported here in fp32 either (it needs about "
        f"{next(r for r in rows if 'T5' in r['component'])['expected_peak_fp32_gib']:.0f} GiB); a bf16 trace would fit "
        "(about " f"{next(r for r in rows if 'T5' in r['component'])['expected_peak_bf16_gib']:.0f} GiB), but T5 is "
        "known to overflow in fp16, and bf16 ONNX graphs run on few ONNX Runtime CPU kernels: not done.",
        "- CLIP-L and the VAE export here in fp32 with room to spare.",
        "- The largest full-size component exported here is SD3 Medium's 2 B transformer "
        "(benchmarks/results/full_size_sd3.md), whose benchmark model therefore has narrow-depth stand-ins for "
        "SD3's CLIP-G and T5-XXL.",
    ]
    report = {"schema": "diffship-flux-memory/1", "date": now(), "command": " ".join(sys.argv), "machine": machine,
              "versions": versions(("diffship", "torch", "diffusers", "transformers")),
              "multipliers": found, "multiplier": {"source": source, **chosen}, "components": rows, "notes": notes}
    print(write_report(args.out, report, to_markdown(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
