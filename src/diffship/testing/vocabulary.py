"""A small, real CLIP byte-level BPE vocabulary, trained in code so no tokenizer is downloaded.

The layout follows OpenAI CLIP's vocab.json: the 256 byte-level symbols, the same 256 with the end-of-word
suffix "</w>", one entry per merge in priority order, then "<|startoftext|>" and "<|endoftext|>".
"""

from __future__ import annotations

import itertools
import json

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words users type into prompts; the corpus is every pairing of them, so frequent fragments become merges.
_SUBJECTS = (
    "cat dog horse bird fish astronaut robot castle mountain river forest city street car boat house tree "
    "flower garden portrait face woman man child dragon ship planet moon sun sky ocean beach lake bridge "
    "circle square triangle star heart cube sphere apple banana cup chair table window door road train"
).split()
_ADJECTIVES = (
    "red green blue yellow orange purple black white gray brown pink golden silver dark bright small large "
    "tiny huge old new beautiful ugly happy sad shiny matte wooden metal glass stone painted detailed blurry "
    "sharp realistic abstract cinematic dramatic soft hard warm cold misty sunny rainy snowy"
).split()
_PHRASES = (
    "a photo of, an oil painting of, a drawing of, a render of, high quality, low quality, highly detailed, "
    "on the left, on the right, on the top, on the bottom, in the center, by a famous artist, trending on, "
    "in the style of, at night, at sunset, in the morning, close up, wide angle, 4k, 8k, hdr, octane render"
).split(", ")


def _corpus() -> list[str]:
    lines = [f"{p} a {a} {s}" for p, a, s in itertools.product(_PHRASES, _ADJECTIVES, _SUBJECTS)]
    return lines + [" ".join(_SUBJECTS), " ".join(_ADJECTIVES), "0 1 2 3 4 5 6 7 8 9 , . ! ? ' - ( ) :"]


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes, in byte order."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for b in range(256):
        if b in visible:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_clip_vocabulary(max_merges: int | None = None) -> tuple[dict[str, int], list[str]]:
    """Train a CLIP-style BPE on the prompt corpus; return (vocab, merges), deterministic.

    All merges the corpus yields are kept unless `max_merges` caps them (merges are in priority order, so a
    prefix is still a consistent BPE).
    """
    alphabet = byte_level_alphabet()
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, initial_alphabet=alphabet, end_of_word_suffix=END_OF_WORD, show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)

    trained = json.loads(bpe.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in trained][:max_merges]

    vocab: dict[str, int] = {}
    for token in alphabet + [c + END_OF_WORD for c in alphabet] + [m.replace(" ", "") for m in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges
