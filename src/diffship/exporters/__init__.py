"""PyTorch -> ONNX per component, ONNX -> OpenVINO IR, validated against PyTorch. Needs torch."""

from diffship.exporters.export_pipeline import export

__all__ = ["export"]
