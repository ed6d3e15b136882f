"""A small, real CLIP byte-level BPE vocabulary, trained in code so no tokenizer is downloaded.

The layout follows OpenAI CLIP's vocab.json: the 256 byte-level symbols, the same 256 with the end-of-word
suffix "</w>", one entry per merge in priority order, then "<|startoftext|>" and "<|endoftext|>".
"""

from __future__ import annotations

import itertools
from collections import Counter

from tokenizers import Regex, normalizers, pre_tokenizers

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


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_clip_vocabulary(max_merges: int | None = None) -> tuple[dict[str, int], list[str]]:
    """Learn CLIP-style BPE merges on the prompt corpus; return (vocab, merges), identical on every run.

    The merges are learnt here rather than with `tokenizers`' trainer because the trainer breaks ties between
    equally frequent pairs in hash order, which changes from process to process; here ties go to the smaller
    pair. Words are split and byte-mapped by the same normalizer and pre-tokenizer CLIP uses.
    """
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts = Counter(
        word for line in _corpus() for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))
    )
    words = {tuple(w[:-1]) + (w[-1] + END_OF_WORD,): n for w, n in sorted(counts.items())}

    merges: list[str] = []
    while max_merges is None or len(merges) < max_merges:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(" ".join(best))
        words = {_merge(word, best): n for word, n in words.items()}

    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + END_OF_WORD for c in alphabet] + [m.replace(" ", "") for m in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


# ---- T5 ----------------------------------------------------------------------------------------------------------
T5_PAD_TOKEN, T5_EOS_TOKEN, T5_UNK_TOKEN = "<pad>", "</s>", "<unk>"
_T5_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-():"


def build_t5_tokenizer():
    """A small SentencePiece-style Unigram tokenizer laid out as T5's (<pad> 0, </s> 1, <unk> 2, "▁" word starts,
    </s> appended), over the prompt words above and single symbols: T5 is case-sensitive, so capitals are <unk>.
    Scores are fixed by hand (no trainer), so the vocabulary is the same on every run. A tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, processors

    words = sorted(set(_SUBJECTS + _ADJECTIVES + [w for phrase in _PHRASES for w in phrase.split()]))
    vocab = [(T5_PAD_TOKEN, 0.0), (T5_EOS_TOKEN, 0.0), (T5_UNK_TOKEN, 0.0)]
    vocab += [("\u2581" + word, -2.0 - 0.01 * i) for i, word in enumerate(words)]
    vocab += [("\u2581", -3.0)] + [(symbol, -5.0 - 0.01 * i) for i, symbol in enumerate(_T5_SYMBOLS)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # Split on any white space, then mark word starts: the pipeline transformers 5's T5TokenizerFast builds for a
    # Unigram vocabulary (it rebuilds it on load), so that the saved tokenizer.json says what transformers does.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS_TOKEN}",
                                                             pair=f"$A {T5_EOS_TOKEN} $B {T5_EOS_TOKEN}",
                                                             special_tokens=[(T5_EOS_TOKEN, 1)])
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return tokenizer
