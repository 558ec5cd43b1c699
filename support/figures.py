"""The lesson's figures, and how every figure of the project is drawn, saved and shown.

Text legible at the notebook's 80 dpi, files saved at 120 dpi, and in a notebook a light PNG
with alternative text (`show`). Read top to bottom: those rules, then the learner's figures
(utils.plot_history and utils.plot_mistakes are these): the loss and accuracy per epoch with
the accuracy's zoomed panel, the misclassified digits and the confusion matrix. The ablation's
and the speedrun's figures live with their benchmarks.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from support.bookkeeping import history_columns
from support.recipe import MEAN, STD

TARGET_ACC = 99.4  # the assignment's test accuracy, drawn as a dashed line
ZOOM_FROM = 98.5  # the accuracy figure's second panel starts here, so the last 0.1% shows
# Every figure's text, in points. The notebook draws inline at 80 dpi, where 1 pt is 1.1 px:
# under 10 pt, a digit is less than 8 px high.
TEXT_SIZES = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
              "xtick.labelsize": 11, "ytick.labelsize": 11, "legend.fontsize": 10.5,
              "figure.titlesize": 13}


def legible(draw: Callable) -> Callable:
    """Draw with TEXT_SIZES; a text's size is fixed when it is created, so it outlives this."""
    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Any:
        import matplotlib.pyplot as plt

        with plt.rc_context(TEXT_SIZES):
            return draw(*args, **kwargs)

    return drawn


def finish(fig: Any, path: str | os.PathLike | None) -> Any:
    """Lay the figure out, save it at 120 dpi when given a path, and return it."""
    if fig.get_layout_engine() is None:  # a figure made with its own layout keeps it
        fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def png_bytes(fig: Any, dpi: float | None = None, colours: int | None = 256) -> bytes:
    """The figure as the notebook shows it (tight box), at `dpi` (default: the figure's own).

    With `colours`, a palette PNG of at most that many colours: a plot has few, and the file is
    about 2.5 times smaller than matplotlib's RGBA one, with no difference to see.
    """
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    if colours is None:
        return buf.getvalue()
    image = Image.open(buf).convert("RGB")
    # No dithering: its noise would cost bytes and blur thin lines.
    palette = image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="png", optimize=True)
    return out.getvalue()


def show(fig: Any, alt: str, dpi: float | None = None) -> None:
    """Show a figure in the notebook as a PNG output whose alt text is `alt`, and close it.

    nbconvert's classic HTML template writes the output's metadata "alt" into the <img> tag; its
    default (lab) template does not. Closing the figure keeps the inline backend from showing it
    a second time at the end of the cell.
    """
    import base64

    import matplotlib.pyplot as plt
    from IPython.display import display

    data = base64.b64encode(png_bytes(fig, dpi)).decode("ascii")
    display({"image/png": data, "text/plain": alt}, raw=True,
            metadata={"image/png": {"alt": alt}})
    plt.close(fig)


def show_inline(fig: Any, alt: str) -> None:
    """`show` in a running notebook (an IPython kernel); elsewhere (train.py, the tests) the
    figure is only returned."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None) if shell else None
    if get is not None and get() is not None and "IPKernelApp" in get().config:
        show(fig, alt)


def target_line(ax: Any) -> None:
    """The assignment's 99.4%, dashed, named in the legend."""
    ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
               label=f"target {TARGET_ACC}%")


# ---------------------------------------------------------------------------------------------
# The write-up's two figures: loss and accuracy per epoch.
# ---------------------------------------------------------------------------------------------
@legible
def plot_history(history: Any, save_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Train and test loss, and train and test accuracy, per epoch (`history`: rows or
    columns); the accuracy gets a second panel from 98.5% up, where the test curve meets the
    dashed 99.4% target. Saved in `save_dir` when given; shown inline in a notebook."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = history_columns(history) if isinstance(history, list) else history
    drawn = []
    for key, label, name in (("loss", "loss (NLL)", "loss.png"),
                             ("acc", "accuracy (%)", "accuracy.png")):
        panels = 2 if key == "acc" else 1
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
        ax = axes[0, 0]
        ax.plot(columns["epoch"], columns[f"train_{key}"], "o-", label="train")
        ax.plot(columns["epoch"], columns[f"test_{key}"], "s-", label="test")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label.split(' ')[0].title()} per epoch")
        if key == "acc":
            target_line(ax)
            zoomed_accuracy(axes[0, 1], columns)
        for a in axes.flat:  # epoch ticks at whole numbers only: there is no epoch 2.5
            a.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10],
                                                  min_n_ticks=1))
            a.grid(alpha=0.3)
        ax.legend()
        drawn.append(finish(fig, Path(save_dir) / name if save_dir else None))
    show_inline(drawn[0], "Train and test loss (NLL) per epoch")
    show_inline(drawn[1], "Train and test accuracy per epoch against the dashed 99.4% target; "
                "the right panel zooms in from 98.5% up, with the final test accuracy marked")
    return drawn[0], drawn[1]


def zoomed_accuracy(ax: Any, history: dict[str, list[float]]) -> None:
    """Accuracy from ZOOM_FROM up, with the target line and the final test accuracy."""
    train = ax.plot(history["epoch"], history["train_acc"], "o-", alpha=0.5, label="train")[0]
    test = ax.plot(history["epoch"], history["test_acc"], "s-", label="test")[0]
    target_line(ax)
    top = max([TARGET_ACC, *history["test_acc"], *history["train_acc"]])
    # Room above the highest point for the final accuracy's note: a third of the span.
    ax.set_ylim(ZOOM_FROM, top + max(0.15, 0.3 * (top - ZOOM_FROM)))
    for line, name in ((train, "train"), (test, "test")):
        _mark_below_floor(ax, line, name)
    if history["epoch"]:
        last, acc = history["epoch"][-1], history["test_acc"][-1]
        ax.annotate(f"{acc:.2f}%", (last, acc), textcoords="offset points", xytext=(0, 9),
                    ha="center", va="bottom", fontsize=12, fontweight="bold",
                    color=test.get_color())
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"Accuracy from {ZOOM_FROM}% up")
    ax.legend(loc="best")  # up to five entries: where they cover the fewest points


def _mark_below_floor(ax: Any, line: Any, name: str) -> None:
    """A curve's epochs under the panel's floor, as ▼ on its bottom edge, named in the legend."""
    below = [e for e, a in zip(line.get_xdata(), line.get_ydata(), strict=True) if a < ZOOM_FROM]
    if not below:
        return
    # x in epochs, y in the panel's height: just above the bottom edge, whatever the limits.
    epochs = f"epoch{'s' if len(below) > 1 else ''} {epoch_ranges(below)}"
    ax.plot(below, [0.03] * len(below), "v", transform=ax.get_xaxis_transform(),
            color=line.get_color(), markersize=8, clip_on=False,
            label=f"{name} below {ZOOM_FROM}%: {epochs}")


def epoch_ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7': consecutive epochs as one range."""
    runs: list[list[int]] = []
    for e in sorted(int(e) for e in epochs):
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# ---------------------------------------------------------------------------------------------
# What the model gets wrong: the misclassified digits it was surest of, the confusion matrix.
# ---------------------------------------------------------------------------------------------
def plot_mistakes(model: nn.Module, test_loader: Any, device: torch.device,
                  save_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The misclassified test digits the model was surest of, the confusion matrix, and each
    digit's accuracy (printed); saved in `save_dir` when given, shown inline in a notebook."""
    images, labels, preds, conf = predict(model, test_loader, device)
    cm = confusion_matrix(labels, preds)
    out = Path(save_dir) if save_dir else None
    figs = {
        "misclassified": plot_misclassified(images, labels, preds, conf,
                                            path=out / "misclassified.png" if out else None),
        "confusion": plot_confusion_matrix(cm, path=out / "confusion_matrix.png" if out else None),
    }
    show_inline(figs["misclassified"], "The misclassified test digits the model was surest of, "
                "each captioned with its true and predicted digit and the model's confidence")
    show_inline(figs["confusion"], "Confusion matrix of the test digits: true digit by row, "
                "predicted by column, mistakes coloured by count")
    accuracy = per_class_accuracy(cm)
    for digit, acc in enumerate(accuracy):
        print(f"digit {digit}: {acc:.2f}%")
    return {"confusion_matrix": cm, "per_class_accuracy": accuracy, "figures": figs}


@torch.inference_mode()
def predict(model: nn.Module, loader: Any, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images de-normalised, labels, predictions, confidence) over a loader, on the CPU."""
    model.eval()
    xs, ys, preds, confs = [], [], [], []
    for x, y in loader:
        conf, pred = model(x.to(device)).exp().max(1)
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
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true (class accuracy)",
           title="Confusion matrix (colour: mistakes only)")
    ax.set_yticklabels([f"{i} ({a:.1f}%)" for i, a in enumerate(per_class_accuracy(cm))])
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
