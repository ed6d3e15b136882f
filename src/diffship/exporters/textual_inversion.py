"""Textual inversion embeddings baked into an export (`textual_inversions=[...]`,
`diffship export --textual-inversion FILE[:TOKEN]`).

Each embedding is added with diffusers' own loader (`load_textual_inversion`: the diffusers format, one token ->
one or several vectors, and Automatic1111's, `string_to_param` in a .pt or `emb_params` in a .safetensors): the
tokenizer learns the token (and `TOKEN_1`, `TOKEN_2`, ... for a multi-vector embedding) and the text encoder's
embedding table grows by as many rows. The exported text encoder holds the grown table, the exported tokenizer
folder is the tokenizer as it is then (saved, not copied from the source), and the numpy pipelines expand a
multi-vector token in a prompt as diffusers does (`CLIPTokenizer.maybe_convert_prompt`).

SDXL embeddings hold one tensor per text encoder (`clip_l` for `text_encoder`, `clip_g` for `text_encoder_2`),
each loaded into its own encoder under the same token. A file that names no token (a bare tensor, A1111's
safetensors, SDXL's) takes the token given after the colon, or its file name as Automatic1111 does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diffship.adapter_files import check_adapter_file, first_line
from diffship.errors import DiffshipError
from diffship.exporters.lora import file_sha256

SDXL_KEYS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}


@dataclass(frozen=True)
class Embedding:
    """One embedding to bake in: its file, the token the user asked for (None: the file's own, or its name), and
    the file's sha256."""

    path: Path
    token: str | None
    sha256: str

    def to_report(self, tokens: list[str]) -> dict:
        return {"file": str(self.path), "sha256": self.sha256, "tokens": tokens}


def check_textual_inversions(items, allow_pickle: bool = False, flag: str = "textual_inversions") -> list[Embedding]:
    """The embeddings to bake in, checked before any model is loaded: paths, or (path, token) pairs."""
    if items is None:
        return []
    if isinstance(items, (str, os.PathLike)) or (isinstance(items, tuple) and len(items) == 2
                                                  and isinstance(items[1], str) and os.sep not in items[1]):
        items = [items]
    checked = []
    for item in items:
        if isinstance(item, Embedding):
            checked.append(item)
            continue
        path, token = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"{flag}: each embedding is a file path or a (path, token) pair, got {item!r}")
        if token is not None and (not isinstance(token, str) or not token.strip() or token != token.strip()):
            raise ValueError(f"{flag} {path}: the token must be a non-empty string without surrounding spaces, "
                             f"got {token!r}")
        path = Path(path).expanduser()
        checked.append(Embedding(check_adapter_file(path, allow_pickle, flag, what="embedding"), token,
                                 file_sha256(path)))
    tokens = [e.token for e in checked if e.token is not None]
    if len(tokens) != len(set(tokens)):
        raise ValueError(f"{flag}: two embeddings are given the same token ({sorted(tokens)})")
    return checked


def apply_textual_inversions(pipe, embeddings: list[Embedding], flag: str = "textual_inversions") -> list[dict]:
    """Add every embedding to the PyTorch pipeline `pipe`; its report entries (file, sha256, tokens added)."""
    if embeddings and not hasattr(pipe, "load_textual_inversion"):
        raise DiffshipError(f"{flag}: diffusers' {type(pipe).__name__} takes no textual inversion")
    entries = []
    for embedding in embeddings:
        before = {name: set(getattr(pipe, name).get_vocab()) for _, name in SDXL_KEYS.values()
                  if getattr(pipe, name, None) is not None}
        try:
            _load(pipe, embedding)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
            raise DiffshipError(f"{flag} {embedding.path} does not fit this {type(pipe).__name__}: "
                                f"{first_line(e)}") from None
        added = sorted({token for name, vocab in before.items() for token in getattr(pipe, name).get_vocab()
                        if token not in vocab})
        entries.append(embedding.to_report(added))
    return entries


# A swappable export's text encoders get this many spare rows in their token embedding tables (zeros, named by no
# token), which pipe.load_textual_inversion fills at run time (pipelines/textual_inversion.py): a graph weight
# cannot grow. 64 rows hold several multi-vector embeddings; more need the embedding baked in at export.
RESERVED_TOKEN_ROWS = 64


def reserve_token_rows(pipe, rows: int = RESERVED_TOKEN_ROWS) -> dict[str, int]:
    """Add `rows` zero rows to each text encoder's token embedding table; {encoder: rows in its table now}."""
    import torch

    tables = {}
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        used = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(used + rows, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[used:] = 0
        tables[name] = used + rows
    return tables


def _load(pipe, embedding: Embedding) -> None:
    state = _read(embedding.path)
    token = embedding.token
    if isinstance(state, dict) and set(state) == set(SDXL_KEYS):
        token = token or embedding.path.stem
        for key, (encoder, tokenizer) in SDXL_KEYS.items():
            if getattr(pipe, encoder, None) is None:
                raise ValueError(f"it holds a {key} embedding for {encoder}, which this pipeline lacks")
            _check_width(state[key], getattr(pipe, encoder), f"its {key} vectors", encoder)
            pipe.load_textual_inversion(state[key], token=token, text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))
        return
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("an SDXL pipeline needs an embedding for each text encoder (clip_l and clip_g keys)")
    if isinstance(state, dict) and "string_to_param" in state:
        vectors = state["string_to_param"].get("*") if isinstance(state["string_to_param"], dict) else None
    elif isinstance(state, dict) and len(state) == 1:
        vectors = next(iter(state.values()))
        if token is None and next(iter(state)) == "emb_params":
            token = embedding.path.stem  # Automatic1111's safetensors carry no token: its file name is the token
    else:
        raise ValueError("it is neither diffusers' format (one token -> its vectors) nor Automatic1111's "
                         "(string_to_param or emb_params)")
    _check_width(vectors, pipe.text_encoder, "its vectors", "text_encoder")
    pipe.load_textual_inversion(state, token=token)


def _check_width(vectors, text_encoder, what: str, encoder: str) -> None:
    """diffusers' own message for this is garbled (an f-string left unformatted); name both widths instead."""
    import torch

    width = text_encoder.get_input_embeddings().weight.shape[-1]
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or vectors.shape[-1] != width:
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"{what} have shape {shape}, and the {encoder}'s token embeddings are {width} wide "
                         "(an embedding made for another model?)")


def _read(path: Path):
    """The file's tensors (safetensors) or object (a pickled .pt/.bin, allowed by the caller)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)
