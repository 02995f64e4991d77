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
from ml_backend.security.limits import (
    DEFAULT_MAX_MASK_PIXELS,
    RequestLimitError,
    check_rle_length,
    declared_mask_size,
)

_WORD_SIZE = 8
_RUN_FIELD_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_RUN = 1 << 16  # longest run one token of field size 16 can hold
_LONGEST_SHORT_RUN = 1 << _RUN_FIELD_SIZES[2]  # runs up to this use the first three field sizes
_DECODE_BLOCK_BYTES = 1 << 16  # bytes whose windows the token walk converts to Python ints at a time


class InvalidRLEError(BackendError, ValueError):
    """An RLE list that is not a valid Label Studio brush mask of the expected size."""

    status_code = 422


def _token_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each run length 1..257 (257 standing for longer), its token's leading bits and width.

    The leading bits are the repeat flag and the field-size choice, already shifted into place
    above the length field and the 8-bit value.
    """
    lead = np.zeros(_LONGEST_SHORT_RUN + 2, np.int64)
    width = np.zeros(_LONGEST_SHORT_RUN + 2, np.int64)
    for length in range(1, _LONGEST_SHORT_RUN + 2):
        choice = next(i for i, size in enumerate(_RUN_FIELD_SIZES) if length <= 1 << size)
        size = _RUN_FIELD_SIZES[choice]
        lead[length] = (1 << (size + 2 + _WORD_SIZE)) | (choice << (size + _WORD_SIZE))
        width[length] = size + 3 + _WORD_SIZE
    return lead, width


_TOKEN_LEAD, _TOKEN_WIDTH = _token_tables()


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (bool, or numbers where non-zero means inside) as a brush ``rle`` list."""
    return encode_rle_array(mask).tolist()


def encode_rle_array(mask: np.ndarray) -> np.ndarray:
    """:func:`encode_rle` as a uint8 array: what a JSON encoder that writes numpy arrays (orjson) takes
    as it is, without a Python int per byte."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A brush mask must be a non-empty 2-D array, got shape {mask.shape}.")
    flat = np.ascontiguousarray(mask).ravel()
    flat = flat if flat.dtype == np.bool_ else flat != 0  # (!= 0 on bools is slow)
    n_values = flat.size * 4
    if n_values >= 1 << 32:
        raise ValueError(f"A {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush format.")

    # Pixel runs; every pixel is four equal RGBA bytes, so byte runs are pixel runs times four.
    bounds = np.concatenate(([0], _changes(flat) + 1, [flat.size]))
    lengths = np.diff(bounds) * 4
    values = flat[bounds[:-1]].astype(np.int64) * 255
    if lengths.max() > _MAX_RUN:
        lengths, values = _split_long_runs(lengths, values)

    short = np.minimum(lengths, _LONGEST_SHORT_RUN + 1)
    codes = _TOKEN_LEAD[short] | ((lengths - 1) << _WORD_SIZE) | values
    words, total_bits = _pack_bits(codes, _TOKEN_WIDTH[short], _HEADER_BITS)

    header_rest = (_WORD_SIZE - 1) << 16
    for i, size in enumerate(_RUN_FIELD_SIZES):
        header_rest |= (size - 1) << (12 - 4 * i)
    words[0] = n_values
    words[1] |= header_rest << (64 - _HEADER_BITS)
    return words.astype(">u4").view(np.uint8)[: total_bits // 8 + 1]  # the SDK's padding


def _changes(flat: np.ndarray) -> np.ndarray:
    """Indices i where ``flat[i] != flat[i + 1]`` (bool array).

    Looks for changes eight at a time (as 64-bit words) and only then inside the words that
    have one: an object mask has few, so this skips most of a full ``flatnonzero`` scan.
    """
    differs = flat[1:] != flat[:-1]
    n_whole = differs.size // 8 * 8
    words = np.flatnonzero(differs[:n_whole].view(np.uint64) != 0)
    if words.size * 4 > n_whole // 8:  # changes everywhere (noise): a plain scan is cheaper
        return np.flatnonzero(differs)
    rows, cols = np.nonzero(differs[:n_whole].reshape(-1, 8)[words])
    return np.concatenate((words[rows] * 8 + cols, np.flatnonzero(differs[n_whole:]) + n_whole))


def _split_long_runs(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split runs longer than 2**16 into full 2**16 tokens plus one for the rest, as the SDK does."""
    pieces = (lengths - 1) // _MAX_RUN + 1
    run = np.repeat(np.arange(lengths.size), pieces)
    index = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.minimum(lengths[run] - index * _MAX_RUN, _MAX_RUN), values[run]


def _pack_bits(codes: np.ndarray, widths: np.ndarray, first_bit: int) -> tuple[np.ndarray, int]:
    """Concatenate ``codes`` (each at most 32 bits wide) MSB-first from bit ``first_bit`` on.

    Returns the 32-bit words (as uint64, with one to spare) and the total bit count.
    """
    ends = np.cumsum(widths)
    ends += first_bit
    total_bits = int(ends[-1])
    word = (ends - widths) >> 5
    next_word = word + 1
    # Scale each code so that its bits in its first word form the integer part and those that
    # spill into the next word the fraction. Float64 holds both exactly (codes have <= 32
    # bits), and codes never overlap, so summing per word is OR-ing.
    placed = np.ldexp(codes.astype(np.float64), (next_word << 5) - ends)
    integer = np.floor(placed)
    n_words = total_bits // 32 + 2
    high = np.bincount(word, integer, n_words)
    low = np.bincount(next_word, (placed - integer) * 2.0**32, n_words)
    return (high + low).astype(np.uint64), total_bits


def decode_rle(rle: Sequence[int] | np.ndarray, height: int, width: int, *,
               max_pixels: int = DEFAULT_MAX_MASK_PIXELS) -> np.ndarray:
    """Decode a brush ``rle`` list into an (height, width) bool mask (alpha channel non-zero).

    Raises :class:`InvalidRLEError` when the list is not bytes, is truncated, or does not
    describe exactly ``height`` x ``width`` RGBA pixels, and before reading anything when the size
    is beyond ``max_pixels`` or the list is longer than such a mask can need: memory stays within
    one byte per pixel plus a few per stored word, whatever the list declares. Finding where each run starts is a
    loop over runs (each run's length depends on its own header): a photo-sized object mask
    takes milliseconds, pure pixel noise (millions of runs) seconds.
    """
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in (height, width)):
        raise InvalidRLEError(f"The image size must be positive whole numbers, got {width!r}x{height!r}.")
    height, width = int(height), int(width)
    if not isinstance(rle, (list, tuple, np.ndarray)):
        raise InvalidRLEError(f"Brush RLE must be a list of integers 0-255, got {type(rle).__name__}.")
    try:
        declared_mask_size(width, height, max_pixels=max_pixels, what="The brush mask")
        check_rle_length(len(rle), width, height)
    except RequestLimitError as exc:
        raise InvalidRLEError(exc.message) from None
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
    # Each stored word covers values [start, end); the alpha values (index 3 mod 4) among them
    # number end//4 - start//4, so the mask is built pixel by pixel, never value by value.
    ends = np.cumsum(uses)
    alphas = ends // 4 - (ends - uses) // 4
    return np.repeat(inside, alphas).reshape(height, width)


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
