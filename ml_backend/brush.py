"""Label Studio's brush RLE format: encode a binary mask, decode one back.

Hand-written (vectorised numpy) because the SDK's codec builds a string of bits
per pixel run in Python (seconds for one photo-sized mask) and drags in opencv
and pandas.

The format is ``@thi.ng/rle-pack`` applied to the mask's RGBA bytes (H·W·4 of
them, row-major). The bit stream (most significant bit first) is a header --
32 bits value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1
-- then one token per run: 1 bit repeat flag, 2 bits choosing a run-length field
size k, k bits run length - 1, then one word (repeat) or run-length words
(literal). Label Studio shows a pixel as part of the brush region when its alpha
byte (channel 3) is non-zero.

:func:`encode_rle` writes exactly what the SDK's ``mask2rle`` writes for a 0/255
mask (word size 8, field sizes 3, 4, 8, 16, runs only, one spare padding byte
when the bit count is a multiple of 8); :func:`decode_rle` reads any valid
stream, including the literal runs Label Studio's editor produces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ml_backend.errors import BackendError

_WORD_SIZE = 8
_RUN_FIELD_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_RUN = 1 << 16  # longest run one token of field size 16 can hold
_DECODE_BLOCK_BYTES = 1 << 16  # bytes whose windows the token walk converts to Python ints at a time


class InvalidRLEError(BackendError, ValueError):
    """An RLE list that is not a valid Label Studio brush mask of the expected size."""

    status_code = 422


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (bool, or numbers where non-zero means inside) as a brush ``rle`` list."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A brush mask must be a non-empty 2-D array, got shape {mask.shape}.")
    flat = mask.ravel() if mask.dtype == np.bool_ else mask.ravel() != 0  # (!= 0 on bools is slow)
    n_values = flat.size * 4
    if n_values >= 1 << 32:
        raise ValueError(f"A {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush format.")

    # Pixel runs; every pixel is four equal RGBA bytes, so byte runs are pixel runs times four.
    run_starts = np.concatenate(([0], _changes(flat.view(np.uint8)) + 1))
    run_lengths = np.diff(np.append(run_starts, flat.size)) * 4
    run_values = np.where(flat[run_starts], 255, 0).astype(np.uint64)

    # A run longer than 2**16 becomes full 2**16 tokens plus one for the rest, as in the SDK.
    pieces = (run_lengths - 1) // _MAX_RUN + 1
    piece_run = np.repeat(np.arange(run_lengths.size), pieces)
    piece_index = np.arange(piece_run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    is_last = piece_index == pieces[piece_run] - 1
    lengths = np.where(is_last, run_lengths[piece_run] - piece_index * _MAX_RUN, _MAX_RUN).astype(np.uint64)
    values = run_values[piece_run]

    size_class = np.searchsorted(np.array([1 << s for s in _RUN_FIELD_SIZES]), lengths).astype(np.uint64)
    field = np.array(_RUN_FIELD_SIZES, np.uint64)[size_class]
    codes = (
        (np.uint64(1) << (field + np.uint64(2 + _WORD_SIZE)))  # repeat flag
        | (size_class << (field + np.uint64(_WORD_SIZE)))
        | ((lengths - np.uint64(1)) << np.uint64(_WORD_SIZE))
        | values
    )
    widths = field + np.uint64(3 + _WORD_SIZE)

    header_rest = (_WORD_SIZE - 1) << 16
    for i, size in enumerate(_RUN_FIELD_SIZES):
        header_rest |= (size - 1) << (12 - 4 * i)
    codes = np.concatenate((np.array([n_values, header_rest], np.uint64), codes))
    widths = np.concatenate((np.array([32, _HEADER_BITS - 32], np.uint64), widths))
    return list(_pack_bits(codes, widths))


def _changes(flat: np.ndarray) -> np.ndarray:
    """Indices i where ``flat[i] != flat[i + 1]`` for a uint8 array.

    Compares eight bytes at a time (each 64-bit word against the word one byte later), then
    looks at single bytes only inside words that hold a change: few, for an object mask.
    """
    n_words = (flat.size - 1) // 8
    here = np.frombuffer(flat.data, np.uint64, n_words)
    next_ = np.frombuffer(flat.data, np.uint64, n_words, offset=1)
    changed_words = np.flatnonzero(here != next_)
    diff_bytes = (here[changed_words] ^ next_[changed_words]).view(np.uint8).reshape(-1, 8)
    word_index, byte_index = np.nonzero(diff_bytes)
    inside = changed_words[word_index] * 8 + byte_index
    tail_start = n_words * 8
    tail = np.flatnonzero(flat[tail_start + 1 :] != flat[tail_start:-1]) + tail_start
    return np.concatenate((inside, tail))


def _pack_bits(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate ``codes`` (each at most 32 bits wide) MSB-first; pad like the SDK."""
    ends = np.cumsum(widths)
    total_bits = int(ends[-1])
    offsets = ends - widths
    n_words = total_bits // 32 + 2
    # Place each code in the 64-bit window starting at its 32-bit word: the high half lands in
    # that word, the low half in the next. Codes never overlap, so summing halves is OR-ing them.
    shifts = np.uint64(64) - (offsets & np.uint64(31)) - widths
    windows = codes << shifts
    word = (offsets >> np.uint64(5)).astype(np.intp)
    high = np.bincount(word, weights=(windows >> np.uint64(32)).astype(np.float64), minlength=n_words)
    low = np.bincount(word + 1, weights=(windows & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_words)
    words = (high + low).astype(np.uint64).astype(">u4")
    return words.tobytes()[: total_bits // 8 + 1]


def decode_rle(rle: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode a brush ``rle`` list into an (height, width) bool mask (alpha channel non-zero).

    Raises :class:`InvalidRLEError` when the list is not bytes, is truncated, or does not
    describe exactly ``height`` x ``width`` RGBA pixels.
    """
    data = _as_bytes(rle)
    if len(data) < 7:
        raise InvalidRLEError(f"Brush RLE is too short ({len(data)} numbers) to hold its header.")
    header = int.from_bytes(data[:7].tobytes(), "big")
    n_values = header >> 24
    word_size = ((header >> 19) & 31) + 1
    field_sizes = [((header >> (15 - 4 * i)) & 15) + 1 for i in range(4)]
    if n_values != height * width * 4:
        raise InvalidRLEError(
            f"Brush RLE holds {n_values} RGBA values but a {width}x{height} image needs {height * width * 4}: "
            "the mask does not belong to an image of this size."
        )
    padded = np.concatenate((data, np.zeros(8, np.uint8)))
    starts = _token_starts(padded, len(data) * 8, n_values, word_size, field_sizes)

    head = _read_bits(padded, starts, 19)
    repeat = (head >> np.uint64(18)).astype(bool)
    field = np.array(field_sizes, np.uint64)[(head >> np.uint64(16)) & np.uint64(3)]
    counts = ((head >> (np.uint64(16) - field)) & ((np.uint64(1) << field) - np.uint64(1))).astype(np.int64) + 1
    first_word = starts + 3 + field.astype(np.int64)

    # One entry per stored word: a repeat token stores one word used `count` times, a literal `count` words.
    words_per_token = np.where(repeat, 1, counts)
    token = np.repeat(np.arange(starts.size), words_per_token)
    index_in_token = np.arange(token.size) - np.repeat(np.cumsum(words_per_token) - words_per_token, words_per_token)
    positions = first_word[token] + index_in_token * word_size
    inside = _read_bits(padded, positions, word_size) != 0
    uses = np.where(repeat[token], counts[token], 1)
    values_inside = np.repeat(inside, uses)
    return values_inside[3::4].reshape(height, width)


def _as_bytes(rle: Sequence[int] | np.ndarray) -> np.ndarray:
    try:
        values = np.asarray(rle)
    except (TypeError, ValueError) as exc:
        raise InvalidRLEError(f"Brush RLE must be a list of integers 0-255: {exc}") from exc
    if values.ndim != 1:
        raise InvalidRLEError(f"Brush RLE must be a flat list of integers, got shape {values.shape}.")
    if values.size and values.dtype.kind not in "iu":
        raise InvalidRLEError(f"Brush RLE must hold integers 0-255, got {values.dtype} values.")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidRLEError("Brush RLE must hold integers 0-255 (bytes); found a value outside that range.")
    return values.astype(np.uint8)


def _read_bits(padded: np.ndarray, positions: np.ndarray, n_bits: int) -> np.ndarray:
    """The ``n_bits`` (<= 33) bits starting at each bit position, as uint64 (``padded`` has 8 spare bytes)."""
    byte = positions >> 3
    window = np.zeros(positions.shape, np.uint64)
    for i in range(5):
        window |= padded[byte + i].astype(np.uint64) << np.uint64(32 - 8 * i)
    shift = (np.uint64(40 - n_bits) - (positions & 7).astype(np.uint64))
    return (window >> shift) & np.uint64((1 << n_bits) - 1)


def _token_starts(
    padded: np.ndarray, total_bits: int, n_values: int, word_size: int, field_sizes: list[int]
) -> np.ndarray:
    """Bit positions of every token: a walk, since each token's length depends on its own header.

    The loop runs once per token (not per pixel) on Python ints read from 40-bit windows.
    """
    n_bytes = total_bits // 8
    # Indexed by the token's first three bits (repeat flag, field size choice).
    field_of = [field_sizes[c & 3] for c in range(8)]
    mask_of = [(1 << k) - 1 for k in field_of]
    starts: list[int] = []
    append = starts.append
    position, produced = _HEADER_BITS, 0
    base, windows = 0, []
    while produced < n_values:
        i = (position >> 3) - base
        if i >= len(windows):
            base = position >> 3
            if base >= n_bytes:
                raise InvalidRLEError("Brush RLE ends before all pixels are described (truncated data).")
            block = np.arange(base, min(base + _DECODE_BLOCK_BYTES, n_bytes), dtype=np.int64) * 8
            windows = _read_bits(padded, block, 33).tolist()  # the 33 bits from each byte's start
            i = 0
        head = (windows[i] >> (14 - (position & 7))) & 0x7FFFF  # the token's first 19 bits
        kind = head >> 16
        count = ((head >> (16 - field_of[kind])) & mask_of[kind]) + 1
        append(position)
        produced += count
        position += 3 + field_of[kind] + (word_size if kind & 4 else word_size * count)
    if position > total_bits:
        raise InvalidRLEError("Brush RLE ends in the middle of a run (truncated data).")
    if produced != n_values:
        raise InvalidRLEError(f"Brush RLE runs describe {produced} values but its header says {n_values}.")
    return np.array(starts, np.int64)
