"""The errors diffship raises on purpose. Each message names what was wrong and what to do."""


class DiffshipError(Exception):
    """Base class: something about the user's input or files is wrong."""


class NotAPipelineError(DiffshipError):
    """A directory that is not an exported (or diffusers) pipeline."""


class MissingComponentError(DiffshipError):
    """A component the task needs is not in the directory."""


class BackendError(DiffshipError):
    """An unknown or unavailable backend, or a model file the backend cannot read."""


class ValidationError(DiffshipError):
    """An exported component differs from its PyTorch reference beyond tolerance."""


class HubError(NotAPipelineError):
    """A model that is neither a local directory nor a hub repo that can be reached or found in the cache."""


class GPUUnavailableError(BackendError):
    """A GPU path asked for where CUDA, an NVIDIA GPU, TensorRT or onnxruntime-gpu's providers are missing: the
    message names what is missing and the pip command that installs it."""
