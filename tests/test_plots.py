"""The figures: written as real PNGs, and the numbers behind them right."""

from __future__ import annotations

import base64
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import utils
from model import Net
from support import bookkeeping, figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("close_figures")  # conftest.py's, for every test here


def assert_png(path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def test_plot_history_writes_loss_and_accuracy_pngs(tmp_path):
    history = bookkeeping.new_history()
    for e in range(1, 4):
        row = dict(epoch=e, train_loss=1 / e, train_acc=90 + e, test_loss=0.5 / e,
                   test_acc=95 + e, lr=0.01, seconds=1.0)
        for k, v in row.items():
            history[k].append(v)
    loss_fig, acc_fig = utils.plot_history(history, save_dir=tmp_path)
    assert_png(tmp_path / "loss.png")
    assert_png(tmp_path / "accuracy.png")
    train_line, test_line = loss_fig.axes[0].get_lines()
    assert list(test_line.get_ydata()) == history["test_loss"]
    assert list(acc_fig.axes[0].get_lines()[1].get_ydata()) == history["test_acc"]


def test_plot_history_without_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    utils.plot_history({**bookkeeping.new_history(), "epoch": [1], "train_loss": [1.0],
                        "test_loss": [1.0], "train_acc": [50.0], "test_acc": [50.0]})
    assert list(tmp_path.iterdir()) == []


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 9])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 9])
    cm = figures.confusion_matrix(labels, preds)
    assert cm.shape == (10, 10)
    assert cm.sum() == len(labels)
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[9, 9] == 1
    acc = figures.per_class_accuracy(cm)
    assert acc[0] == 50.0 and acc[1] == 100.0 and acc[2] == pytest.approx(200 / 3)
    assert acc[5] == 0.0  # a class with no examples does not divide by zero


def test_plot_mistakes_writes_misclassified_grid_and_confusion_matrix(tmp_path, mnist_dir,
                                                                     capsys):
    torch.manual_seed(0)
    model = Net().eval()  # untrained: plenty of mistakes to show
    _, loader = utils.get_loaders({"test_batch_size": 100, "limit_test": 200}, mnist_dir,
                                  torch.device("cpu"))
    out = utils.plot_mistakes(model, loader, torch.device("cpu"), save_dir=tmp_path)
    assert_png(tmp_path / "misclassified.png")
    assert_png(tmp_path / "confusion_matrix.png")
    assert out["confusion_matrix"].sum() == 200
    assert len(out["per_class_accuracy"]) == 10
    assert capsys.readouterr().out.count("\ndigit ") == 9  # each digit's accuracy, one a line


def mistakes(n_wrong: int, n: int = 100) -> tuple[torch.Tensor, ...]:
    """(images, labels, preds, conf) of n test digits, the first n_wrong misclassified."""
    labels = torch.arange(n) % 10
    preds = labels.clone()
    preds[:n_wrong] = (labels[:n_wrong] + 1) % 10
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    conf = torch.linspace(0.2, 0.99, n)[shuffle]
    return torch.rand(n, 1, 28, 28), labels, preds, conf


def test_misclassified_grid_shows_the_24_most_confident_mistakes_first():
    images, labels, preds, conf = mistakes(30)  # 30 mistakes, more than the grid shows
    fig = figures.plot_misclassified(images, labels, preds, conf)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 24
    # each caption's second line labels its percentage: "97% sure"
    percents = [int(re.fullmatch(r"(\d+)% sure", ax.get_title().rsplit("\n", 1)[1])[1])
                for ax in shown]
    assert percents == sorted(percents, reverse=True)
    assert percents[0] == round(100 * float(conf[:30].max()))
    assert all(ax.get_title().startswith("true ") and "pred" in ax.get_title() for ax in shown)
    assert fig._suptitle.get_text() == ("30 of 100 test digits misclassified; the 24 the model "
                                        "was surest of, most confident first")


@pytest.mark.parametrize(("n_wrong", "title"), [
    (5, "5 of 100 test digits misclassified; all shown, most confident first"),
    (1, "1 of 100 test digits misclassified; all shown"),
    (0, "0 of 100 test digits misclassified; none to show"),
])
def test_misclassified_title_says_how_many_it_shows(tmp_path, n_wrong, title):
    fig = figures.plot_misclassified(*mistakes(n_wrong), path=tmp_path / "m.png")
    assert len([ax for ax in fig.axes if ax.images]) == n_wrong
    assert fig._suptitle.get_text() == title
    assert_png(tmp_path / "m.png")  # no mistakes at all still draws a figure


def test_misclassified_captions_do_not_overlap_the_digits(tmp_path):
    fig = figures.plot_misclassified(*mistakes(30))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = [ax for ax in fig.axes if ax.images]
    pictures = [ax.images[0].get_window_extent(renderer) for ax in shown]
    for ax in shown:
        caption = ax.title.get_window_extent(renderer)
        assert not any(caption.overlaps(p) for p in pictures), ax.get_title()


def history_of(epochs: int) -> dict[str, list[float]]:
    """A made-up run whose test accuracy crosses 99.4% near the end, as the real one does."""
    history = bookkeeping.new_history()
    for e in range(1, epochs + 1):
        row = dict(epoch=e, train_loss=0.5 / e, train_acc=100 - 8 / e - 0.6, test_loss=0.2 / e,
                   test_acc=100 - 3 / e - 0.45, lr=0.01, seconds=1.0)
        for k, v in row.items():
            history[k].append(v)
    return history


def visible_ticks(ax, axis: str) -> list[float]:
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t in ticks if lo <= t <= hi]


@pytest.mark.parametrize("epochs", [1, 3, 20])
def test_epoch_ticks_are_whole_numbers(epochs):
    figs = utils.plot_history(history_of(epochs))
    axes = [ax for fig in figs for ax in fig.axes]
    assert len(axes) == 3  # loss; accuracy and its zoom
    for ax in axes:
        ticks = visible_ticks(ax, "x")
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def dashed_at(ax, y: float) -> bool:
    return any(line.get_linestyle() == "--" and set(line.get_ydata()) == {y}
               for line in ax.get_lines())


def test_accuracy_plot_has_the_target_line_and_a_panel_from_98_5_up():
    history = history_of(20)
    _, acc = utils.plot_history(history)
    full, zoom = acc.axes
    assert dashed_at(full, 99.4) and dashed_at(zoom, 99.4)
    assert zoom.get_ylim()[0] == 98.5 and zoom.get_ylim()[1] > max(history["test_acc"])
    assert any(list(line.get_ydata()) == history["test_acc"] for line in zoom.get_lines())


def test_confusion_matrix_label_fits_and_colour_bar_counts_are_whole(tmp_path):
    cm = torch.diag(torch.full((10,), 990))
    cm[7, 0], cm[1, 9], cm[4, 2] = 4, 3, 1
    fig = figures.plot_confusion_matrix(cm, path=tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    matrix, bar = fig.axes
    label = matrix.yaxis.label.get_window_extent(renderer)
    assert label.x0 >= 0 and label.x1 <= fig.bbox.width  # not cut off at the left edge
    ticks = visible_ticks(bar, "y")
    assert ticks == [0, 1, 2, 3, 4]
    assert [t.get_text() for t in bar.get_yticklabels() if t.get_text()] == ["0", "1", "2", "3",
                                                                             "4"]


def test_confusion_matrix_with_no_mistakes_still_draws(tmp_path):
    figures.plot_confusion_matrix(torch.diag(torch.full((10,), 1000)), path=tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")


# ---------------------------------------------------------------------------------------------
# Legible at the notebook's 80 dpi.
# ---------------------------------------------------------------------------------------------
def cell_text(ax, true: int, pred: int):
    (text,) = [t for t in ax.texts if t.get_position() == (pred, true)]
    return text


def luminance(colour) -> float:
    r, g, b, _ = matplotlib.colors.to_rgba(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_confusion_matrix_counts_contrast_with_their_cells():
    cm = torch.diag(torch.full((10,), 990))
    cm[5, 3], cm[9, 4], cm[6, 8] = 5, 4, 1  # the darkest cell, a dark one, the lightest
    ax = figures.plot_confusion_matrix(cm).axes[0]
    assert cell_text(ax, 5, 3).get_text() == "5"
    assert cell_text(ax, 5, 3).get_color() == "white"  # was black on dark red
    assert cell_text(ax, 9, 4).get_color() == "white"
    assert cell_text(ax, 6, 8).get_color() == "black"
    diagonal = cell_text(ax, 0, 0)
    assert diagonal.get_text() == "990" and luminance(diagonal.get_color()) < 0.25  # not grey
    assert min(t.get_fontsize() for t in ax.texts) >= 10


def history_from(train: list[float], test: list[float]) -> dict[str, list[float]]:
    history = history_of(len(test))
    history["train_acc"], history["test_acc"] = train, test
    return history


def below_markers(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()
            if line.get_marker() == "v"}


def test_zoomed_panel_marks_the_epochs_below_its_floor():
    history = history_from(train=[92.6, 97.9, 98.3, 98.6, 98.8, 99.0],
                           test=[98.4, 98.9, 99.1, 99.2, 99.3, 99.45])
    _, acc = utils.plot_history(history)
    zoom = acc.axes[1]
    assert zoom.get_ylim()[0] == 98.5
    assert below_markers(zoom) == {"train below 98.5%: epochs 1-3": [1, 2, 3],
                                   "test below 98.5%: epoch 1": [1]}
    legend = [t.get_text() for t in zoom.get_legend().get_texts()]
    assert "train below 98.5%: epochs 1-3" in legend


def test_zoomed_panel_has_no_marks_when_every_epoch_is_in_it():
    _, acc = utils.plot_history(history_from([98.6, 99.0], [98.9, 99.5]))
    assert below_markers(acc.axes[1]) == {}


@pytest.mark.parametrize("top", [99.55, 99.95])
def test_final_accuracy_note_is_legible_and_clear_of_the_top_edge(top):
    _, acc = utils.plot_history(history_from([98.6, 99.0, top - 0.1], [98.9, 99.3, top]))
    zoom = acc.axes[1]
    (note,) = [t for t in zoom.texts if t.get_text() == f"{top:.2f}%"]
    assert note.get_fontsize() >= 11
    acc.canvas.draw()
    renderer = acc.canvas.get_renderer()
    assert note.get_window_extent(renderer).y1 <= zoom.get_window_extent(renderer).y1 - 3


@pytest.mark.parametrize(("epochs", "text"), [([1, 2, 3], "1-3"), ([5], "5"),
                                              ([1, 2, 3, 7, 9, 10], "1-3, 7, 9-10")])
def test_epoch_ranges(epochs, text):
    assert figures.epoch_ranges(epochs) == text


def every_figure() -> list:
    cm = torch.diag(torch.full((10,), 990))
    cm[5, 3] = 5
    return [*utils.plot_history(history_of(20)), figures.plot_confusion_matrix(cm),
            figures.plot_misclassified(*mistakes(30)),
            figures.image_grid(torch.rand(8, 28, 28), ["label 1"] * 8, suptitle="samples")]


def test_no_text_in_any_figure_is_smaller_than_10_points():
    """10 pt is 11 px at the notebook's 80 dpi; the confusion matrix's counts were 7 pt."""
    for fig in every_figure():
        fig.canvas.draw()
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t.get_visible()]
        small = {t.get_text(): t.get_fontsize() for t in texts if t.get_fontsize() < 10}
        assert texts and not small, small


# ---------------------------------------------------------------------------------------------
# show: a notebook figure with alternative text.
# ---------------------------------------------------------------------------------------------
def test_png_bytes_is_a_palette_png_smaller_than_matplotlibs_own():
    from PIL import Image

    fig = utils.plot_history(history_of(20))[1]
    palette, rgba = figures.png_bytes(fig, dpi=80), figures.png_bytes(fig, dpi=80, colours=None)
    assert palette[:8] == rgba[:8] == PNG_MAGIC
    assert Image.open(io.BytesIO(palette)).mode == "P"
    assert Image.open(io.BytesIO(palette)).size == Image.open(io.BytesIO(rgba)).size
    assert len(palette) < len(rgba) / 2


@pytest.fixture
def displayed(monkeypatch) -> list[tuple[dict, dict]]:
    """What IPython.display.display was given: (data, metadata) per call."""
    import IPython.display

    calls = []

    def display(data, raw=False, metadata=None):
        assert raw
        calls.append((data, metadata))

    monkeypatch.setattr(IPython.display, "display", display)
    return calls


def test_show_displays_a_png_with_its_alt_text_and_closes_the_figure(displayed):
    fig = utils.plot_history(history_of(20))[0]
    figures.show(fig, "Loss per epoch: both curves fall.")
    ((data, metadata),) = displayed
    assert base64.b64decode(data["image/png"])[:8] == PNG_MAGIC
    assert data["text/plain"] == "Loss per epoch: both curves fall."
    assert metadata == {"image/png": {"alt": "Loss per epoch: both curves fall."}}
    assert not plt.fignum_exists(fig.number)  # the inline backend will not show it again


def test_nbconverts_classic_template_writes_the_alt_text(displayed):
    import nbformat
    from bs4 import BeautifulSoup
    from nbconvert import HTMLExporter

    alt = 'Loss "per" epoch <falling>'
    figures.show(utils.plot_history(history_of(3))[0], alt)
    ((data, metadata),) = displayed
    output = nbformat.v4.new_output("display_data", data=data, metadata=metadata)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("show()", outputs=[output])])
    html, _ = HTMLExporter(template_name="classic").from_notebook_node(nb)
    (img,) = BeautifulSoup(html, "html.parser").find_all("img")
    assert img["alt"] == alt and img["src"] == f"data:image/png;base64,{data['image/png']}"
