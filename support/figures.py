"""How every figure of the project is drawn, saved and shown.

Text legible at the notebook's 80 dpi, files saved at 120 dpi, and in a notebook a light PNG
with alternative text (`show`). The figures themselves live with what they show: the
learner's in utils.py (its accuracy figure's zoomed panel here), the ablation's in
benchmarks/ablation.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_ACC = 99.4  # the assignment's test accuracy, drawn as a dashed line
# Every figure's text, in points. The notebook draws inline at 80 dpi, where 1 pt is 1.1 px:
# under 10 pt, a digit is less than 8 px high.
TEXT_SIZES = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
              "xtick.labelsize": 11, "ytick.labelsize": 11, "legend.fontsize": 10.5,
              "figure.titlesize": 13}


def legible(draw: Callable) -> Callable:
    """Draw with TEXT_SIZES; a text's size is fixed when it is created, so it outlives this."""
    import functools

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


def whole_epochs(ax: Any) -> None:
    """Epoch ticks at whole numbers only: there is no epoch 2.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))


def target_line(ax: Any) -> None:
    """The assignment's 99.4%, dashed, named in the legend."""
    ax.axhline(TARGET_ACC, color="tab:red", linestyle="--", linewidth=1,
               label=f"target {TARGET_ACC}%")


def show_inline(fig: Any, alt: str) -> None:
    """`show` in a running notebook (an IPython kernel); elsewhere (train.py, the tests) the
    figure is only returned."""
    if _in_a_kernel():
        show(fig, alt)


def _in_a_kernel() -> bool:
    import sys

    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None) if shell else None
    return get is not None and get() is not None and "IPKernelApp" in get().config


# ---------------------------------------------------------------------------------------------
# The accuracy figure's zoomed panel (utils.plot_history).
# ---------------------------------------------------------------------------------------------
ZOOM_FROM = 98.5  # the accuracy plot's second panel starts here, so the last 0.1% shows


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
    edge = ax.get_xaxis_transform()
    epochs = f"epoch{'s' if len(below) > 1 else ''} {epoch_ranges(below)}"
    ax.plot(below, [0.03] * len(below), "v", transform=edge, color=line.get_color(),
            markersize=8, clip_on=False, label=f"{name} below {ZOOM_FROM}%: {epochs}")


def epoch_ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7': consecutive epochs as one range."""
    runs: list[list[int]] = []
    for e in sorted(int(e) for e in epochs):
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


