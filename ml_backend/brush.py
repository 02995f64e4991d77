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
    lead = np.zeros(_LONGEST_SHORT_RUN + 2, np.uint64)
    width = np.zeros(_LONGEST_SHORT_RUN + 2, np.uint8)
    for length in range(1, _LONGEST_SHORT_RUN + 2):
        choice = next(i for i, size in enumerate(_RUN_FIELD_SIZES) if length <= 1 << size)
        size = _RUN_FIELD_SIZES[choice]
        lead[length] = (1 << (size + 2 + _WORD_SIZE)) | (choice << (size + _WORD_SIZE))
        width[length] = size + 3 + _WORD_SIZE
    return lead, width


_TOKEN_LEAD, _TOKEN_WIDTH = _token_tables()
_HEADER_REST = (_WORD_SIZE - 1) << 16 | sum((size - 1) << (12 - 4 * i) for i, size in enumerate(_RUN_FIELD_SIZES))
# Per byte value, the value with its first (most significant) set bit cleared.
_AFTER_FIRST_BIT = np.array([value & ~(1 << (value.bit_length() - 1)) if value else 0 for value in range(256)],
                            np.uint8)
_U64 = np.uint64


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (bool, or numbers where non-zero means inside) as a brush ``rle`` list."""
    return encode_rle_array(mask).tolist()


def encode_rle_array(mask: np.ndarray) -> np.ndarray:
    """:func:`encode_rle` as a uint8 array: what a JSON encoder that writes numpy arrays (orjson) takes
    as it is, without a Python int per byte.

    Every step works on bits packed eight to a byte or on one number per run, and reuses its arrays
    where it can: a noise-like 4000x3000 mask has ~380 000 runs, and on a VM each fresh megabyte a
    step allocates costs about as much CPU in page faults as the step itself.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A brush mask must be a non-empty 2-D array, got shape {mask.shape}.")
    flat = np.ascontiguousarray(mask).ravel()
    flat = flat if flat.dtype == np.bool_ else flat != 0  # (!= 0 on bools is slow)
    n_values = flat.size * 4
    if n_values >= 1 << 32:
        raise ValueError(f"A {mask.shape[1]}x{mask.shape[0]} mask is too large for Label Studio's brush format.")

    # Pixel runs; every pixel is four equal RGBA bytes, so byte runs are pixel runs times four.
    starts = _run_starts(flat)
    lengths = np.empty(starts.size + 1, np.int64)
    lengths[:-1] = starts
    lengths[-1] = flat.size
    lengths[1:] -= starts
    del starts
    lengths <<= 2
    inside_first = 0 if flat[0] else 1  # runs alternate: every other one is inside, from this one on
    values = None
    if lengths.max() > _MAX_RUN:
        values = np.zeros(lengths.size, np.int64)
        values[inside_first::2] = 255
        lengths, values = _split_long_runs(lengths, values)

    short = np.minimum(lengths, _LONGEST_SHORT_RUN + 1)
    codes = _TOKEN_LEAD[short]
    widths = _TOKEN_WIDTH[short]
    lengths -= 1
    lengths <<= _WORD_SIZE
    codes |= lengths.view(_U64)
    if values is None:
        codes[inside_first::2] |= _U64(255)
    else:
        codes |= values.view(_U64)
    words, total_bits = _pack_bits(codes, widths, _HEADER_BITS, spare=(short.view(_U64), lengths.view(_U64)))
    words[0] = n_values
    words[1] |= _U64(_HEADER_REST << (64 - _HEADER_BITS))
    return words.astype(">u4").view(np.uint8)[: total_bits // 8 + 1]  # the SDK's padding


def _run_starts(flat: np.ndarray) -> np.ndarray:
    """Indices i > 0 where ``flat[i] != flat[i - 1]`` (bool array), ascending.

    Compares the mask packed eight pixels to a byte (each bit with the one before it), finds the
    bytes holding a change, reads each one's first change from its value (as a float's exponent) and
    only the few bytes with more than one change bit by bit.
    """
    packed = np.packbits(flat)  # pixel i is bit 7 - i % 8 of byte i // 8
    change = packed >> 1
    change ^= packed
    packed <<= 7  # each byte's last pixel, for the next byte's first
    change[1:] ^= packed[:-1]
    change[0] &= 0x7F  # pixel 0 starts the first run, not a change
    if flat.size % 8:
        change[-1] &= (0xFF00 >> (flat.size % 8)) & 0xFF  # packbits' padding
    nonzero = np.flatnonzero(np.not_equal(change, 0, out=packed.view(np.bool_)))
    values = change[nonzero]
    starts = nonzero
    starts <<= 3
    # Each byte's first change: 7 - log2 of its value, read from the exponent of the value as a float32.
    exponent = values.astype(np.float32).view(np.int32)
    exponent >>= 23
    np.subtract(127 + 7, exponent, out=exponent)
    starts |= exponent
    several = values - np.uint8(1)
    several &= values  # non-zero where a byte holds more than one change
    several = np.flatnonzero(np.not_equal(several, 0, out=several.view(np.bool_)))
    if several.size:
        bits = np.flatnonzero(np.unpackbits(_AFTER_FIRST_BIT[values[several]]).view(np.bool_))
        owner = several[bits >> 3]
        more = starts[owner] & ~7
        more |= bits & 7
        owner += 1
        starts = np.insert(starts, owner, more)  # after their byte's first change, in order
    return starts


def _split_long_runs(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split runs longer than 2**16 into full 2**16 tokens plus one for the rest, as the SDK does."""
    pieces = (lengths - 1) // _MAX_RUN + 1
    run = np.repeat(np.arange(lengths.size), pieces)
    index = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.minimum(lengths[run] - index * _MAX_RUN, _MAX_RUN), values[run]


def _pack_bits(codes: np.ndarray, widths: np.ndarray, first_bit: int,
               spare: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, int]:
    """Concatenate ``codes`` (uint64, each at most 27 bits wide: ``widths``) MSB-first from bit
    ``first_bit`` on; ``codes`` is overwritten, and so are the two ``spare`` uint64 arrays of its size.

    Returns the 32-bit words (as uint64, the first ``first_bit`` bits zero) and the total bit count.
    Each code is shifted into the 64-bit window of the two words it starts in; codes never overlap,
    so a word's bits are the sum of its window's codes, found as differences of one running sum
    (wrapping uint64 arithmetic is exact). A code is narrower than a word, so every word from the
    first code's on has a code starting in it, and a code is the last to start in its word when it
    reaches the next one.
    """
    ends = np.cumsum(widths, dtype=_U64, out=spare[0])
    ends += _U64(first_bit)
    total_bits = int(ends[-1])
    shift = np.subtract(ends, widths, out=spare[1])  # where each code starts
    shift &= _U64(31)
    shift += widths  # where it ends, from the start of its word
    np.subtract(_U64(64), shift, out=shift)  # the shift that puts it there in a 64-bit window
    codes <<= shift
    np.cumsum(codes, out=codes)
    last = np.flatnonzero(shift[:-1] <= _U64(32))  # each word's last code (but the last word's)
    first_word = first_bit >> 5
    words = np.zeros(first_word + last.size + 2, _U64)
    sums = words[first_word:-1]  # the running sum after each word's last code, then each word's window
    np.take(codes, last, out=sums[:-1])
    sums[-1] = codes[-1]
    window = codes[:sums.size]  # codes are no longer needed: their memory holds the windows
    window[0] = sums[0]
    np.subtract(sums[1:], sums[:-1], out=window[1:])
    np.right_shift(window, _U64(32), out=sums)
    window &= _U64(0xFFFFFFFF)
    words[first_word + 1:] |= window
    return words, total_bits


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
