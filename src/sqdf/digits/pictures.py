"""Image grids of digit samples (matplotlib PNGs): one row per class, or a plain n-by-m grid."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data import NUM_CLASSES, unit_to_pixels01  # noqa: E402


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_image(ax, image: torch.Tensor | None) -> None:
    """One frameless cell: image [1, H, W] (or [3, H, W]) in [0, 1], or an empty cell for None."""
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if image is not None:
        pic = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        ax.imshow(pic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")


def save_grid(images: torch.Tensor, path: str, ncol: int = 8, title: str = "") -> None:
    """images [n, 1, 8, 8] in [-1, 1] as a grid with ncol columns."""
    imgs = unit_to_pixels01(images.detach().float().cpu())[:, 0]
    n = imgs.shape[0]
    nrow = max(1, -(-n // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(0.6 * ncol, 0.6 * nrow + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, path: str, per_class: int = 10, title: str = "",
                    row_name: str = "class") -> None:
    """One row per label 0..9 present in labels [n] (up to per_class images each), labelled on the left."""
    imgs = unit_to_pixels01(images.detach().float().cpu())[:, 0]
    labels = labels.detach().cpu().reshape(-1).long()
    rows = [c for c in range(NUM_CLASSES) if bool((labels == c).any())]
    if not rows:
        return save_grid(images[: per_class * 4], path, per_class, title)
    fig, axes = plt.subplots(len(rows), per_class, figsize=(0.6 * per_class + 0.6, 0.6 * len(rows) + 0.5),
                             squeeze=False)
    for r, c in enumerate(rows):
        members = imgs[labels == c][:per_class]
        for j in range(per_class):
            draw_image(axes[r, j], members[j:j + 1] if j < members.shape[0] else None)
        axes[r, 0].set_ylabel(f"{row_name} {c}", rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
