"""The figures: written as real PNGs, and the numbers behind them right."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402
from model import Net  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def assert_png(path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path


def test_plot_history_writes_loss_and_accuracy_pngs(tmp_path):
    history = utils.new_history()
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
    utils.plot_history({**utils.new_history(), "epoch": [1], "train_loss": [1.0],
                        "test_loss": [1.0], "train_acc": [50.0], "test_acc": [50.0]})
    assert list(tmp_path.iterdir()) == []


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 9])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 2, 9])
    cm = utils.confusion_matrix(labels, preds)
    assert cm.shape == (10, 10)
    assert cm.sum() == len(labels)
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[9, 9] == 1
    acc = utils.per_class_accuracy(cm)
    assert acc[0] == 50.0 and acc[1] == 100.0 and acc[2] == pytest.approx(200 / 3)
    assert acc[5] == 0.0  # a class with no examples does not divide by zero


def test_save_analysis_writes_misclassified_grid_and_confusion_matrix(tmp_path, mnist_dir):
    torch.manual_seed(0)
    model = Net().eval()  # untrained: plenty of mistakes to show
    loader = utils.device_loader(mnist_dir, train=False, batch_size=100, device="cpu", limit=200)
    out = utils.save_analysis(model, loader, torch.device("cpu"), save_dir=tmp_path)
    assert_png(tmp_path / "misclassified.png")
    assert_png(tmp_path / "confusion_matrix.png")
    assert out["confusion_matrix"].sum() == 200
    assert len(out["per_class_accuracy"]) == 10


def test_image_grid_of_augmented_samples(tmp_path, mnist_dir):
    loader = utils.device_loader(mnist_dir, train=True, batch_size=16, device="cpu", limit=64)
    x, y = utils.augmented_samples(loader, n=16)
    assert x.shape == (16, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    utils.image_grid(x, [str(int(v)) for v in y], path=tmp_path / "samples.png")
    assert_png(tmp_path / "samples.png")
