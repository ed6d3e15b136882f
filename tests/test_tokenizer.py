"""The torch-free CLIP tokenizer gives transformers' ids, from tokenizer.json or from vocab.json + merges.txt."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffship.pipelines.tokenizer import CLIPTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "Hello   WORLD!! 123 ééé don't (stop) — ok?",
    "word " * 120,  # longer than 77 tokens: truncated, keeping the end token
    "<|endoftext|> red circle",
]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("form", ["tokenizer.json", "vocab+merges"])
def test_ids_match_transformers(kind, form, tiny_model_dirs, tmp_path):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    folder = tiny_model_dirs(kind) / "tokenizer"
    reference = ReferenceTokenizer.from_pretrained(folder)
    if form == "vocab+merges":
        folder = shutil.copytree(folder, tmp_path / "tokenizer")
        (folder / "tokenizer.json").unlink()
    ours = CLIPTokenizer.from_pretrained(folder)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    ids = ours(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, expected.input_ids)
    assert ours.pad_token_id == reference.pad_token_id


def test_missing_tokenizer_files(tmp_path):
    from diffship.errors import MissingComponentError

    with pytest.raises(MissingComponentError, match="holds no tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path)
