"""The tiny model (issue 38): TinyNet, under the 3,762 parameters of the best public 99.4%,
passes the course's checks plain and fused, `--model tiny` is its named recipe, and its runs
train, resume as an unbroken run, stop on Ctrl-C and resume, and are scored by --evaluate like
every other; benchmarks/tiny.py writes one result file per run and skips those that exist.
Behaviour on short runs only, never an accuracy of one."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import runs
import torch
from runs import TINY, TINY_ARGS, recipe_of
from torch import nn

import train
import train as cli
import utils
from benchmarks import tiny as bench
from model import TinyNet, count_parameters, format_layer_table, layer_table, tiny_channels
from support import checkpoints, recipe
from support.fused_dropout import fuse_relu_dropout

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
PUBLIC_BEST = 3762  # parameters of the smallest public 99.4% (docs/tiny.md)


# ---------------------------------------------------------------------------------------------
# The model, and the course's five checks as tests/test_course_checks.py runs them on Net.
# ---------------------------------------------------------------------------------------------
FORMS = {"plain": TinyNet, "fused": lambda: fuse_relu_dropout(TinyNet())}


def every_parameter(model: nn.Module) -> int:
    """The graders' count: every parameter, trainable or not."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("form", FORMS)
def test_total_parameters_under_20k_and_under_the_public_best(form):
    assert every_parameter(FORMS[form]()) == count_parameters(TinyNet()) == 3672 < PUBLIC_BEST


@pytest.mark.parametrize("form", FORMS)
def test_uses_batch_normalization(form):
    assert any(isinstance(m, nn.BatchNorm2d) for m in FORMS[form]().modules())


@pytest.mark.parametrize("form", FORMS)
def test_uses_dropout_with_a_rate_above_zero(form):
    drops = [m for m in FORMS[form]().modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p > 0 for m in drops)


@pytest.mark.parametrize("form", FORMS)
def test_uses_global_average_pooling_or_a_linear_layer(form):
    assert any(isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear))
               for m in FORMS[form]().modules())


@pytest.mark.parametrize("form", FORMS)
def test_output_shape_is_one_by_ten(form):
    assert FORMS[form]()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_every_conv_is_padded_and_maps_halve_only_at_the_pools():
    rows = layer_table(TinyNet())
    assert [(r.name, r.out_size) for r in rows] == [
        ("conv1", 28), ("conv2", 28), ("pool1", 14), ("conv3", 14), ("conv4", 14),
        ("pool2", 7), ("conv5", 7), ("conv6", 7), ("gap", 1), ("fc", 1)]
    assert rows[6].receptive_field == 24
    assert "**3,672**" in format_layer_table(rows)


def test_width_scales_the_hidden_convs_and_keeps_ten_classes():
    assert tiny_channels(1.0) == TinyNet().channels == (6, 8, 10, 10, 12, 16, 10)
    assert tiny_channels(0.9) == (5, 7, 9, 9, 11, 14, 10)
    assert count_parameters(TinyNet(width=0.9)) == 2961
    with pytest.raises(ValueError, match="width must be in"):
        tiny_channels(0)


# ---------------------------------------------------------------------------------------------
# The named recipe.
# ---------------------------------------------------------------------------------------------
def test_model_tiny_is_the_named_recipe():
    assert recipe_of(["--model", "tiny"]) == {**utils.RECIPE, **recipe.TINY}
    tiny = recipe.TINY
    assert tiny["epochs"] <= 15
    assert tiny["schedule"] == "onecycle-batch" and tiny["nesterov"] is True
    assert tiny["augmentation"] in ("rotate", "none", "crop", "both")  # the fast loader's own
    assert recipe.full_recipe({"model": "tiny"})["limit_train"] is None  # all 60,000 images
    assert recipe.full_recipe({"model": "tiny"})["limit_test"] is None  # the whole test set


def test_the_named_recipe_is_the_benchmarks_kept_candidate():
    """The recipe `--model tiny` runs is the one whose five seeds are in results/tiny."""
    flags = bench.train_flags(bench.KEPT)
    assert recipe_of(flags) == {**utils.RECIPE, **recipe.TINY}


def test_the_recipe_builds_tinynet_with_its_dropout_and_width():
    net = recipe.make_model({"model": "tiny", "width": 0.9, "dropout": 0.1})
    assert isinstance(net, TinyNet) and net.channels == tiny_channels(0.9)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.1]


def test_nets_other_architecture_flags_are_refused_for_the_tiny_model():
    with pytest.raises(train.UsageError, match="--head applies to the s6 model only"):
        recipe_of(["--model", "tiny", "--head", "gap"])
    with pytest.raises(ValueError, match="dropout_plan: only for the s6 model"):
        recipe.check_recipe({"model": "tiny", "dropout_plan": "none"})


def test_the_tiny_optimizer_is_nesterov_sgd_with_a_per_batch_onecycle():
    tiny = recipe.full_recipe({"model": "tiny", **TINY, "epochs": 2})
    optimizer, scheduler = recipe.make_optimizer(TinyNet(), tiny)
    assert optimizer.param_groups[0]["nesterov"] is True
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == 2 * 4  # 256 images in batches of 64, twice
    assert recipe.batches_per_epoch({"model": "tiny"}) == -(-60_000 // recipe.TINY["batch_size"])


# ---------------------------------------------------------------------------------------------
# Checkpoints: a tiny run saves, loads (checked per batch) and resumes as an unbroken run.
# ---------------------------------------------------------------------------------------------
def tiny_run(epochs: int, mnist_dir: Path) -> cli.Run:
    return cli.build_run({"model": "tiny", **TINY, "epochs": epochs}, CPU, mnist_dir)


def test_a_tiny_checkpoint_saves_loads_and_resumes_as_an_unbroken_run(tmp_path, mnist_dir):
    unbroken = tiny_run(2, mnist_dir)
    cli.fit(unbroken, progress=False, log=False)
    loaded = runs.stopped_after_epoch_1(tiny_run(2, mnist_dir), tmp_path / "tiny.pt")
    assert loaded["recipe"]["model"] == "tiny"
    assert loaded["scheduler"]["last_epoch"] == 4  # one epoch of 4 batches

    resumed = tiny_run(2, mnist_dir)
    runs.restore_run(resumed, loaded)
    cli.fit(resumed, progress=False, log=False)
    runs.assert_same_run(resumed, unbroken)


# ---------------------------------------------------------------------------------------------
# train.py end to end: --model tiny trains, records its recipe, is scored, stops on Ctrl-C and
# resumes.
# ---------------------------------------------------------------------------------------------
run_train = runs.train


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory, mnist_dir) -> dict:
    tmp = tmp_path_factory.mktemp("tiny_cli")
    checkpoint, metrics = tmp / "tiny.pt", tmp / "tiny.json"
    done = run_train("--model", "tiny", *TINY_ARGS, "--epochs", "2",
                     "--save-model", str(checkpoint), "--metrics", str(metrics))
    return {"done": done, "checkpoint": checkpoint, "metrics": metrics}


def test_train_py_model_tiny_records_its_recipe(tiny_cli_run):
    done = tiny_cli_run["done"]
    assert done.returncode == 0, done.stderr
    assert "parameters: 3,672" in done.stdout
    metrics = json.loads(tiny_cli_run["metrics"].read_text())
    assert metrics["parameters"] == 3672
    kept = {k: v for k, v in recipe.TINY.items() if k not in ("epochs", "batch_size")}
    assert {k: metrics["recipe"][k] for k in kept} == kept
    assert metrics["model"]["channels"] == list(TinyNet().channels)
    saved = checkpoints.read_checkpoint(tiny_cli_run["checkpoint"])
    assert saved["recipe"] == metrics["recipe"]
    assert saved["scheduler"]["last_epoch"] == 2 * 4


def test_evaluate_of_a_tiny_checkpoint_prints_its_last_epochs_accuracy(tiny_cli_run):
    done = run_train("--evaluate", str(tiny_cli_run["checkpoint"]), "--device", "cpu",
                     "--quiet", "--limit-test", "200", "--test-batch-size", "200")
    assert done.returncode == 0, done.stderr
    found = re.search(r"accuracy ([\d.]+)% on 200 images", done.stdout)
    assert found, done.stdout
    metrics = json.loads(tiny_cli_run["metrics"].read_text())
    assert found.group(1) == f"{metrics['history']['test_acc'][-1]:.2f}"


def test_a_width_run_records_its_channels(tmp_path, mnist_dir):
    metrics = tmp_path / "w.json"
    done = run_train("--model", "tiny", "--width", "0.9", *TINY_ARGS, "--epochs", "2",
                     "--no-save", "--metrics", str(metrics), "--data-dir", str(mnist_dir))
    assert done.returncode == 0, done.stderr
    result = json.loads(metrics.read_text())
    assert result["parameters"] == 2961
    assert result["model"]["channels"] == list(tiny_channels(0.9))
    assert result["recipe"]["width"] == 0.9


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes_the_run(tmp_path):
    path = tmp_path / "tiny.pt"
    proc, _out, err = runs.spawn(["--model", "tiny", *TINY_ARGS, "--epochs", "30",
                                  "--save-model", str(path)], tmp_path)
    try:
        runs.wait_for(path, proc, err)
        proc.send_signal(signal.SIGINT)
    finally:
        rc = runs.finish(proc)
    assert rc != 0
    assert "resume" in err.read_text()
    assert "Traceback" not in err.read_text()
    saved = checkpoints.read_checkpoint(path)
    done = len(saved["history"]["epoch"])
    assert 1 <= done < 30

    resumed = run_train("--resume", str(path), "--device", "cpu", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {done} of 30" in resumed.stdout
    final = checkpoints.read_checkpoint(path)
    assert final["history"]["epoch"] == list(range(1, 31))
    assert final["history"]["test_acc"][:done] == saved["history"]["test_acc"]
    assert final["scheduler"]["last_epoch"] == 30 * 4


# ---------------------------------------------------------------------------------------------
# benchmarks/tiny.py: one result file per run, skipped when it exists, and the report.
# ---------------------------------------------------------------------------------------------
def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/tiny.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=runs.env())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, mnist_dir) -> dict:
    out = tmp_path_factory.mktemp("tiny_bench")
    done = run_bench("--candidates", bench.KEPT, "--seeds", "1", "2", "--threads", "1",
                     "--out", str(out), "--", "--limit-train", "256", "--limit-test", "200",
                     "--epochs", "2", "--data-dir", str(mnist_dir))
    return {"done": done, "out": out}


@pytest.mark.slow
def test_the_benchmark_writes_one_result_file_per_run(bench_run):
    done = bench_run["done"]
    assert done.returncode == 0, done.stderr + done.stdout
    names = sorted(p.name for p in bench_run["out"].glob("*.json"))
    assert names == [f"{bench.KEPT}_seed1.json", f"{bench.KEPT}_seed2.json"]
    for name in names:
        result = json.loads((bench_run["out"] / name).read_text())
        assert result["recipe"]["model"] == "tiny"
        assert result["recipe"]["seed"] == int(name[-6])
        assert result["threads"] == 1
        assert len(result["history"]["test_acc"]) == 2


def test_the_benchmarks_report_gives_every_seeds_final_accuracy(bench_run):
    stdout = bench_run["done"].stdout
    row = re.search(rf"^\| {re.escape(bench.KEPT)} \| 3,672 \| 1, 2 \| ([\d.]+), ([\d.]+) \|",
                    stdout, re.M)
    assert row, stdout
    finals = [json.loads((bench_run["out"] / f"{bench.KEPT}_seed{s}.json").read_text())
              ["final_test_acc"] for s in (1, 2)]
    assert [float(a) for a in row.groups()] == finals


@pytest.mark.slow
def test_the_benchmark_skips_runs_whose_results_exist(bench_run):
    done = run_bench("--candidates", bench.KEPT, "--seeds", "1", "--out", str(bench_run["out"]))
    assert done.returncode == 0, done.stderr
    assert f"{bench.KEPT} seed 1: skipped, results exist" in done.stdout


def test_the_bar_is_every_seed_at_99_40_and_five_seeds_to_meet_it():
    def row(*finals: float) -> bench.Row:
        seeds = dict(enumerate(finals, 1))
        return bench.Row("c", 1, seeds, seeds)

    assert row(99.40, 99.5, 99.6, 99.41, 99.45).verdict == "met"
    assert row(99.40, 99.5).verdict == "so far (2 seeds)"
    assert row(99.39, 99.9, 99.9, 99.9, 99.9).verdict == "not met"


# ---------------------------------------------------------------------------------------------
# The docs say what the code does.
# ---------------------------------------------------------------------------------------------
def test_the_tiny_page_holds_tinynets_computed_table():
    page = (ROOT / "docs" / "tiny.md").read_text()
    assert format_layer_table(layer_table(TinyNet())) in page


def test_the_tiny_pages_search_table_is_the_benchmarks_report():
    page = (ROOT / "docs" / "tiny.md").read_text()
    table = page.split("<!-- tiny-table -->\n")[1].split("\n<!-- /tiny-table -->")[0]
    assert table == bench.report(ROOT / "results" / "tiny")


# ---------------------------------------------------------------------------------------------
# The parameters figure (benchmarks/ablation.py): the tiny model's seeds, and the smallest
# published 99.4%s, each marked as a single run.
# ---------------------------------------------------------------------------------------------
def test_the_parameters_figure_shows_the_tiny_seeds_and_the_smallest_single_runs(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from benchmarks import ablation

    runs_by_seed = {s: {"parameters": 3672, "final_test_acc": a}
                    for s, a in enumerate([99.1, 99.3, 99.45], 1)}
    fig = ablation.plot_parameters({}, tmp_path / "p.png", None, runs_by_seed)
    ax = fig.axes[0]
    (dots,) = [line for line in ax.get_lines()
               if line.get_label() == "tiny model, 15 epochs, a dot per seed"]
    assert sorted(dots.get_ydata()) == [99.1, 99.3, 99.45]
    (stars,) = [line for line in ax.get_lines()
                if line.get_label() == "smallest published (single runs)"]
    assert list(zip(stars.get_xdata(), stars.get_ydata(), strict=True)) == [
        (3762, 99.52), (4838, 99.42), (5854, 99.40)]
    texts = [t.get_text() for t in ax.texts]
    assert sum("(single run" in t for t in texts) == 3
    assert "tiny\n3,672" in texts

