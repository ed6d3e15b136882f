"""ONNX -> OpenVINO IR (openvino_model.xml/.bin), converted from the validated ONNX graph, with the weight
formats OpenVINO offers: fp16-compressed IR, NNCF int8 / int4 weights, and hybrid quantization of the UNet
(int8 weights for MatMul/Gather, int8 activations for the rest, calibrated on real denoising inputs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from diffship.layout import ONNX_MODEL, OPENVINO_DETOKENIZER, OPENVINO_MODEL, OPENVINO_TOKENIZER, TIMESTEP


def convert(onnx_model: onnx.ModelProto, base_dir: str | Path | None = None):
    """An in-memory openvino.Model from an ONNX graph (through a temporary file: OpenVINO reads paths). `base_dir`:
    where the graph's external data lie (a tracer's weight files), copied to the temporary file from there."""
    from diffship.graphs.external_data import save_model

    with tempfile.TemporaryDirectory(prefix="diffship-ov-") as scratch:
        path = Path(scratch) / ONNX_MODEL
        save_model(onnx_model, path, external_data_threshold=2**30, base_dir=base_dir)
        return convert_file(path)


def convert_file(onnx_path: str | Path):
    """An in-memory openvino.Model from an ONNX file (and its external data beside it), each input named as in
    the ONNX graph only: the frontend folds an input's no-op Cast (Flux's timestep.to(float32)) into the Parameter,
    whose tensor then also carries the Cast's output name, which get_any_name() may return."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    inputs = {value.name for value in onnx.load(str(onnx_path), load_external_data=False).graph.input}
    for parameter in model.get_parameters():
        names = parameter.output(0).get_names() & inputs
        if len(names) == 1:
            parameter.output(0).set_names(names)
    return model


def genai_timestep(model):
    """The model with its float `timestep` input (rank 0 or 1) replaced by OpenVINO GenAI's form, int64 [1]
    converted to float32 first thing (and squeezed back to rank 0 where the graph took a scalar). GenAI's C++
    pipelines set that tensor and nothing else; diffship's runtime re-exposes the float beneath the Convert
    (runtimes/openvino.float_timestep). Models without a float timestep are returned as they are."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    for index, old in enumerate(model.get_parameters()):
        if TIMESTEP not in old.output(0).get_names():
            continue
        shape = old.get_partial_shape()
        if not old.get_element_type().is_real() or shape.rank.is_dynamic or shape.rank.get_length() > 1:
            return model
        new = ops.parameter([1], ov.Type.i64, name=TIMESTEP)
        new.output(0).set_names({TIMESTEP})
        value = ops.convert(new, old.get_element_type())
        if shape.rank.get_length() == 0:
            value = ops.squeeze(value, ops.constant(np.array([0], dtype=np.int64)))
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(value.output(0))
        old.output(0).set_names(set())
        model.replace_parameter(index, new)
        model.validate_nodes_and_infer_types()
        return model
    return model


def convert_tokenizer(tokenizer, folder: Path, prompts) -> dict:
    """The tokenizer as OpenVINO models (openvino-tokenizers: what GenAI tokenizes with), written into `folder`
    beside the tokenizer's own files, and checked: the token ids it gives `prompts` against the tokenizer's own
    (truncated to its model_max_length, unpadded: GenAI pads to the text encoder's length itself). The prompts it
    tokenizes differently are reported, not refused: they concern GenAI only (diffship's runtime tokenizes with
    the tokenizer's own files), and the known case is openvino-tokenizers' own (SD 2.x's pad token "!", which the
    tokenizer splits out as a special token and openvino-tokenizers reads as punctuation), in Optimum's exports too."""
    import numpy as np
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer as to_openvino

    # Truncated to model_max_length here, as diffusers truncates: GenAI keeps the first tokens of what the model
    # gives, so without this a prompt past the limit would lose its end-of-text token (Optimum's exports do).
    models = to_openvino(tokenizer, with_detokenizer=True, truncation=True, max_length=tokenizer.model_max_length)
    files = []
    for model, name in zip(models, (OPENVINO_TOKENIZER, OPENVINO_DETOKENIZER)):
        ov.save_model(model, str(folder / name))
        files += [folder / name, (folder / name).with_suffix(".bin")]
    compiled = ov.Core().compile_model(str(folder / OPENVINO_TOKENIZER), "CPU")
    mismatches = []
    for prompt in prompts:
        expected = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        got = np.asarray(compiled([prompt])["input_ids"]).reshape(-1).tolist()
        if got != list(expected):
            mismatches.append(prompt)
    return {"files": [f.name for f in files], "checked_prompts": len(prompts), "mismatches": mismatches}


def weighted_ops(model, types=("MatMul", "Gather")) -> list[str]:
    """Names of the ops of `types` that take a constant (weight) input, directly or through a Convert."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() not in types:
            continue
        for value in op.input_values():
            source = value.get_node()
            if source.get_type_name() == "Convert":
                source = source.input_value(0).get_node()
            if source.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def compress_weights(model, weight_format: str, group_size: int = 64):
    """NNCF weight-only compression: int8 (asymmetric, per channel) or int4 (symmetric, grouped)."""
    import nncf

    if weight_format == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    if weight_format == "int4":
        # ratio=1.0: every eligible layer in int4, so the figures say what int4 does (no silent int8 backup).
        # Layers whose input channels do not divide into groups (small embeddings) get the largest group that does.
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

        return nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size, ratio=1.0,
            advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST),
        )
    raise ValueError(f"weight_format must be int8 or int4, got {weight_format!r}")


def hybrid_quantize(model, calibration: list[dict]):
    """Weights of MatMul/Gather compressed to int8; activations (and weights) of the other ops, convolutions
    above all, quantized to int8 with ranges measured on `calibration` (a list of input feeds)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    keep_for_weights_only = weighted_ops(model)
    compressed = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(types=["Convolution"])
    )
    return nncf.quantize(
        compressed,
        nncf.Dataset(calibration),
        subset_size=len(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=keep_for_weights_only, validate=False),
        # SmoothQuant off: UNet activations are not LLM-like outlier channels, and it costs accuracy here.
        advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1),
    )


def save(model, out_dir: str | Path, compress_to_fp16: bool = False) -> list[Path]:
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / OPENVINO_MODEL
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    return [xml, xml.with_suffix(".bin")]
