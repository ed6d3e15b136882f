"""ONNX graph passes and inspection: pure functions ModelProto -> ModelProto, plus saving."""

from diffship.graphs.external_data import TWO_GB, save_model

__all__ = ["TWO_GB", "save_model"]
