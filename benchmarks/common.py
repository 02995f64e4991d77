"""Small pieces every benchmark uses: a best-of timer and a WIDTHxHEIGHT argument."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """The fastest of ``repeat`` calls in seconds (at least one call), and the last call's result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out  # type: ignore[return-value]


def size_argument(minimum: int = 1) -> Callable[[str], tuple[int, int]]:
    """An argparse type reading ``WIDTHxHEIGHT`` into (width, height), each at least ``minimum``."""

    def parse(text: str) -> tuple[int, int]:
        try:
            width, height = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
        if min(width, height) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: at least {minimum}x{minimum}")
        return width, height

    return parse
