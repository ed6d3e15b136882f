"""ONNX -> OpenVINO IR (openvino_model.xml/.bin), converted from the validated ONNX graph."""

from __future__ import annotations

from pathlib import Path

OV_MODEL_FILE = "openvino_model.xml"


def convert_to_openvino(onnx_path: str | Path, out_dir: str | Path, compress_to_fp16: bool = False) -> list[Path]:
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    xml = out_dir / OV_MODEL_FILE
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    return [xml, xml.with_suffix(".bin")]
