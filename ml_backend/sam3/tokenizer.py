"""SAM 3's CLIP byte-pair tokenizer on Hugging Face ``tokenizers``, from a checkpoint's own vocabulary and merges.

keras-hub's ``SAM3Tokenizer`` runs on TensorFlow string ops, which we do not install. This builds the same
CLIP BPE as ``transformers.CLIPTokenizer`` (NFC, whitespace collapsed, lower case, CLIP's split pattern,
byte-level alphabet, ``</w>`` word ends) and packs phrases the way SAM 3 reads them: start token, the phrase,
end token, padded with the end token to ``sequence_length`` (32); a longer phrase keeps its first
``sequence_length - 2`` tokens and still ends with the end token (Meta's tokenizer and transformers'
``truncation=True`` do the same). ``tests/test_sam3_tokenizer.py`` proves the ids equal to transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ml_backend.errors import ModelSourceError

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
SEQUENCE_LENGTH = 32
CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        left, _, right = line.partition(" ")
        merges.append((left, right))
    return merges


def read_vocabulary(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a Hugging Face checkpoint or a keras-hub preset directory."""
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
        return model["vocab"], merges
    for vocab_file, merges_file in (("vocab.json", "merges.txt"),
                                    ("assets/tokenizer/vocabulary.json", "assets/tokenizer/merges.txt")):
        if (directory / vocab_file).is_file() and (directory / merges_file).is_file():
            vocab = json.loads((directory / vocab_file).read_text(encoding="utf-8"))
            return vocab, _read_merges(directory / merges_file)
    raise ModelSourceError(
        f"No SAM 3 tokenizer vocabulary in {directory}: expected tokenizer.json, vocab.json + merges.txt, "
        "or a keras-hub preset's assets/tokenizer/vocabulary.json + merges.txt."
    )


class Sam3Tokenizer:
    """Phrases to the (token_ids, padding_mask) pair SAM 3's text encoder reads."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 sequence_length: int = SEQUENCE_LENGTH) -> None:
        for token in (START_TOKEN, END_TOKEN):
            if token not in vocab:
                raise ModelSourceError(f"SAM 3 vocabulary has no {token} token")
        if sequence_length < 3:
            raise ValueError("sequence_length must leave room for a token between start and end")
        self.start_id = vocab[START_TOKEN]
        self.end_id = vocab[END_TOKEN]
        self.sequence_length = sequence_length
        bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                  end_of_word_suffix="</w>", fuse_unk=False, unk_token=END_TOKEN)
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])

    @classmethod
    def from_directory(cls, directory: Path, sequence_length: int = SEQUENCE_LENGTH) -> "Sam3Tokenizer":
        vocab, merges = read_vocabulary(Path(directory))
        return cls(vocab, merges, sequence_length)

    def __call__(self, phrases: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, sequence_length) int32 token ids and padding mask (1 for start, phrase and end tokens)."""
        ids = np.full((len(phrases), self.sequence_length), self.end_id, dtype=np.int32)
        mask = np.zeros((len(phrases), self.sequence_length), dtype=np.int32)
        for row, encoding in enumerate(self._tokenizer.encode_batch(list(phrases), add_special_tokens=False)):
            body = encoding.ids[: self.sequence_length - 2]
            packed = [self.start_id, *body, self.end_id]
            ids[row, : len(packed)] = packed
            mask[row, : len(packed)] = 1
        return ids, mask
