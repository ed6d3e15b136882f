"""The CLIP tokenizer (and SD3's T5 tokenizer), from the `tokenizers` library alone (no transformers, no torch).

A tokenizer folder holds either `tokenizer.json` (a fast tokenizer, as transformers >= 5 writes it) or only
`vocab.json` + `merges.txt` (as older exports, Optimum's included, write it). Both give the ids
transformers' CLIPTokenizer gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from diffship.checks import read_json_object
from diffship.errors import DiffshipError, MissingComponentError

# The settings read from tokenizer_config.json and special_tokens_map.json, with their JSON types (special tokens
# are strings or AddedToken objects; transformers writes model_max_length as a huge number when none was set).
_TOKEN = (str, dict, None)
CONFIG_FIELDS = {"model_max_length": float, "bos_token": _TOKEN, "eos_token": _TOKEN, "pad_token": _TOKEN,
                 "unk_token": _TOKEN}

# CLIP's word split: contractions, letter runs, single digits, runs of other symbols.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token(value) -> str | None:
    """Special tokens are saved as plain strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """Turns prompts into padded int64 id arrays the text encoder takes."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int, bos_token: str, eos_token: str, pad_token: str):
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.name_or_path: str | None = None  # the folder it was read from (transformers' name): what a save copies
        # Tokens added to the vocabulary (the special ones, and a textual inversion's: TOKEN, TOKEN_1, ...).
        self.added_tokens = {token.content for token in tokenizer.get_added_tokens_decoder().values()}

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise MissingComponentError(f"the tokenizer's vocabulary has no special token {token!r}")
        return token_id

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k not in config})
        bos = _token(config.get("bos_token")) or "<|startoftext|>"
        eos = _token(config.get("eos_token")) or "<|endoftext|>"
        pad = _token(config.get("pad_token")) or eos
        unk = _token(config.get("unk_token")) or eos
        max_length = int(config.get("model_max_length", 77))
        if max_length > 10_000:  # transformers writes a huge sentinel when no length was set
            max_length = 77

        if (folder / "tokenizer.json").is_file():
            try:
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises its own exception for a malformed file
                raise DiffshipError(f"{folder / 'tokenizer.json'} is not a tokenizer file the tokenizers library "
                                    f"reads: {e}") from e
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = _clip_bpe(folder / "vocab.json", folder / "merges.txt", unk)
            # Special tokens are whole tokens, never split by the BPE (as transformers registers them).
            tokenizer.add_special_tokens(list(dict.fromkeys([bos, eos, pad, unk])))
        else:
            raise MissingComponentError(
                f"{folder} holds no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
            )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        result = cls(tokenizer, max_length, bos, eos, pad)
        result.name_or_path = str(folder)
        # Post-processing adds <|startoftext|> ... <|endoftext|>, as CLIP was trained with.
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos, result.eos_token_id), (bos, result.bos_token_id), trim_offsets=False, add_prefix_space=False
        )
        return result

    def maybe_convert_prompt(self, prompt: str) -> str:
        """A multi-vector textual inversion token (TOKEN with TOKEN_1, TOKEN_2, ... in the vocabulary) written out
        as all its tokens, "TOKEN TOKEN_1 TOKEN_2", as diffusers' pipelines rewrite every prompt before tokenizing
        it (TextualInversionLoaderMixin.maybe_convert_prompt); any other prompt is returned as it is."""
        for token in set(self._tokenizer.encode(prompt, add_special_tokens=False).tokens) & self.added_tokens:
            count = 1
            while f"{token}_{count}" in self.added_tokens:
                count += 1
            if count > 1:
                prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, count)]))
        return prompt

    def has_token(self, token: str) -> bool:
        """Whether `token` is in the vocabulary (added tokens included)."""
        return self._tokenizer.token_to_id(token) is not None

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens to the vocabulary as transformers' tokenizers add a textual inversion's (whole, normalized
        like the text); their ids, the next free ones."""
        self._tokenizer.add_tokens([AddedToken(token, normalized=True) for token in tokens])
        self.added_tokens |= set(tokens)
        return [self._tokenizer.token_to_id(token) for token in tokens]

    def _encode_batch(self, prompts: list[str]):
        return self._tokenizer.encode_batch([self.maybe_convert_prompt(p) for p in prompts])

    def __call__(self, prompts: list[str], max_length: int | None = None, truncation: bool = True) -> np.ndarray:
        """ids [len(prompts), max_length], padded with the pad token and truncated keeping the end token."""
        max_length = max_length or self.model_max_length
        ids = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int64)
        for row, encoding in enumerate(self._encode_batch(list(prompts))):
            tokens = encoding.ids
            if len(tokens) > max_length:
                if not truncation:
                    raise ValueError(f"prompt {row} has {len(tokens)} tokens, more than {max_length}")
                tokens = tokens[: max_length - 1] + [self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def truncated(self, prompts: list[str], max_length: int | None = None) -> list[str]:
        """The text that `__call__` cuts from each prompt ('' where it fits): the tokens between the kept part
        and the end token, decoded, as diffusers reports them."""
        max_length = max_length or self.model_max_length
        return [self.decode(e.ids[max_length - 1:-1]) if len(e.ids) > max_length else ""
                for e in self._encode_batch(list(prompts))]

    def untruncated_length(self, prompt: str) -> int:
        return len(self._encode_batch([prompt])[0].ids)

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True).replace("</w>", " ").strip()

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()


class T5Tokenizer:
    """T5's SentencePiece (Unigram) tokenizer, read from the tokenizer.json transformers' T5TokenizerFast writes:
    prompts -> int64 ids padded with <pad> and truncated keeping the final </s>, as the fast tokenizer gives them
    with padding="max_length", truncation=True."""

    def __init__(self, tokenizer: Tokenizer, model_max_length: int, eos_token: str, pad_token: str):
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        self.name_or_path: str | None = None

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise MissingComponentError(f"the T5 tokenizer's vocabulary has no special token {token!r}")
        return token_id

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "T5Tokenizer":
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k not in config})
        if not (folder / "tokenizer.json").is_file():
            # spiece.model alone would need sentencepiece; every T5TokenizerFast save writes tokenizer.json.
            raise MissingComponentError(f"{folder} holds no tokenizer.json (a T5 tokenizer as transformers' "
                                        "T5TokenizerFast saves it)")
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own exception for a malformed file
            raise DiffshipError(f"{folder / 'tokenizer.json'} is not a tokenizer file the tokenizers library "
                                f"reads: {e}") from e
        tokenizer.no_truncation()
        tokenizer.no_padding()
        max_length = int(config.get("model_max_length", 512))
        result = cls(tokenizer, max_length if max_length <= 10_000 else 512,
                     _token(config.get("eos_token")) or "</s>", _token(config.get("pad_token")) or "<pad>")
        result.name_or_path = str(folder)
        return result

    def _encode_batch(self, prompts: list[str]):
        return self._tokenizer.encode_batch(list(prompts))

    def __call__(self, prompts: list[str], max_length: int | None = None) -> np.ndarray:
        """ids [len(prompts), max_length]: </s> ends each prompt; longer prompts keep their first max_length - 1
        tokens and the </s>."""
        max_length = max_length or self.model_max_length
        ids = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int64)
        for row, encoding in enumerate(self._encode_batch(prompts)):
            tokens = encoding.ids
            if len(tokens) > max_length:
                tokens = tokens[: max_length - 1] + [self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def truncated(self, prompts: list[str], max_length: int | None = None) -> list[str]:
        """The text `__call__` cuts from each prompt ('' where it fits)."""
        max_length = max_length or self.model_max_length
        return [self.decode(e.ids[max_length - 1:-1]) if len(e.ids) > max_length else ""
                for e in self._encode_batch(prompts)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()


def _clip_bpe(vocab_path: Path, merges_path: Path, unk: str) -> Tokenizer:
    vocab = read_json_object(vocab_path)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise DiffshipError(f"{vocab_path} must map each token to an integer id")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DiffshipError(f"{merges_path} is not a UTF-8 text file: {e}") from e
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise DiffshipError(f"{merges_path}: merge {bad + 1} is {' '.join(merges[bad])!r}; each line after "
                            "#version holds two tokens separated by one space")
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                   fuse_unk=False, unk_token=unk)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_json(path: Path) -> dict:
    """An optional settings file: {} when absent."""
    return read_json_object(path, CONFIG_FIELDS) if path.is_file() else {}
