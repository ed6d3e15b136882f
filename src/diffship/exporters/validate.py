"""Run an exported component through its target backend and through PyTorch on the same inputs."""

from __future__ import annotations

import numpy as np
import torch

from diffship.errors import ValidationError
from diffship.exporters.components import ComponentSpec

# Max abs error allowed per component at fp32. Graph rewrites and kernel choices reorder float sums, so
# exact equality is not expected; these bounds sit well above what correct exports show (about 1e-6 to
# 1e-5 on the tiny models, 1e-4 on full-size UNets) and well below what a wrong graph gives.
DEFAULT_ATOL = {"text_encoder": 1e-3, "unet": 1e-3, "vae_encoder": 1e-3, "vae_decoder": 2e-3}


def validation_inputs(spec: ComponentSpec, seed: int = 1) -> dict[str, torch.Tensor]:
    """Fresh inputs of the traced shapes and kinds, so the check does not reuse the tracing values."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, example in spec.example_inputs.items():
        if example.dtype in (torch.int64, torch.int32):
            high = int(example.max()) + 1 if name != "input_ids" else spec.module.text_encoder.config.vocab_size
            inputs[name] = torch.randint(0, max(high, 2), example.shape, generator=g, dtype=example.dtype)
        elif example.ndim == 0:
            inputs[name] = torch.tensor(float(torch.randint(1, 1000, (), generator=g)), dtype=example.dtype)
        else:
            inputs[name] = torch.randn(example.shape, generator=g, dtype=example.dtype)
    return inputs


def reference_outputs(spec: ComponentSpec, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = spec.module(*inputs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: t.float().numpy() for name, t in zip(spec.output_names, out)}


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs error, max error relative to the reference's largest magnitude, NaN count."""
    figures = {}
    for name, ref in reference.items():
        got = np.asarray(actual[name], dtype=np.float32)
        if got.shape != ref.shape:
            raise ValidationError(f"output {name} has shape {got.shape}, PyTorch gives {ref.shape}")
        err = np.abs(got - ref)
        max_abs = float(np.nanmax(err)) if err.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        figures[name] = {
            "max_abs": max_abs,
            "max_rel": max_abs / scale if scale else max_abs,
            "nan": int(np.isnan(got).sum()),
        }
    return figures


def validate(spec: ComponentSpec, session, backend: str, atol: float) -> dict:
    """Compare `session` to PyTorch; raise ValidationError naming the component beyond `atol`."""
    inputs = validation_inputs(spec)
    reference = reference_outputs(spec, inputs)
    actual = session.run({k: v.numpy() for k, v in inputs.items()})
    figures = compare(reference, actual)
    worst_name = max(figures, key=lambda n: figures[n]["max_abs"])
    worst = figures[worst_name]
    report = {"backend": backend, "atol": atol, "outputs": figures, "max_abs": worst["max_abs"]}
    if worst["nan"] or not worst["max_abs"] <= atol:
        raise ValidationError(
            f"{spec.name} on {backend} differs from PyTorch: output {worst_name} max abs error "
            f"{worst['max_abs']:.3g} > atol {atol:g}" + (f" ({worst['nan']} NaN)" if worst["nan"] else "")
            + ". The export was discarded; raise --atol only if you accept the error."
        )
    report["passed"] = True
    return report
