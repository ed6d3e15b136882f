"""Adapter files (LoRAs, textual inversion embeddings) checked before anything is loaded. Shared by the adapters an
export bakes in (exporters/lora.py, exporters/textual_inversion.py) and the ones the pipelines load at run time
(`diffship generate --lora / --textual-inversion`), so it imports neither torch nor the exporters."""

from __future__ import annotations

from pathlib import Path

from diffship.errors import DiffshipError

# Suffixes of pickled weights: loading them runs code, so they are read only when the user allows it.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
ALLOW_PICKLE_ADVICE = ("pickled weights run code when loaded: export with --allow-pickle (allow_pickle=True) only "
                       "if you trust where they come from")
# Run-time adapters are read with safetensors' numpy reader only: a pickled file can be baked in at export instead.
RUN_TIME_PICKLE_ADVICE = ("run-time adapters are read from .safetensors files (pickled files run code when loaded); "
                          "bake it in at export instead (diffship export --lora/--textual-inversion --allow-pickle)")


def check_adapter_file(path: Path, allow_pickle: bool, flag: str, what: str = "LoRA",
                       pickle_advice: str = ALLOW_PICKLE_ADVICE) -> Path:
    """An adapter file (a LoRA, an embedding) that exists and can be read: a .safetensors file whose header
    safetensors reads, or a pickled one (.pt, .bin, ...) only with `allow_pickle` (else refused with
    `pickle_advice`). Returns its absolute path."""
    if not path.exists():
        raise DiffshipError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise DiffshipError(f"{flag} {path}: not a file; give the {what}'s .safetensors file")
    if path.name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise DiffshipError(f"{flag} {path} is a pickled file; {pickle_advice}")
        return path.resolve()
    safetensors_keys(path, flag, what)
    return path.resolve()


def safetensors_keys(path: Path, flag: str, what: str) -> list[str]:
    """The tensor names in a safetensors file's header (the file is not read further)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffshipError(f"{flag} {path} is not a safetensors file that can be read ({first_line(e)}); "
                            f"give the {what} saved as .safetensors") from None


def first_line(error) -> str:
    """An error's first line, with the next one when it only introduces it (torch's "Error(s) in loading
    state_dict for UNet2DConditionModel:" / "size mismatch for ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
