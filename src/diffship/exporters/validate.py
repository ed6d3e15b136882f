"""Run an exported component through its target backend and through PyTorch on the same inputs."""

from __future__ import annotations

import numpy as np
import torch

from diffship.errors import ValidationError
from diffship.exporters.components import ComponentSpec

# Lower precisions are judged by the max error relative to the output's largest magnitude (max_rel), since
# their error scales with the values. Derivation (tests/test_precision.py measures them on the tiny models and
# the committed precision table on the full-size one): fp16 keeps 11 significant bits (rel. step 4.9e-4) and
# errors compound over a few dozen layers -> about 1e-3 measured, bound 2e-2. int8 weights (per-channel
# step 1/127 of the channel's range) give 1e-2 to 3e-2 measured, bound 1e-1; int4 (step 1/7 of a group's
# range) and hybrid (int8 activations too) give up to about 1.5e-1, bound 3e-1. These bounds catch broken
# graphs (NaN, wrong ops: max_rel near 1 or above) without failing honest quantization noise.
DEFAULT_RTOL = {"fp16": 2e-2, "int8": 1e-1, "int4": 3e-1, "hybrid": 3e-1}
# The bound under which OpenVINO runs a component in bf16 by default (exporters/formats.py measures it on the export
# machine). bf16 keeps 8 significant bits (rel. step 3.9e-3), fp32's range, so no overflow: its error is rounding,
# compounding over the layers to 1.5e-2 - 3e-2 measured on the tiny models and about 2e-2 on the full-size UNet;
# end to end that costs no attribute on the trained shapes model (README, "Precision and optimisation": 57 dB,
# accuracy within 0.6 points). A component beyond 5e-2 has lost more than rounding (a large dynamic range summed
# in low precision) and keeps f32.
BF16_RTOL = 5e-2


def validation_inputs(spec: ComponentSpec, shapes: dict[str, tuple[int, ...]] | None = None,
                      seed: int = 1) -> dict[str, torch.Tensor]:
    """Fresh inputs of the kinds traced, at `shapes` (default: the traced shapes), so that the check does not
    reuse the tracing values."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, example in spec.example_inputs.items():
        shape = tuple(shapes[name]) if shapes and name in shapes else tuple(example.shape)
        if example.dtype in (torch.int64, torch.int32):
            high = int(example.max()) + 1 if name != "input_ids" else spec.module.text_encoder.config.vocab_size
            inputs[name] = torch.randint(0, max(high, 2), shape, generator=g, dtype=example.dtype)
        elif example.dtype == torch.bool:  # a mask (SD3's skip_layers): both values, so both paths are checked
            inputs[name] = torch.rand(shape, generator=g) < 0.5
        elif example.ndim == 0 and name == "timestep":
            inputs[name] = torch.tensor(float(torch.randint(1, 1000, (), generator=g)), dtype=example.dtype)
        elif example.ndim == 0:  # a scale (a ControlNet's conditioning_scale): around the traced value
            inputs[name] = example * (0.5 + torch.rand((), generator=g, dtype=example.dtype))
        elif name == "timestep":  # a timestep per batch item (the transformers'), in the training range
            inputs[name] = (torch.rand(shape, generator=g) * 999 + 1).to(example.dtype)
        else:
            inputs[name] = torch.randn(shape, generator=g, dtype=example.dtype)
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


def describe_shapes(shapes: dict[str, list[int]]) -> str:
    """`sample [2, 4, 5, 9], encoder_hidden_states [2, 77, 32]`: the inputs that are not scalars."""
    return ", ".join(f"{name} {shape}" for name, shape in shapes.items() if shape)


class Reference:
    """PyTorch's outputs for one component on fixed fresh inputs, at every shape set the component is validated
    at (the traced one, and for dynamic graphs others: spec.validation_shapes), computed once and compared many
    times."""

    def __init__(self, spec: ComponentSpec, seed: int = 1):
        self.spec = spec
        self.cases = []  # (feeds, outputs) per shape set, the traced one first
        for shapes in spec.validation_shapes():
            inputs = validation_inputs(spec, shapes, seed)
            self.cases.append(({k: v.numpy() for k, v in inputs.items()}, reference_outputs(spec, inputs)))

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        """The inputs at the traced shapes (what graph passes that need sample data, such as fp16 overflow
        detection, run on)."""
        return self.cases[0][0]

    def measure(self, session, backend: str = "the backend", traced_only: bool = False) -> dict:
        """Figures per shape set (`cases`; with `traced_only`, the traced one alone, as for the record of each
        graph pass, which the final check covers at every shape) and the worst max abs error over them, without
        judging. A graph that cannot run a shape set raises ValidationError naming the component and the shapes."""
        cases = []
        for feeds, outputs in self.cases[:1] if traced_only else self.cases:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            try:
                result = session.run(feeds)
            except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the export is what is wrong
                raise ValidationError(
                    f"{self.spec.name} on {backend} cannot run at {describe_shapes(shapes)}: "
                    f"{_one_line(e.__cause__ or e)} (PyTorch runs these shapes: the graph has a size baked in "
                    "that the model does not). The export was discarded."
                ) from e
            figures = compare(outputs, result)
            worst = max(figures, key=lambda n: (figures[n]["nan"] > 0, figures[n]["max_abs"]))
            cases.append({"inputs": shapes, "worst_output": worst,
                          "max_abs": figures[worst]["max_abs"], "max_rel": max(f["max_rel"] for f in figures.values()),
                          "nan": sum(f["nan"] for f in figures.values()), "outputs": figures})
        worst_case = max(cases, key=lambda c: (c["nan"] > 0, c["max_abs"]))
        return {"outputs": worst_case["outputs"], "worst_output": worst_case["worst_output"],
                "max_abs": worst_case["max_abs"], "max_rel": max(c["max_rel"] for c in cases),
                "nan": sum(c["nan"] for c in cases), "cases": cases}

    def check(self, session, backend: str, atol: float | None = None, rtol: float | None = None,
              precision: str = "fp32") -> dict:
        """Measure and judge: max abs error within `atol` (fp32) or max relative error within `rtol` (lower
        precisions) at every shape set; raise ValidationError naming the component and the shapes otherwise, and
        on any NaN."""
        report = {"backend": backend, "precision": precision, **self.measure(session, backend)}
        metric, bound, flag, what = (("max_abs", atol, "atol", "max abs error") if atol is not None
                                     else ("max_rel", rtol, "rtol", "max relative error"))
        report[flag] = bound
        worst = max(report["cases"], key=lambda c: (c["nan"] > 0, c[metric]))
        if worst["nan"] or not worst[metric] <= bound:
            raise ValidationError(
                f"{self.spec.name} on {backend} ({precision}) differs from PyTorch at "
                f"{describe_shapes(worst['inputs'])}: output "
                f"{worst['worst_output']} {what} {worst[metric]:.3g} > {flag} {bound:g}"
                + (f" ({worst['nan']} NaN)" if worst["nan"] else "")
                + ". The export was discarded; loosen the tolerance only if you accept the error."
            )
        report["passed"] = True
        return report


def _one_line(error: Exception) -> str:
    """A runtime's error on one line: OpenVINO prefixes each message with 'Exception from <file>:<line>:'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception from ")] or lines or [type(error).__name__]
    text = " ".join(lines)
    return text if len(text) <= 400 else text[:400] + "..."


def validate(spec: ComponentSpec, session, backend: str, atol: float) -> dict:
    """Compare `session` to PyTorch; raise ValidationError naming the component beyond `atol`."""
    return Reference(spec).check(session, backend, atol=atol)
