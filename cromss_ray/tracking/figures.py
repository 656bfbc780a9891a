"""Figures logged with a run: confusion matrices, validation samples, label-audit tiles and noise-detection curves.

Drawn on :class:`matplotlib.figure.Figure` with the Agg canvas directly, so nothing here
touches pyplot's global state or the process's matplotlib backend (Ray workers and
notebooks keep theirs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cromss_ray.data.schema import class_colors

UNLABELLED_COLOR = "#d9d9d9"
LABEL_PANELS = (("label", "noisy label"), ("clean_label", "clean label"), ("prediction", "prediction"))
MAP_PANELS = (
    ("trust_s1", "S1 label trust"),
    ("trust_s2", "S2 label trust"),
    ("weights_s1", "S1 selection weight"),
    ("weights_s2", "S2 selection weight"),
)
"""Per-pixel maps in [0, 1]: the entangled label confidence (spec 4) and the selection weight (spec 6)."""
PANEL_INCHES = 2.6


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Heat map of a C x C confusion matrix (rows: reference, columns: prediction).

    Cells are coloured and annotated with the share of their row, i.e. the recall of the
    reference class, so rare classes stay readable next to frequent ones (spec 11).
    """
    counts = np.asarray(matrix, dtype=np.float64)
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)
    size = 1.2 + 0.55 * len(class_names)
    figure = _new_figure(size + 1.5, size)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("prediction")
    axes.set_ylabel("reference")
    axes.set_title(title)
    for row, col in np.ndindex(shares.shape):
        colour = "white" if shares[row, col] > 0.5 else "black"
        axes.text(col, row, f"{100 * shares[row, col]:.0f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, label="share of reference pixels")
    return figure


def _label_panel(axes, label: np.ndarray, colormap: ListedColormap, title: str) -> None:
    classes = colormap.N
    shown = np.ma.masked_where((label < 0) | (label >= classes), label)
    axes.imshow(shown, cmap=colormap, vmin=-0.5, vmax=classes - 0.5, interpolation="nearest")
    axes.set_title(title)


def validation_sample_figure(sample: Mapping[str, np.ndarray], class_names: Sequence[str], title: str) -> Figure:
    """One row of panels: S2 RGB, noisy label, clean label, prediction and each modality's
    label-trust and selection-weight maps (spec 4, 6), the optional ones only when the sample has them.

    ``sample`` holds numpy arrays: ``s2_rgb`` (H, W, 3) in [0, 1], ``label`` (H, W) class
    indices (values outside 0..C-1 are unlabelled and drawn grey), optional
    ``clean_label``, ``prediction`` (H, W) and ``trust_s1``, ``trust_s2``, ``weights_s1``,
    ``weights_s2`` (H, W) in [0, 1].
    """
    colormap = ListedColormap(class_colors(class_names)).with_extremes(bad=UNLABELLED_COLOR)
    label_panels = [(key, name) for key, name in LABEL_PANELS if key in sample]
    weight_panels = [(key, name) for key, name in MAP_PANELS if key in sample]
    panels = 1 + len(label_panels) + len(weight_panels)
    figure = _new_figure(PANEL_INCHES * panels, PANEL_INCHES + 1.0)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(np.clip(sample["s2_rgb"], 0.0, 1.0))
    axes[0].set_title("S2 RGB")
    for panel, (key, name) in zip(axes[1:], label_panels):
        _label_panel(panel, sample[key], colormap, name)
    weight_image = None
    for panel, (key, name) in zip(axes[1 + len(label_panels) :], weight_panels):
        weight_image = panel.imshow(sample[key], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        panel.set_title(name)
    for panel in axes:
        panel.set_axis_off()
    if weight_image is not None:
        figure.colorbar(weight_image, ax=list(axes[1 + len(label_panels) :]), shrink=0.8)
    handles = [Patch(color=colour, label=name) for name, colour in zip(class_names, class_colors(class_names))]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), fontsize=7, frameon=False)
    figure.suptitle(title)
    return figure


def precision_recall_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], noise_rate: float, title: str) -> Figure:
    """Precision against recall of each branch's trust as a detector of wrong labels, with the noise rate
    (the precision of flagging at random) as a dashed line. ``curves`` maps a branch to (precision, recall)."""
    figure = _new_figure(4.8, 4.0)
    axes = figure.add_subplot()
    for branch, (precision, recall) in curves.items():
        axes.plot(recall, precision, label=f"{branch.upper()} trust")
    axes.axhline(noise_rate, color="grey", linestyle="--", label=f"noise rate {noise_rate:.2f}")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("recall (share of wrong labels flagged)")
    axes.set_ylabel("precision (share of flagged labels that are wrong)")
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=8)
    return figure
