"""How every figure of the project is drawn, saved and shown.

Text legible at the notebook's 80 dpi, files saved at 120 dpi, and in a notebook a light PNG
with alternative text (`show`). The figures themselves live with what they show: the
learner's in utils.py, the ablation's in benchmarks/ablation.py.
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


def figures_dir(run: Any, images: str | os.PathLike | None) -> str | os.PathLike | None:
    """Where the notebook saves `run`'s figures: `images` once the run has all its epochs, else
    None (drawn inline only, with a word why), so a half-trained model never replaces them."""
    done, total = len(run.history["epoch"]), run.recipe["epochs"]
    if images is None or done == total:
        return images
    print(f"the run is incomplete ({done} of {total} epochs): its figures are drawn here, not "
          f"saved in {images}/; run the training cell again to finish it")
    return None


def save_figure(fig: Any, folder: str | os.PathLike | None, name: str) -> None:
    """Save a figure drawn earlier into `folder` (None: nowhere), as the plot helpers save."""
    if folder is not None:
        finish(fig, Path(folder) / name)
