"""Exception types of the ``training`` package.

Each carries a message that names the file or version at fault, so the CLI can
print it as is (exit code 2) and the backend can log it.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class for errors caused by input (data sets, model stores, arguments)."""


class DatasetError(TrainingError):
    """A data set that cannot be used: missing folders, no usable image/trimap pair."""


class StoreError(TrainingError):
    """A model store problem: unknown version, nothing to roll back to, unreadable model."""


class FitInterrupted(TrainingError):
    """Fitting was interrupted before any checkpoint existed, so no version was written."""
