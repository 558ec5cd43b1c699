"""The notebook's pictures of the data and of what the model gets wrong: a grid of digits, the
misclassified test digits the model was surest of, the confusion matrix, per-class accuracy.
Each draws with pyplot (so a notebook shows it inline), saves it when given a path, and
returns the figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from support.figures import finish, legible
from support.recipe import MEAN, STD


@legible
def image_grid(images: torch.Tensor, titles: list[str], cols: int = 8,
               path: str | os.PathLike | None = None, suptitle: str | None = None) -> Any:
    """A grid of (N, 1, 28, 28) or (N, 28, 28) images with a caption under each."""
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().reshape(len(images), 28, 28)
    rows = max(1, math.ceil(len(images) / cols))  # an empty grid still gets its title
    # Constrained layout: tight_layout leaves a two-line caption overlapping the digit above.
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.7 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        # Nearest: the digit's own 28 x 28 pixels, crisp at any size, never smoothed.
        ax.imshow(img.numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10.5)
    if suptitle:
        fig.suptitle(suptitle)
    return finish(fig, path)


def augmented_samples(loader: Any, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of one training batch, as the model sees them (de-normalised)."""
    x, y = next(iter(loader))
    return (x[:n] * STD + MEAN).clamp(0, 1), y[:n]


@torch.inference_mode()
def predict(model: nn.Module, loader: Any, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images de-normalised, labels, predictions, confidence) over a loader, on the CPU."""
    model.eval()
    xs, ys, preds, confs = [], [], [], []
    for x, y in loader:
        probs = model(x.to(device)).exp()
        conf, pred = probs.max(1)
        xs.append((x.cpu() * STD + MEAN).clamp(0, 1))
        ys.append(y.cpu())
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    return torch.cat(xs), torch.cat(ys), torch.cat(preds), torch.cat(confs)


def plot_misclassified(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                       conf: torch.Tensor, n: int = 24,
                       path: str | os.PathLike | None = None) -> Any:
    """The n misclassified test digits the model was most sure about.

    Three rows of eight by default: about half of a good run's mistakes, and light enough
    for the committed notebook (it must stay under 300 KB).
    """
    wrong = (preds != labels).nonzero().flatten()
    total = len(wrong)
    wrong = wrong[conf[wrong].argsort(descending=True)][:n]
    titles = [f"true {labels[i]}, pred {preds[i]}\n{100 * conf[i]:.0f}% sure"
              for i in wrong.tolist()]
    shown = (f"the {len(wrong)} the model was surest of" if len(wrong) < total
             else "all shown" if total else "none to show")
    return image_grid(images[wrong], titles, path=path,
                      suptitle=f"{total:,} of {len(labels):,} test digits misclassified; "
                               f"{shown}{', most confident first' if len(wrong) > 1 else ''}")


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor,
                     num_classes: int = 10) -> torch.Tensor:
    """Counts[true, predicted]."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float]:
    """Accuracy (%) of each true class, from a confusion matrix."""
    return (100.0 * cm.diag() / cm.sum(1).clamp(min=1)).tolist()


@legible
def plot_confusion_matrix(cm: torch.Tensor, path: str | os.PathLike | None = None) -> Any:
    """Counts with the diagonal uncoloured, so the few mistakes stand out; per-class accuracy in
    the row labels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    off = cm.clone().float()
    off.fill_diagonal_(0)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(off.numpy(), cmap="Reds", vmin=0)
    acc = per_class_accuracy(cm)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true (class accuracy)",
           title="Confusion matrix (colour: mistakes only)")
    ax.set_yticklabels([f"{i} ({a:.1f}%)" for i, a in enumerate(acc)])
    for t in range(10):
        for p in range(10):
            if int(cm[t, p]):
                _count(ax, im, t, p, int(cm[t, p]))
    # The colour bar in an axes of its own beside the matrix: with `fig.colorbar(ax=ax)` the
    # layout pushed the y-label off the figure's left edge. Counts are whole: integer ticks.
    cax = make_axes_locatable(ax).append_axes("right", size="4%", pad=0.15)
    fig.colorbar(im, cax=cax, ticks=MaxNLocator(integer=True), format="%d", label="mistakes")
    return finish(fig, path)


def _count(ax: Any, im: Any, true: int, pred: int, value: int) -> None:
    """A cell's count: white on a dark cell, black on a light one; mistakes in bold."""
    r, g, b, _ = im.cmap(im.norm(0.0 if true == pred else float(value)))
    dark = 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5  # relative luminance
    ax.text(pred, true, value, ha="center", va="center",
            fontsize=10.5 if true == pred else 12,
            fontweight="normal" if true == pred else "bold",
            color="white" if dark else "#303030" if true == pred else "black")


def save_analysis(model: nn.Module, test_loader: Any, device: torch.device,
                  save_dir: str | os.PathLike | None = "images") -> dict[str, Any]:
    """Misclassified grid, confusion matrix and per-class accuracy of a trained model."""
    images, labels, preds, conf = predict(model, test_loader, device)
    cm = confusion_matrix(labels, preds)
    out = Path(save_dir) if save_dir else None
    figs = {
        "misclassified": plot_misclassified(images, labels, preds, conf,
                                            path=out / "misclassified.png" if out else None),
        "confusion": plot_confusion_matrix(cm, path=out / "confusion_matrix.png" if out else None),
    }
    return {"confusion_matrix": cm, "per_class_accuracy": per_class_accuracy(cm), "figures": figs}
