"""Our tokenizers-based SAM 3 tokenizer gives transformers' CLIPTokenizer ids from the same vocabulary and merges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml_backend.errors import ModelSourceError
from ml_backend.sam3.tokenizer import Sam3Tokenizer, read_vocabulary


PHRASES = [
    "cat", "Cat", "CAT", "tabby cat", "  yellow   school\tbus ", "traffic-light", "dog's toy", "t-shirt (red)",
    "Golden Retriever!!", "café", "naïve résumé", "日本の猫", "🐱 emoji cat", "3 apples", "x", "",
    "ﬁsh ligature", "e\u0301 combining accent",
    "a very long label phrase " * 8,  # truncated: the first 30 tokens, then the end token
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam3_factory import train_vocabulary

    directory = tmp_path_factory.mktemp("bpe")
    train_vocabulary(directory)
    return directory


def test_ids_and_mask_equal_transformers_clip_tokenizer(vocab_dir: Path) -> None:
    from transformers import CLIPTokenizer

    ours = Sam3Tokenizer.from_directory(vocab_dir)
    ids, mask = ours(PHRASES)
    reference = CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))
    expected = reference(PHRASES, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.shape == (len(PHRASES), 32)
    assert mask[-1].all() and ids[-1, -1] == ours.end_id  # the long phrase is cut and still ends with the end token
    assert mask[PHRASES.index("")].sum() == 2  # start and end only
    assert len({tuple(row) for row in ids[:3]}) == 1  # lower-cased: Cat, CAT and cat are one phrase


def test_same_ids_from_every_layout(vocab_dir: Path, tmp_path: Path) -> None:
    """vocab.json + merges.txt, a tokenizer.json, and a keras-hub preset's assets give one tokenizer."""
    from transformers import CLIPTokenizer

    CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt")).save_pretrained(
        str(tmp_path / "hf"))
    assets = tmp_path / "keras" / "assets" / "tokenizer"
    assets.mkdir(parents=True)
    (assets / "vocabulary.json").write_text((vocab_dir / "vocab.json").read_text())
    (assets / "merges.txt").write_text("#version: 0.2\n" + (vocab_dir / "merges.txt").read_text())
    expected = Sam3Tokenizer.from_directory(vocab_dir)(PHRASES)[0]
    for directory in (tmp_path / "hf", tmp_path / "keras"):
        np.testing.assert_array_equal(Sam3Tokenizer.from_directory(directory)(PHRASES)[0], expected)


def test_missing_vocabulary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="tokenizer"):
        read_vocabulary(tmp_path)
    with pytest.raises(ModelSourceError, match="startoftext"):
        Sam3Tokenizer({"a": 0, "<|endoftext|>": 1}, [])
