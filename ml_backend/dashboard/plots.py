"""The history of validation IoU over a project's versions, as inline SVG (matplotlib: no browser script)."""

from __future__ import annotations

import io

from ml_backend.dashboard.data import VersionRow


def iou_history_svg(versions: list[VersionRow]) -> str:
    """Each version's validation IoU beside what it was compared with (the version current then, or the
    base model) and predicting all foreground; promoted versions filled. Empty string without versions."""
    if not versions:
        return ""
    import matplotlib
    from matplotlib.figure import Figure  # not pyplot: its global figure list is not for a threaded server
    from matplotlib.ticker import MaxNLocator

    xs = list(range(1, len(versions) + 1))

    def series(values: list[float | None]) -> list[float]:
        return [float("nan") if v is None else float(v) for v in values]

    figure = Figure(figsize=(7, 2.6))
    axis = figure.subplots()
    axis.plot(xs, series([v.val_iou for v in versions]), "-", color="#1f77b4", label="version (validation IoU)")
    promoted = [(x, v.val_iou) for x, v in zip(xs, versions) if v.promoted and v.val_iou is not None]
    others = [(x, v.val_iou) for x, v in zip(xs, versions) if not v.promoted and v.val_iou is not None]
    if promoted:
        axis.plot(*zip(*promoted), "o", color="#1f77b4", label="promoted")
    if others:
        axis.plot(*zip(*others), "o", mfc="white", color="#1f77b4", label="not promoted")
    axis.plot(xs, series([v.baseline_iou for v in versions]), "s--", color="#ff7f0e", ms=4,
              label="baseline (current then / base model)")
    axis.plot(xs, series([v.all_foreground_iou for v in versions]), ":", color="#7f7f7f", label="all foreground")
    axis.set_ylim(0, 1)
    axis.set_xlabel("version (oldest first)")
    axis.set_ylabel("IoU")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, and searchable
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML
