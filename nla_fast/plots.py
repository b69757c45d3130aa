"""Figures written into a run's folder: learning curves, confusion matrix, NAW weight map.

Matplotlib runs headless (Agg) and is imported only when a figure is drawn.
"""
from __future__ import annotations

import math

import torch

from . import atomic
from .config import NLAConfig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    atomic.save_figure(fig, path, dpi=100, bbox_inches="tight")


def plot_curves(history: list[dict], path, close: bool = True):
    """Training loss (left) and train / test / mean-class / top-2 accuracy (right) per epoch
    (and validation accuracy where the run has a validation split). Returns the figure, still
    open when ``close=False`` (for TensorBoard)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    for key, label in (
        ("train_acc", "train acc"),
        ("test_acc", "test acc"),
        ("test_mean_acc", "test mean class acc"),
        ("top2_acc", "test top-2 acc"),
        ("valid_acc", "valid acc"),
    ):
        if key.startswith("valid") and not any(key in row for row in history):
            continue
        values = [100 * row[key] if row.get(key) is not None else math.nan for row in history]
        ax_acc.plot(epochs, values, marker="o", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy %")
    ax_acc.set_title("accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _save(fig, path)
    if close:
        plt.close(fig)
    return fig


def plot_confusion(confusion, class_names: list[str], path, title: str = "confusion matrix", close: bool = True):
    """Row-normalised confusion matrix (rows: true class) with the raw counts in each cell.
    Returns the figure, still open when ``close=False``."""
    plt = _pyplot()
    counts = torch.as_tensor(confusion, dtype=torch.float64)
    rows = counts.sum(dim=1, keepdim=True).clamp_min(1)
    normalised = (counts / rows).numpy()
    size = max(4.0, 0.7 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            value = normalised[i, j]
            ax.text(j, i, f"{value:.2f}\n{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.5 else "black")
    fig.tight_layout()
    _save(fig, path)
    if close:
        plt.close(fig)
    return fig


def naw_weight_grid(eps: float, config: NLAConfig, resolution: int = 121):
    """(p_gt, p_nn, w) on a grid over [0, 1]^2; points with p_gt + p_nn > 1 are NaN (impossible)."""
    from .reference import naw_weight_from_probs

    axis = torch.linspace(0, 1, resolution, dtype=torch.float64)
    gt, nn = torch.meshgrid(axis, axis, indexing="xy")
    weight = naw_weight_from_probs(gt, nn, eps, config.constants)
    weight = torch.where(gt + nn <= 1 + 1e-9, weight, torch.full_like(weight, math.nan))
    return gt.numpy(), nn.numpy(), weight.numpy()


def plot_naw_weights(eps: float, config: NLAConfig, points, path, epoch: int | None = None,
                     max_points: int = 4000, close: bool = True):
    """The NAW weight over the (p_gt, p_nn) plane at ``eps``, with samples ``points`` (N, 2) on it.
    Returns the figure, still open when ``close=False``."""
    plt = _pyplot()
    gt, nn, weight = naw_weight_grid(eps, config)
    fig, ax = plt.subplots(figsize=(6, 5))
    mesh = ax.pcolormesh(gt, nn, weight, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="NAW weight w (loss scale 1 + w)")
    ax.plot([0, 0.5], [0, 0.5], color="black", lw=0.8, ls="--", label="p_gt = p_nn (true | false case)")
    if points is not None and len(points):
        points = torch.as_tensor(points, dtype=torch.float32)
        if len(points) > max_points:
            keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:max_points]
            points = points[keep]
        ax.scatter(points[:, 0], points[:, 1], s=5, c="red", alpha=0.5, linewidths=0, label="training samples")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("p_gt (probability of the labelled class)")
    ax.set_ylabel("p_nn (largest other probability)")
    when = f"epoch {epoch}, " if epoch is not None else ""
    ax.set_title(f"NAW weight ({when}eps = {eps:.3f})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    if close:
        plt.close(fig)
    return fig
