"""Training curves and prediction grids as PNG files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from training.predict import overlay  # noqa: E402


def plot_history(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and validation loss (left), foreground IoU on training and validation data (right)."""
    epochs = range(1, len(history.get("loss", [])) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, history.get("loss", []), "r--", label="Training loss")
    left.plot(epochs, history.get("val_loss", []), "b", label="Validation loss")
    left.set_title("Training and validation loss")
    left.set_xlabel("Epoch")
    left.legend()
    right.plot(epochs, history.get("foreground_iou", []), "r--", label="Training foreground IoU")
    right.plot(epochs, history.get("val_foreground_iou", []), "b", label="Validation foreground IoU")
    right.set_title("Foreground IoU")
    right.set_xlabel("Epoch")
    right.set_ylim(0, 1)
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_predictions(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    path: Path,
    titles: Sequence[str] = (),
) -> Path:
    """One row per image: the image, its true trimap overlaid, the predicted trimap overlaid."""
    rows = max(1, len(images))
    figure, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, (image, truth, predicted) in enumerate(zip(images, truths, predictions)):
        name = titles[row] if row < len(titles) else ""
        for column, (picture, title) in enumerate(
            ((image, name), (overlay(image, truth), "ground truth"), (overlay(image, predicted), "prediction"))
        ):
            axes[row][column].imshow(picture)
            axes[row][column].set_title(title, fontsize=9)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
