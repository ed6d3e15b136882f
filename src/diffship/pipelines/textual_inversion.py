"""Textual inversion at run time: diffusers' `load_textual_inversion` on a `swappable_lora` export.

Such an export's text encoders have RESERVED_TOKEN_ROWS spare rows at the end of their token embedding tables
(exporters/textual_inversion.py). Loading an embedding adds its tokens to the numpy tokenizer (TOKEN, TOKEN_1, ...
for a multi-vector one, as diffusers names them; the tokenizer writes a multi-vector token out in prompts), whose
ids are the next free rows, and the text encoder's session is rebuilt with those rows holding the vectors (the
same weight swap as run-time LoRA, pipelines/lora.py). Files: diffusers' format ({token: vectors}),
Automatic1111's .safetensors ({"emb_params": vectors}, the token is the file's name) and SDXL's pairs
({"clip_l", "clip_g"}: both encoders at once, or one array per call with `text_encoder=`/`tokenizer=` as diffusers
documents). Pickled .pt embeddings run code when read: convert them, or bake them in at export.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffship.errors import DiffshipError
from diffship.layout import TEXT_ENCODER, TEXT_ENCODER_2, TOKENIZER, TOKENIZER_2
from diffship.pipelines.lora import read_safetensors, token_table
from diffship.pipelines.tokenizer import CLIPTokenizer

# An SDXL embedding file's keys -> the encoder and tokenizer each belongs to.
SDXL_KEYS = {"clip_l": (TEXT_ENCODER, TOKENIZER), "clip_g": (TEXT_ENCODER_2, TOKENIZER_2)}


def parse_textual_inversion_flag(text: str) -> tuple[str, str | None]:
    """`--textual-inversion FILE[:TOKEN]` (export and generate) -> (FILE, TOKEN or None). An existing file's name
    is taken whole, so a path with a colon works without a token."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).expanduser().exists() or "/" in tail or os.sep in tail:
        return text, None
    return head, tail


class TextualInversionLoaderMixin:
    """diffusers' textual inversion methods, for pipelines whose export was made with `swappable_lora=True`."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               **kwargs) -> None:
        """Add an embedding (a .safetensors file, a folder holding `weight_name` or
        learned_embeds.safetensors, a {token: vectors} dict, or an array of vectors with `token`), or a list of
        them with a list of tokens. `text_encoder` / `tokenizer`: the pipeline's second ones for SDXL's clip_g
        vectors given alone."""
        unknown = set(kwargs) - {"weight_name"}
        if unknown:
            raise TypeError(f"load_textual_inversion got unexpected arguments {sorted(unknown)}")
        sources = pretrained_model_name_or_path
        if isinstance(sources, (list, tuple)):
            tokens = token if isinstance(token, (list, tuple)) else [token] * len(sources)
            if len(tokens) != len(sources):
                raise ValueError(f"You have passed a list of models of length {len(sources)}, and list of tokens "
                                 f"of length {len(tokens)}: they must be the same length")
            for source, one_token in zip(sources, tokens):
                self.load_textual_inversion(source, one_token, tokenizer, text_encoder, **kwargs)
            return
        state, file = _read_embedding(sources, kwargs.get("weight_name"))
        targets = self._embedding_targets(tokenizer, text_encoder)
        if set(state) == set(SDXL_KEYS):
            if text_encoder is not None:
                raise ValueError(f"{file} holds vectors for both text encoders (clip_l, clip_g): load it without "
                                 "text_encoder=, or give one encoder's array")
            token = token or _stem(file)
            pairs = [((encoder, tok), state[key]) for key, (encoder, tok) in SDXL_KEYS.items()]
        else:
            if len(state) != 1:
                raise DiffshipError(f"{file}: neither diffusers' format (one token -> its vectors), Automatic1111's "
                                    "(emb_params) nor SDXL's (clip_l and clip_g)")
            key, vectors = next(iter(state.items()))
            if token is None and isinstance(sources, np.ndarray):
                raise ValueError("token= is needed with an array of vectors")
            if token is None:
                token = _stem(file) if key == "emb_params" else key
            if len(targets) > 1 and text_encoder is None:
                raise DiffshipError(f"{file}: an SDXL pipeline needs vectors for each text encoder: give an SDXL "
                                    "embedding file (clip_l and clip_g), or load each encoder's with text_encoder= "
                                    "and tokenizer=")
            pairs = [(targets[0], vectors)]
        self._add_embedding(file, token, pairs)

    def _embedding_targets(self, tokenizer, text_encoder) -> list[tuple[str, str]]:
        """(encoder, tokenizer) names the vectors go to: the one given, or every text encoder."""
        if text_encoder is None:
            return [(e, t) for e, t in SDXL_KEYS.values() if getattr(self, e, None) is not None]
        for encoder, tok in SDXL_KEYS.values():
            if text_encoder is getattr(self, encoder, None):
                if tokenizer is not None and tokenizer is not getattr(self, tok):
                    raise ValueError(f"tokenizer must be the pipeline's {tok} for its {encoder}")
                return [(encoder, tok)]
        raise ValueError("text_encoder must be one of this pipeline's text encoders (pipe.text_encoder or "
                         "pipe.text_encoder_2)")

    def _add_embedding(self, file: str, token, pairs) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError(f"token must be a non-empty string, got {token!r}")
        maps = self._lora_maps()
        state = self._lora_state()
        planned = []
        for (encoder, tok), vectors in pairs:  # every check before anything is added
            vectors = np.asarray(vectors, dtype=np.float32)
            vectors = vectors[None] if vectors.ndim == 1 else vectors
            table = maps[encoder]["layers"][token_table(maps[encoder])]["shape"]
            if vectors.ndim != 2 or vectors.shape[1] != table[1]:
                raise DiffshipError(f"{file}: its vectors have shape {list(vectors.shape)}, and the {encoder}'s "
                                    f"token embeddings are {table[1]} wide (an embedding made for another model?)")
            tokenizer = getattr(self, tok)
            tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
            taken = [t for t in tokens if tokenizer.has_token(t)]
            if taken:
                raise ValueError(f"Token {taken[0]} already in tokenizer vocabulary. Please choose a different "
                                 "token name or remove it first with unload_textual_inversion")
            if len(tokenizer) + len(tokens) > table[0]:
                raise DiffshipError(f"{file}: the {encoder}'s table has {table[0] - len(tokenizer)} spare rows left "
                                    f"and the embedding needs {len(tokens)}: bake it in at export "
                                    "(--textual-inversion)")
            planned.append((encoder, tokenizer, tokens, vectors))
        for encoder, tokenizer, tokens, vectors in planned:
            ids = tokenizer.add_tokens(tokens)
            state.rows.setdefault(encoder, {}).update(zip(ids, vectors))
        self._apply_adapters()

    def unload_textual_inversion(self, tokens=None, tokenizer=None, text_encoder=None) -> None:
        """Remove every embedding loaded at run time (diffusers' `tokens=` selection is not supported: all go);
        the tokenizers are read again from the export."""
        if tokens is not None:
            raise DiffshipError("unload_textual_inversion removes every run-time embedding here: call it without "
                                "tokens=, then load the ones to keep")
        state = self._lora_state()
        for encoder, tok in SDXL_KEYS.values():
            if state.rows.pop(encoder, None) is not None:
                loaded = getattr(self, tok)
                fresh = CLIPTokenizer.from_pretrained(loaded.name_or_path)
                setattr(self, tok, fresh)
                self.tokenizers[tok] = fresh
        self._apply_adapters()


def _stem(file: str) -> str:
    return Path(file).stem


def _read_embedding(source, weight_name: str | None) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(source, np.ndarray):
        return {"emb_params": source}, "the vectors given"
    if isinstance(source, dict):
        return {k: np.asarray(v) for k, v in source.items()}, "the state dict given"
    return read_safetensors(
        source, weight_name or "learned_embeds.safetensors",
        missing="embedding file {path} does not exist: give a .safetensors file, a folder holding one (weight_name), "
                "or the vectors",
        pickled="run-time textual inversion reads .safetensors files (pickled .pt/.bin files run code when loaded); "
                "convert it, or bake it in at export with --textual-inversion and --allow-pickle")
