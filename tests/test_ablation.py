"""The ablation: its named options change one ingredient each, and benchmarks/ablation.py runs,
skips and reports them from the JSON files alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from PIL import Image
from torch import nn

import model
import train
import utils
from benchmarks import ablation
from model import Net
from support import augment, fast_loader, mnist_files, torchvision_loader
from support.fused_dropout import ReLUDropout, fuse_relu_dropout
from support.recipe import net_options

ROOT = Path(__file__).resolve().parent.parent
CONVS = ("conv1", "conv2", "trans1", "conv3", "conv4", "trans2", "conv5")


pytestmark = pytest.mark.usefixtures("close_figures")  # conftest.py's, for every test here


# ---------------------------------------------------------------------------------------------
# The model options.
# ---------------------------------------------------------------------------------------------
def test_no_batch_norm_removes_every_batchnorm_and_gives_each_conv_a_bias():
    net = Net(batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is not None for c in convs)
    assert sum(type(m) is nn.Dropout for m in net.modules()) == 2  # dropout kept
    fused = fuse_relu_dropout(Net(batch_norm=False))  # Conv-ReLU-Dropout fuses too
    assert sum(isinstance(m, ReLUDropout) for m in fused.modules()) == 2
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_default_keeps_batchnorm_and_no_conv_bias():
    net = Net()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 7
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_bare_transitions_are_plain_1x1_convs_and_the_rest_is_unchanged():
    bare, table = Net(transitions="bare"), Net()
    for name in ("trans1", "trans2"):
        block = getattr(bare.features, name)
        assert len(block) == 1 and isinstance(block[0], nn.Conv2d), name
        assert block[0].kernel_size == (1, 1) and block[0].bias is None
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6"):
        assert repr(getattr(bare.features, name)) == repr(getattr(table.features, name)), name
    # the convs' weights keep their keys: only the two transitions' BatchNorms are gone
    gone = set(table.state_dict()) - set(bare.state_dict())
    assert gone and all(k.startswith(("features.trans1.1.", "features.trans2.1.")) for k in gone)
    assert set(bare.state_dict()) < set(table.state_dict())


def test_an_unknown_transition_is_refused():
    with pytest.raises(ValueError, match="unknown transitions 'none'"):
        Net(transitions="none")


@pytest.mark.parametrize("options", [dict(batch_norm=False), dict(transitions="bare"),
                                     dict(dropout_plan="every")])
def test_every_model_variant_stays_under_20k_parameters(options):
    assert model.count_parameters(Net(**options)) < 20_000


def built(recipe: dict) -> torch.nn.Module:
    """The recipe's model as the notebook builds it: Net, then the recipe's fast path."""
    return utils.prepare_model(Net(**net_options(recipe)), recipe, torch.device("cpu"))


def test_prepare_model_follows_the_recipe():
    recipe = {**utils.RECIPE, "batch_norm": False, "transitions": "bare"}
    net = built(recipe)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(net.features.trans1) == 1
    default = built(utils.RECIPE)
    assert any(isinstance(m, nn.BatchNorm2d) for m in default.modules())


# ---------------------------------------------------------------------------------------------
# The augmentation option, in both loaders.
# ---------------------------------------------------------------------------------------------
def first_batch(mnist_dir, augmentation: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    recipe = {"batch_size": 64, "seed": seed, "limit_train": 256, "augmentation": augmentation}
    loader, _ = utils.get_loaders(recipe, mnist_dir, torch.device("cpu"))
    return next(iter(loader))


def expected_first_batch(mnist_dir, crop_on: bool, rotate_on: bool,
                         seed: int = 3) -> torch.Tensor:
    """The draws a seeded loader makes (its shuffle, then angles and crop flags), applied by
    hand with only the parts asked for."""
    images, _ = mnist_files.load_mnist_tensors(mnist_dir, train=True)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(256, generator=gen)[:64]
    angles, crop = augment.sample_augment_params(64, gen)
    assert crop.any() and not crop.all()  # the batch holds both kinds, so the test can fail
    x = augment.augment_batch(images[:256].unsqueeze(1)[idx], angles * rotate_on, crop & crop_on)
    return fast_loader.normalize(x.float() / 255)


@pytest.mark.parametrize("augmentation", list(augment.AUGMENTATIONS))
def test_fast_loader_applies_only_the_named_augmentation(mnist_dir, augmentation):
    crop_on, rotate_on = augment.AUGMENTATIONS[augmentation]
    x, y = first_batch(mnist_dir, augmentation)
    torch.testing.assert_close(x, expected_first_batch(mnist_dir, crop_on, rotate_on),
                               rtol=0, atol=0)
    assert torch.equal(y, first_batch(mnist_dir, "both")[1])  # the same shuffle in every variant


def test_the_variants_differ_from_the_recipe(mnist_dir):
    both = first_batch(mnist_dir, "both")[0]
    for augmentation in ("rotate", "crop", "none"):
        assert not torch.equal(first_batch(mnist_dir, augmentation)[0], both), augmentation


def test_torchvision_pipeline_applies_only_the_named_augmentation():
    digit = Image.fromarray((torch.arange(28 * 28) % 256).to(torch.uint8).view(28, 28).numpy())
    plain = torchvision_loader.test_transforms()(digit)
    assert torch.equal(torchvision_loader.train_transforms("none")(digit), plain)

    def kinds(augmentation: str) -> set[str]:
        steps = torchvision_loader.train_transforms(augmentation).transforms
        return {type(t).__name__ for t in steps}

    assert {"RandomApply", "RandomRotation"} <= kinds("both")
    assert "RandomApply" in kinds("crop") and "RandomRotation" not in kinds("crop")
    assert "RandomRotation" in kinds("rotate") and "RandomApply" not in kinds("rotate")
    torch.manual_seed(0)  # whose first angle, -0.1°, moves no pixel: so try a few
    rotate = torchvision_loader.train_transforms("rotate")
    assert any(not torch.equal(rotate(digit), plain) for _ in range(5))


def test_an_unknown_augmentation_is_refused(mnist_dir):
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        torchvision_loader.train_transforms("flip")
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        utils.get_loaders({"augmentation": "flip"}, mnist_dir, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The variants: each is train.py flags that change exactly one ingredient of the recipe.
# ---------------------------------------------------------------------------------------------
CHANGES = {
    "recipe": {},
    "no-batchnorm": {"batch_norm": False},
    "no-dropout": {"dropout_plan": "none"},
    "no-augmentation": {"augmentation": "none"},
    "rotation-only": {"augmentation": "rotate"},
    "crop-only": {"augmentation": "crop"},
    "constant-lr": {"gamma": 1.0},
    "bare-transitions": {"transitions": "bare"},
    "dropout-every": {"dropout_plan": "every"},
    "gap-head": {"head": "gap"},
    "width-0.85": {"width": 0.85},
    "width-0.7": {"width": 0.7},
    "width-0.55": {"width": 0.55},
}


def recipe_of(flags: list[str]) -> dict:
    return train.recipe_from(train.build_parser().parse_args(flags))


def test_every_recipe_key_has_a_train_flag_whose_default_is_the_recipe():
    assert recipe_of([]) == utils.RECIPE


def test_each_variant_changes_exactly_its_ingredient():
    assert set(ablation.VARIANTS) == set(CHANGES)
    default = recipe_of([])
    for name, change in CHANGES.items():
        recipe = recipe_of(ablation.train_flags(name))
        diff = {k: v for k, v in recipe.items() if default[k] != v}
        assert diff == change, name


# ---------------------------------------------------------------------------------------------
# The report, from JSON files alone.
# ---------------------------------------------------------------------------------------------
def fake_metrics(test_acc: list[float], train_acc: float, params: int = 19_200) -> dict:
    """What train.py's --metrics writes, as far as the report reads it."""
    epochs = list(range(1, len(test_acc) + 1))
    return {"parameters": params, "final_test_acc": test_acc[-1], "best_test_acc": max(test_acc),
            "history": {"epoch": epochs, "test_acc": test_acc,
                        "train_acc": [90.0] * (len(epochs) - 1) + [train_acc]}}


def write(out: Path, name: str, seed: int, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ablation.metrics_path(out, name, seed).write_text(json.dumps(metrics))


def test_report_summarises_each_variant_and_lists_the_missing(tmp_path):
    write(tmp_path, "recipe", 1, fake_metrics([98.0, 99.5, 99.2, 99.4], 99.0))
    write(tmp_path, "recipe", 2, fake_metrics([98.0, 99.0, 99.7, 99.6], 99.2))
    write(tmp_path, "no-dropout", 1, fake_metrics([98.0, 99.1], 99.8, params=19_100))
    (tmp_path / "recipe_seed3.log").write_text("not a result")
    rows = {r.variant: r for r in ablation.summarise(ablation.load_results(tmp_path))}
    assert list(rows) == list(ablation.VARIANTS)
    r = rows["recipe"]
    assert r.seeds == [1, 2] and r.parameters == 19_200
    assert r.mean_test == pytest.approx(99.5) and r.sd_test == pytest.approx(0.1414, abs=1e-4)
    assert r.mean_best_epoch == 2.5 and r.mean_train == pytest.approx(99.1)
    assert rows["no-dropout"].sd_test is None and rows["no-dropout"].mean_test == 99.1
    assert rows["no-batchnorm"].seeds == [] and rows["no-batchnorm"].mean_test is None

    table = ablation.format_table(list(rows.values())).splitlines()
    assert len(table) == 2 + len(ablation.VARIANTS)
    recipe_row = next(line for line in table if line.startswith("| recipe |"))
    assert "| 19,200 | 2 | 99.50 | 0.141 | 2.5 | 99.10 |" in recipe_row
    assert "missing" in next(line for line in table if line.startswith("| no-batchnorm |"))


def test_figure_has_a_dot_per_seed_and_the_target_line(tmp_path):
    write(tmp_path, "recipe", 1, fake_metrics([98.0, 99.4], 99.0))
    write(tmp_path, "recipe", 2, fake_metrics([98.0, 99.6], 99.2))
    write(tmp_path, "crop-only", 7, fake_metrics([98.0, 99.2], 99.5))
    fig = ablation.plot_ablation(ablation.load_results(tmp_path), tmp_path / "a.png")
    ax = fig.axes[0]
    dots = sorted(x for line in ax.get_lines() if line.get_marker() == "o"
                  for x in line.get_xdata())
    assert dots == [99.2, 99.4, 99.6]
    recipe_ys = [y for line in ax.get_lines() if line.get_marker() == "o"
                 for y in line.get_ydata() if abs(y) < 0.5]  # the recipe's row is y = 0
    assert len(set(recipe_ys)) == 2  # two seeds, two dots even at equal accuracy
    assert any(line.get_linestyle() == "--" and list(line.get_xdata()) == [99.4, 99.4]
               for line in ax.get_lines())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(ablation.VARIANTS)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_report_with_no_results_yet_lists_every_variant_as_missing(tmp_path):
    table = ablation.report(tmp_path / "nothing", tmp_path / "a.png", tmp_path / "p.png")
    assert table.count("missing") == len(ablation.VARIANTS)
    assert (tmp_path / "a.png").exists() and (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------------------------
# The parameters figure: how many parameters does 99.4% need?
# ---------------------------------------------------------------------------------------------
WIDTHS = {"recipe": (19_200, [99.55, 99.48, 99.55]), "width-0.85": (14_193, [99.50, 99.47]),
          "width-0.7": (9_920, [99.44]), "width-0.55": (6_744, [99.33, 99.38, 99.30])}
GAP = (16_640, [99.45, 99.50])


def sweep_results(tmp_path: Path) -> dict:
    for name, (params, finals) in {**WIDTHS, "gap-head": GAP}.items():
        for seed, acc in enumerate(finals, 1):
            write(tmp_path, name, seed, fake_metrics([98.0, acc], 99.0, params=params))
    write(tmp_path, "no-dropout", 1, fake_metrics([98.0, 99.9], 99.0))  # not in this figure
    return ablation.load_results(tmp_path)


def line_labelled(ax, label: str):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return line


def test_parameters_figure_has_a_dot_per_seed_and_the_means_joined_across_widths(tmp_path):
    fig = ablation.plot_parameters(sweep_results(tmp_path), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    dots = line_labelled(ax, "our runs, a dot per seed")
    assert sorted(dots.get_ydata()) == sorted(a for _, finals in WIDTHS.values() for a in finals)
    params = {p for p, _ in WIDTHS.values()}
    assert all(any(abs(x / p - 1) <= 0.02 + 1e-9 for p in params) for x in dots.get_xdata())
    means = line_labelled(ax, "mean over seeds")
    assert list(means.get_xdata()) == [6_744, 9_920, 14_193, 19_200]
    assert list(means.get_ydata()) == pytest.approx([99.33667, 99.44, 99.485, 99.52667],
                                                    abs=1e-4)
    gap = line_labelled(ax, "gap head, a dot per seed")
    assert gap.get_marker() != dots.get_marker() and list(gap.get_ydata()) == GAP[1]
    assert any(line.get_linestyle() == "--" and set(line.get_ydata()) == {99.4}
               for line in ax.get_lines())
    names = {t.get_text().split("\n")[0] for t in ax.texts}
    assert {"recipe", "width-0.85", "width-0.7", "width-0.55", "gap-head"} <= names
    assert "no-dropout" not in names


def test_parameters_figure_marks_the_published_runs_as_other_peoples(tmp_path):
    ax = ablation.plot_parameters(sweep_results(tmp_path)).axes[0]
    stars = line_labelled(ax, "published by others (single runs)")
    assert stars.get_color() != line_labelled(ax, "our runs, a dot per seed").get_color()
    assert list(zip(stars.get_xdata(), stars.get_ydata(), strict=True)) == [(8_932, 99.50),
                                                                            (9_404, 99.52)]
    span = [line for line in ax.get_lines() if list(line.get_xdata()) == [7_070, 7_979]]
    assert len(span) == 1 and list(span[0].get_ydata()) == [99.4, 99.4]
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "course reference\n8,932: 99.50%\n(epoch 15 of 15)" in texts
    assert "deepanshudashora/ERAV1\n9,404: 99.52%\n(epoch 20)" in texts
    assert "next session's target\nmet by peers: 7,070-7,979\n(<= 15 epochs)" in texts


def test_parameters_figure_without_results_still_shows_the_published_runs(tmp_path):
    ax = ablation.plot_parameters(ablation.load_results(tmp_path / "nothing"),
                               tmp_path / "p.png").axes[0]
    assert (tmp_path / "p.png").exists()
    assert "no results yet for the recipe's widths" in [t.get_text() for t in ax.texts]
    assert len(line_labelled(ax, "published by others (single runs)").get_xdata()) == 2


# ---------------------------------------------------------------------------------------------
# The script, for real: one tiny run, then a second invocation that skips it.
# ---------------------------------------------------------------------------------------------
def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "benchmarks/ablation.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_script_runs_a_variant_skips_it_when_done_and_reports(tmp_path, mnist_dir):
    out, fig = tmp_path / "ablation", tmp_path / "ablation.png"
    tiny = ["--", "--epochs", "1", "--limit-train", "256", "--limit-test", "200",
            "--device", "cpu"]
    done = run_script("--variants", "no-dropout", "--seeds", "5", "--out", str(out),
                      "--figure", str(fig), "--threads", "1", *tiny)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "parameters.png").read_bytes()[:4] == b"\x89PNG"  # next to --figure
    result = out / "no-dropout_seed5.json"
    metrics = json.loads(result.read_text())
    assert metrics["recipe"]["dropout_plan"] == "none" and metrics["recipe"]["seed"] == 5
    assert metrics["recipe"]["epochs"] == 1 and len(metrics["history"]["epoch"]) == 1
    assert fig.read_bytes()[:4] == b"\x89PNG"
    assert "| no-dropout | no dropout | 19,200 | 1 |" in done.stdout

    stamp = result.stat().st_mtime_ns
    again = run_script("--variants", "no-dropout", "--seeds", "5", "--out", str(out),
                       "--figure", str(fig), *tiny)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "no-dropout seed 5: skipped, results exist" in again.stdout
    assert result.stat().st_mtime_ns == stamp

    fig.unlink()
    params = tmp_path / "elsewhere" / "p.png"
    reported = run_script("--report", "--out", str(out), "--figure", str(fig),
                          "--parameters-figure", str(params))
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert fig.exists() and "| no-dropout | no dropout | 19,200 | 1 |" in reported.stdout
    assert params.read_bytes()[:4] == b"\x89PNG"
    assert f"figures: {fig}, {params}" in reported.stdout
    assert reported.stdout.count("missing") == len(ablation.VARIANTS) - 1


def test_the_docs_list_each_variant_with_the_flags_that_reproduce_it():
    # The full "What each part buys", flags included, is in docs/experiments.md; the README
    # keeps a summary (tests/test_docs.py ties it to the results).
    doc = (ROOT / "docs" / "experiments.md").read_text()
    section = doc.split("## What each part buys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([a-z0-9.-]+) \| [^|]+ \|\s*`?([^|`]*?)`?\s*\|$", section, re.M)
    rows = [row for row in rows if row[0] != "variant"]  # the header
    assert dict(rows) == {name: " ".join(ablation.train_flags(name)) for name in ablation.VARIANTS}
