"""Data sets in the Oxford-IIIT Pets layout: pairing, decoding, splitting, fingerprints.

Layout: ``DATA_DIR/images/<stem>.jpg`` and ``DATA_DIR/annotations/trimaps/<stem>.png``;
trimap pixel values 1 (foreground), 2 (background), 3 (boundary) become classes 0, 1, 2.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from training.errors import DatasetError
from training.synthetic import write_synthetic

__all__ = [
    "Pair", "PairLoadError", "Problem", "Dataset", "Split", "scan_dataset", "find_pairs", "load_image", "load_trimap",
    "load_pair", "split_pairs", "validation_count", "dataset_fingerprint", "files_fingerprint",
    "write_synthetic", "IMAGES_SUBDIR", "TRIMAPS_SUBDIR", "IMAGE_SUFFIXES", "DECODE_ERRORS",
]

log = logging.getLogger(__name__)

IMAGES_SUBDIR = Path("images")
TRIMAPS_SUBDIR = Path("annotations") / "trimaps"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
TRIMAP_SUFFIXES = {".png"}
TRIMAP_VALUES = (1, 2, 3)
MAX_VALIDATION = 1000
VALIDATION_FRACTION = 0.2
MIN_SMALL_VALIDATION, MIN_SMALL_VALIDATION_FROM = 2, 5  # two validation images once five pairs can spare them
# Decoding errors Pillow raises for broken files (truncated data, bad headers, bombs).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Pair:
    """One training example: an image and its trimap, matched by file stem."""

    stem: str
    image: Path
    trimap: Path


@dataclass(frozen=True)
class Problem:
    """A file that was left out, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Dataset:
    """The usable pairs of a data directory and everything that was left out."""

    root: Path
    pairs: list[Pair]
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


class PairLoadError(ValueError):
    """One file of a pair could not be used; ``problem`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.problem = Problem(path, reason)


@dataclass(frozen=True)
class Split:
    train: list[Pair]
    val: list[Pair]


def _listing(folder: Path, suffixes: set[str]) -> tuple[dict[str, Path], list[Problem]]:
    """Files of ``folder`` with an accepted suffix keyed by stem; dotfiles are ignored."""
    by_stem: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in by_stem:
            problems.append(Problem(path, f"same name as {by_stem[path.stem].name}: ambiguous, both skipped"))
            continue
        by_stem[path.stem] = path
    for problem in problems:
        by_stem.pop(problem.path.stem, None)
    return by_stem, problems


def find_pairs(data_dir: str | Path) -> Dataset:
    """Match images and trimaps by stem (never by sorted position) and report the odd ones out.

    Only the folder listing is read; :func:`scan_dataset` also checks the files' headers.
    """
    root = Path(data_dir)
    images_dir, trimaps_dir = root / IMAGES_SUBDIR, root / TRIMAPS_SUBDIR
    for folder in (images_dir, trimaps_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: folder not found; expected the Oxford-IIIT Pets layout "
                f"({IMAGES_SUBDIR}/*.jpg and {TRIMAPS_SUBDIR}/*.png with the same names)"
            )
    images, problems = _listing(images_dir, IMAGE_SUFFIXES)
    trimaps, trimap_problems = _listing(trimaps_dir, TRIMAP_SUFFIXES)
    problems += trimap_problems
    pairs = [Pair(stem, images[stem], trimaps[stem]) for stem in sorted(images.keys() & trimaps.keys())]
    problems += [Problem(images[s], "no trimap with the same name") for s in sorted(images.keys() - trimaps.keys())]
    problems += [Problem(trimaps[s], "no image with the same name") for s in sorted(trimaps.keys() - images.keys())]
    return Dataset(root, pairs, problems)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after applying the EXIF orientation, read from the header only."""
    width, height = image.size
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
        return height, width
    return width, height


def _check_pair(pair: Pair) -> Problem | None:
    """Open both headers (no pixel decoding) and compare sizes."""
    try:
        with Image.open(pair.image) as image:
            image_size = _oriented_size(image)
    except DECODE_ERRORS as exc:
        return Problem(pair.image, f"unreadable image ({exc})")
    try:
        with Image.open(pair.trimap) as trimap:
            trimap_size = trimap.size
    except DECODE_ERRORS as exc:
        return Problem(pair.trimap, f"unreadable trimap ({exc})")
    if image_size != trimap_size:
        return Problem(pair.trimap, f"size {trimap_size} differs from its image's {image_size}")
    return None


def scan_dataset(data_dir: str | Path) -> Dataset:
    """Pairs whose headers open and agree in size; a data set with no usable pair is an error."""
    found = find_pairs(data_dir)
    usable: list[Pair] = []
    for pair in found.pairs:
        problem = _check_pair(pair)
        if problem is None:
            usable.append(pair)
        else:
            found.problems.append(problem)
    for problem in found.problems:
        log.warning("skipped %s", problem)
    if not usable:
        raise DatasetError(
            f"{found.root}: no usable image/trimap pair "
            f"({len(found.problems)} problem(s){': ' + str(found.problems[0]) if found.problems else ''})"
        )
    return Dataset(found.root, usable, found.problems)


def load_image(path: Path, size: int | None = None) -> np.ndarray:
    """An RGB uint8 array (EXIF orientation applied), resized bilinearly to ``size``² if given."""
    with Image.open(path) as image:
        if size is not None:
            image.draft("RGB", (size, size))  # JPEG: let the decoder downscale (never below size)
        image = ImageOps.exif_transpose(image).convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def load_trimap(path: Path, size: int | None = None) -> np.ndarray:
    """Class ids 0/1/2 (trimap value - 1) as uint8, resized with nearest neighbour if ``size``."""
    with Image.open(path) as trimap:
        if trimap.mode not in ("L", "P", "I", "I;16"):
            trimap = trimap.convert("L")
        if size is not None:
            trimap = trimap.resize((size, size), Image.Resampling.NEAREST)
        values = np.asarray(trimap)
    low, high = int(values.min()), int(values.max())
    if low < TRIMAP_VALUES[0] or high > TRIMAP_VALUES[-1]:
        raise ValueError(f"trimap values span {low}..{high}; expected only 1, 2, 3")
    return (values - 1).astype(np.uint8)


def load_pair(pair: Pair, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair; raises :class:`PairLoadError` naming the bad file if either cannot be used."""
    try:
        image = load_image(pair.image, size)
    except DECODE_ERRORS as exc:
        raise PairLoadError(pair.image, f"unreadable image ({exc})") from exc
    try:
        trimap = load_trimap(pair.trimap, size)
    except DECODE_ERRORS as exc:
        raise PairLoadError(pair.trimap, f"unusable trimap ({exc})") from exc
    if image.shape[:2] != trimap.shape:
        raise PairLoadError(pair.trimap, f"size {trimap.shape[::-1]} differs from its image's {image.shape[1::-1]}")
    return image, trimap


def validation_count(total: int) -> int:
    """1,000 validation images for a large set (as the book), 20 % of a small one, at least 1, and at least
    :data:`MIN_SMALL_VALIDATION` from :data:`MIN_SMALL_VALIDATION_FROM` pairs: a project's first versions are
    chosen and promoted on these images, and one image makes that a coin toss."""
    if total < 2:
        return 0
    floor = MIN_SMALL_VALIDATION if total >= MIN_SMALL_VALIDATION_FROM else 1
    return max(floor, min(MAX_VALIDATION, math.floor(total * VALIDATION_FRACTION)))


def _rank(stem: str, seed: int) -> str:
    """A seeded, process-independent sort key (Python's ``hash`` is salted per process)."""
    return hashlib.sha256(f"{seed}:{stem}".encode()).hexdigest()


def split_pairs(
    pairs: Sequence[Pair],
    *,
    seed: int = 1337,
    previous_val: Iterable[str] = (),
    previous_train: Iterable[str] = (),
) -> Split:
    """Deterministic train/validation split that is stable as the data set grows.

    Validation images of an earlier split (``previous_val``, stems) that are still present stay
    in validation. Further validation images, up to :func:`validation_count`, come only from
    stems never seen before (in neither ``previous_val`` nor ``previous_train``), in seeded hash
    order, so no model in the lineage was trained on a validation image.
    """
    kept_val = set(previous_val)
    seen = kept_val | set(previous_train)
    val = {p.stem for p in pairs if p.stem in kept_val}
    fresh = sorted((p.stem for p in pairs if p.stem not in seen), key=lambda s: _rank(s, seed))
    wanted = validation_count(len(pairs)) - len(val)
    val.update(fresh[: max(0, wanted)])
    return Split(train=[p for p in pairs if p.stem not in val], val=[p for p in pairs if p.stem in val])


def dataset_fingerprint(pairs: Iterable[Pair]) -> str:
    """Cheap identity of a data set: names and byte sizes of every file (no content read)."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.stem):
        digest.update(f"{pair.stem}\0{pair.image.stat().st_size}\0{pair.trimap.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def files_fingerprint(pairs: Iterable[Pair]) -> str:
    """Content identity of a (validation) set: names and the bytes of every file."""
    digest = hashlib.sha256()
    for pair in sorted(pairs, key=lambda p: p.stem):
        digest.update(pair.stem.encode() + b"\0")
        digest.update(hashlib.sha256(pair.image.read_bytes()).digest())
        digest.update(hashlib.sha256(pair.trimap.read_bytes()).digest())
    return digest.hexdigest()[:16]
