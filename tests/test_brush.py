"""Our brush RLE codec against label-studio-sdk's, used as the oracle in both directions."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk_brush  # the oracle: a test dependency, never skipped

from ml_backend.brush import InvalidRLEError, decode_rle, encode_rle
from ml_backend.errors import BackendError


def sdk_decode(rle: list[int], height: int, width: int) -> np.ndarray:
    return sdk_brush.decode_rle(rle).reshape(height, width, 4)[:, :, 3] != 0


def sdk_encode(mask: np.ndarray) -> list[int]:
    return sdk_brush.mask2rle(mask.astype(np.uint8) * 255)


def ellipse(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy - height * 0.45) / (height * 0.3)) ** 2 + ((xx - width * 0.55) / (width * 0.35)) ** 2 < 1


def make_mask(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return rng.random(shape) < 0.5
    if kind == "sparse":
        return rng.random(shape) < 0.02
    if kind == "empty":
        return np.zeros(shape, bool)
    if kind == "full":
        return np.ones(shape, bool)
    return ellipse(*shape)


SHAPES = [(1, 1), (1, 9), (9, 1), (3, 5), (17, 33), (97, 131), (256, 257)]
KINDS = ["noise", "sparse", "empty", "full", "ellipse"]


def seed(kind: str, shape: tuple[int, int]) -> int:
    return 10 * SHAPES.index(shape) + KINDS.index(kind)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_sdk_decodes_what_we_encode(kind: str, shape: tuple[int, int]) -> None:
    mask = make_mask(kind, shape, np.random.default_rng(seed(kind, shape)))
    np.testing.assert_array_equal(sdk_decode(encode_rle(mask), *shape), mask)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", KINDS)
def test_we_decode_what_the_sdk_encodes(kind: str, shape: tuple[int, int]) -> None:
    mask = make_mask(kind, shape, np.random.default_rng(1000 + seed(kind, shape)))
    decoded = decode_rle(sdk_encode(mask), *shape)
    assert decoded.dtype == np.bool_ and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_is_byte_identical_to_the_sdk(kind: str) -> None:
    mask = make_mask(kind, (61, 47), np.random.default_rng(7))
    assert encode_rle(mask) == sdk_encode(mask)


def test_long_runs_split_like_the_sdk() -> None:
    # 300x300 full: one run of 360 000 bytes, longer than one token's 2**16 limit.
    mask = np.ones((300, 300), bool)
    mask[150, 7] = False
    assert encode_rle(mask) == sdk_encode(mask)
    np.testing.assert_array_equal(decode_rle(encode_rle(mask), 300, 300), mask)


@pytest.mark.parametrize("offset", [0, 3, 8])
def test_every_pattern_of_changes_within_eight_pixels_is_encoded_like_the_sdk(offset: int) -> None:
    # The encoder finds changes eight pixels (one packed byte) at a time: the first from a byte's value,
    # any further ones bit by bit. Every 8-pixel pattern, at byte-aligned and unaligned offsets, with a
    # mask size that leaves a partial last byte.
    patterns = np.unpackbits(np.arange(256, dtype=np.uint8)).astype(bool)
    flat = np.concatenate([np.zeros(offset, bool), patterns, np.ones(5, bool)])
    mask = flat.reshape(1, -1)
    assert encode_rle(mask) == sdk_encode(mask)
    np.testing.assert_array_equal(decode_rle(encode_rle(mask), *mask.shape), mask)


def test_long_runs_between_short_ones_keep_their_values_like_the_sdk() -> None:
    # Runs longer than one token holds are split into several tokens of the same value, so the values no
    # longer alternate token by token; also a mask that starts inside and one that starts outside.
    mask = np.zeros((400, 700), bool)
    mask[:100] = True
    mask[250, ::3] = True
    for candidate in (mask, ~mask):
        assert encode_rle(candidate) == sdk_encode(candidate)


def test_big_object_mask_round_trips_both_ways() -> None:
    mask = ellipse(3000, 4000)
    mask[100:200, 100:3900] = True
    np.testing.assert_array_equal(sdk_decode(encode_rle(mask), 3000, 4000), mask)
    np.testing.assert_array_equal(decode_rle(sdk_encode(mask), 3000, 4000), mask)


@pytest.mark.parametrize("scale", [1, 255, 7])
def test_uint8_masks_treat_nonzero_as_inside(scale: int) -> None:
    mask = make_mask("noise", (13, 11), np.random.default_rng(3))
    assert encode_rle(mask.astype(np.uint8) * scale) == encode_rle(mask)


def test_non_contiguous_and_int_masks() -> None:
    mask = make_mask("noise", (40, 30), np.random.default_rng(4))
    view = mask.T  # not C-contiguous
    np.testing.assert_array_equal(decode_rle(encode_rle(view), 30, 40), view)
    np.testing.assert_array_equal(decode_rle(encode_rle(view.astype(np.int64)), 30, 40), view)


def test_decodes_literal_runs_and_partial_alpha_like_the_editor_writes() -> None:
    # The editor stores coloured RGBA pixels: channel values differ, so runs of one value
    # appear; the SDK's generic encoder writes those as literal tokens.
    rng = np.random.default_rng(5)
    mask = make_mask("noise", (21, 19), rng)
    rgba = np.zeros((21, 19, 4), np.uint8)
    rgba[mask] = (255, 0, 0, 128)
    rle = sdk_brush.encode_rle(rgba.ravel().astype(int))
    np.testing.assert_array_equal(decode_rle(rle, 21, 19), mask)


def bits_to_rle(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def header(n_values: int, word_size: int = 8, sizes: tuple[int, ...] = (3, 4, 8, 16)) -> str:
    return f"{n_values:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes)


def test_decodes_multi_word_literals_and_other_field_sizes() -> None:
    # Two pixels (8 values): a literal of 5 words (field size 5), then a repeat of 3 x 0x40.
    bits = header(8, sizes=(5, 4, 8, 16)) + "0" + "00" + f"{4:05b}"
    bits += "".join(f"{v:08b}" for v in (9, 9, 9, 0, 1))
    bits += "1" + "01" + f"{2:04b}" + f"{0x40:08b}"
    rle = bits_to_rle(bits)
    expected = sdk_decode(rle, 1, 2)
    np.testing.assert_array_equal(expected, [[False, True]])
    np.testing.assert_array_equal(decode_rle(rle, 1, 2), expected)


@pytest.mark.parametrize(
    "rle, message",
    [
        ([], "too short"),
        ([0, 0, 0], "too short"),
        ([[1, 2], [3, 4]], "flat list"),
        ([1.5] * 10, "integers"),
        (["a"] * 10, "integers"),
        ([0, 0, 0, 4, 300, 0, 0, 0], "0-255"),
        ([-1] * 10, "0-255"),
    ],
)
def test_malformed_lists_are_rejected(rle: list, message: str) -> None:
    with pytest.raises(InvalidRLEError, match=message):
        decode_rle(rle, 1, 1)


def test_size_mismatch_is_rejected_with_both_sizes() -> None:
    rle = encode_rle(np.ones((4, 5), bool))
    with pytest.raises(InvalidRLEError, match="holds 80 RGBA values but a 6x4 image needs 96"):
        decode_rle(rle, 4, 6)


@pytest.mark.parametrize("height, width", [(0, 5), (4, -5), (4.0, 5), ("4", 5), (True, 5)])
def test_bad_image_sizes_are_rejected(height, width) -> None:
    with pytest.raises(InvalidRLEError, match="positive whole numbers"):
        decode_rle(encode_rle(np.ones((4, 5), bool)), height, width)


def test_truncated_stream_is_rejected() -> None:
    rle = encode_rle(make_mask("noise", (30, 30), np.random.default_rng(6)))
    with pytest.raises(InvalidRLEError, match="truncated"):
        decode_rle(rle[: len(rle) // 2], 30, 30)


def test_runs_beyond_the_header_count_are_rejected() -> None:
    # Header says 4 values, one repeat token of 8.
    rle = bits_to_rle(header(4) + "1" + "00" + "111" + "11111111")
    with pytest.raises(InvalidRLEError, match="describe 8 values but its header says 4"):
        decode_rle(rle, 1, 1)


def test_invalid_rle_error_is_a_backend_and_value_error() -> None:
    assert issubclass(InvalidRLEError, BackendError) and issubclass(InvalidRLEError, ValueError)
    assert InvalidRLEError("x").status_code == 422


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2), bool), np.zeros((0, 3), bool), np.zeros(5, bool)])
def test_encode_rejects_non_2d_or_empty_masks(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="non-empty 2-D"):
        encode_rle(bad)
