"""The compact model (issue 27): CompactNet under 8,000 parameters passes the course's checks,
`--model compact` is its named recipe, and its checkpoints save, load (checked), resume and
score like the write-up's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import runs
import torch
from runs import cols, total_parameters
from torch import nn

import train
import train as cli
import utils
from model import CompactNet, count_parameters, format_layer_table, layer_table
from support import checkpoints, recipe
from support.fused_dropout import fuse_relu_dropout

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}
TINY_FLAGS = ["--device", "cpu", "--quiet", "--limit-train", "256", "--limit-test", "200",
              "--batch-size", "64", "--test-batch-size", "200"]


# ---------------------------------------------------------------------------------------------
# The model, and the course's five checks as tests/test_course_checks.py runs them on Net.
# ---------------------------------------------------------------------------------------------
FORMS = {"plain": CompactNet, "fused": lambda: fuse_relu_dropout(CompactNet())}


def test_compact_net_has_at_most_8000_parameters():
    assert total_parameters(CompactNet()) == count_parameters(CompactNet()) == 7594 <= 8000


@pytest.mark.parametrize("form", FORMS)
def test_total_parameters_under_20k(form):
    assert total_parameters(FORMS[form]()) < 20000


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


def test_the_fast_path_fuses_each_relu_dropout_pair():
    fused = fuse_relu_dropout(CompactNet())
    assert sum(type(m).__name__ == "ReLUDropout" for m in fused.modules()) == 5
    assert not any(type(m) is nn.Dropout for m in fused.modules())
    assert list(fused.state_dict()) == list(CompactNet().state_dict())


def test_layer_table_reads_compact_net():
    net = CompactNet()
    rows = layer_table(net)
    assert [r.name for r in rows] == list(dict(net.features.named_children()))
    assert sum(r.params for r in rows) == count_parameters(net)
    assert (rows[-1].out_size, rows[-1].out_channels) == (1, 10)
    assert "**7,594**" in format_layer_table(rows)


# ---------------------------------------------------------------------------------------------
# The named recipe.
# ---------------------------------------------------------------------------------------------
def recipe_of(flags: list[str]) -> dict:
    return train.recipe_from(train.build_parser().parse_args(flags))


def test_model_compact_is_the_named_recipe():
    assert recipe_of(["--model", "compact"]) == {**utils.RECIPE, **recipe.COMPACT}
    assert recipe.COMPACT["epochs"] <= 15
    assert recipe_of([]) == utils.RECIPE  # the write-up's stays the default


def test_flags_given_override_the_named_recipe():
    got = recipe_of(["--model", "compact", "--lr", "0.05", "--epochs", "3", "--dropout", "0.1",
                     "--schedule", "step", "--augmentation", "both"])
    assert got == {**utils.RECIPE, **recipe.COMPACT, "lr": 0.05, "epochs": 3, "dropout": 0.1,
                   "schedule": "step", "augmentation": "both"}


def test_nets_architecture_flags_are_refused_for_the_compact_model():
    with pytest.raises(train.UsageError, match="--dropout-plan and --width apply to the s6"):
        recipe_of(["--model", "compact", "--dropout-plan", "every", "--width", "0.5"])
    with pytest.raises(train.UsageError, match="--head applies to the s6 model only"):
        recipe_of(["--model", "compact", "--head", "gap"])
    with pytest.raises(ValueError, match="dropout_plan: only for the s6 model"):
        recipe.check_recipe({"model": "compact", "dropout_plan": "none"})


def test_the_recipe_builds_its_model_and_schedule():
    compact = recipe.full_recipe({"model": "compact"})
    net = recipe.make_model(compact)
    assert isinstance(net, CompactNet)
    assert all(m.p == compact["dropout"] for m in net.modules() if isinstance(m, nn.Dropout))
    _, scheduler = recipe.make_optimizer(net, compact)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == compact["epochs"]
    # The write-up's Net keeps its own dropout rate unless the recipe changes it.
    assert all(m.p == 0.1 for m in recipe.make_model({}).modules() if isinstance(m, nn.Dropout))


def test_onecycle_peaks_at_lr_when_stepped_once_per_epoch():
    compact = recipe.full_recipe({"model": "compact"})
    optimizer, scheduler = recipe.make_optimizer(CompactNet(), compact)
    rates = []
    for _ in range(compact["epochs"]):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(compact["lr"], rel=0.05)
    assert rates[-1] < compact["lr"] / 100
    assert optimizer.param_groups[0]["momentum"] == compact["momentum"]  # not cycled


# ---------------------------------------------------------------------------------------------
# Checkpoints: a compact run saves, loads (checked) and resumes as an unbroken one runs.
# ---------------------------------------------------------------------------------------------
def compact_run(epochs: int, mnist_dir: Path) -> cli.Run:
    return cli.build_run({"model": "compact", **TINY, "epochs": epochs}, CPU, mnist_dir)


def test_a_compact_checkpoint_saves_loads_and_resumes(tmp_path, mnist_dir):
    unbroken = compact_run(2, mnist_dir)
    cli.fit(unbroken, progress=False, log=False)

    class Stop(Exception):
        pass

    def save_then_stop(_history: dict) -> None:  # saved after epoch 1, then cut short
        cli.save_run(first, tmp_path / "compact.pt")
        raise Stop

    first = compact_run(2, mnist_dir)
    with pytest.raises(Stop):
        cli.fit(first, on_epoch_end=save_then_stop, progress=False, log=False)
    loaded = checkpoints.read_checkpoint(tmp_path / "compact.pt")
    assert loaded["recipe"]["model"] == "compact"
    assert loaded["recipe"]["schedule"] == "onecycle"

    resumed = compact_run(2, mnist_dir)
    runs.restore_run(resumed, loaded)
    cli.fit(resumed, progress=False, log=False)
    for column, values in cols(unbroken.history).items():
        if column != "seconds":
            assert cols(resumed.history)[column] == values, column
    for key, value in unbroken.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_compact_checkpoint_of_another_schedule_or_model_is_refused(mnist_dir):
    run = compact_run(1, mnist_dir)
    state = runs.run_state(run)
    longer = {**state, "scheduler": {**state["scheduler"], "total_steps": 20}}
    with pytest.raises(ValueError, match="scheduler total_steps=20 is not the recipe's"):
        checkpoints.check_checkpoint(longer)
    as_step = {**state, "recipe": {**state["recipe"], "schedule": "step"}}
    with pytest.raises(ValueError, match="not a StepLR"):
        checkpoints.check_checkpoint(as_step)
    as_net = {**state, "recipe": {**state["recipe"], "model": "s6"}}
    with pytest.raises(ValueError):
        checkpoints.check_checkpoint(as_net)


def test_a_steplr_checkpoint_from_before_the_new_keys_still_loads(mnist_dir):
    old = {k: v for k, v in utils.RECIPE.items() if k not in ("model", "schedule", "dropout")}
    run = cli.build_run({**old, **TINY, "epochs": 1}, CPU, mnist_dir)
    state = runs.run_state(run)
    state["recipe"] = {**old, **TINY, "epochs": 1}
    loaded = checkpoints.check_checkpoint(state)
    assert (loaded["recipe"]["model"], loaded["recipe"]["schedule"]) == ("s6", "step")
    assert loaded["recipe"]["dropout"] == 0.1


# ---------------------------------------------------------------------------------------------
# train.py end to end: --model compact trains, records its recipe, resumes and is scored.
# ---------------------------------------------------------------------------------------------
def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def compact_cli_run(tmp_path_factory, mnist_dir) -> dict:
    tmp = tmp_path_factory.mktemp("compact_cli")
    checkpoint, metrics = tmp / "compact.pt", tmp / "compact.json"
    # 2 epochs: a OneCycle of 1 would train its only epoch at peak / 250,000, so it is refused
    done = run_train("--model", "compact", *TINY_FLAGS, "--epochs", "2",
                     "--save-model", str(checkpoint), "--metrics", str(metrics))
    return {"done": done, "checkpoint": checkpoint, "metrics": metrics}


def test_train_py_model_compact_records_its_recipe(compact_cli_run):
    done = compact_cli_run["done"]
    assert done.returncode == 0, done.stderr
    assert "parameters: 7,594" in done.stdout
    metrics = json.loads(compact_cli_run["metrics"].read_text())
    assert metrics["parameters"] == 7594
    assert {k: metrics["recipe"][k] for k in recipe.COMPACT if k != "epochs"} == {
        k: v for k, v in recipe.COMPACT.items() if k != "epochs"}
    assert metrics["model"]["channels"] == list(CompactNet().channels)
    saved = checkpoints.read_checkpoint(compact_cli_run["checkpoint"])
    assert saved["recipe"] == metrics["recipe"]


def test_evaluate_of_a_compact_checkpoint_prints_its_last_epochs_accuracy(compact_cli_run):
    done = run_train("--evaluate", str(compact_cli_run["checkpoint"]), "--device", "cpu",
                     "--quiet", "--limit-test", "200", "--test-batch-size", "200")
    assert done.returncode == 0, done.stderr
    found = re.search(r"accuracy ([\d.]+)% on 200 images", done.stdout)
    assert found, done.stdout
    metrics = json.loads(compact_cli_run["metrics"].read_text())
    assert found.group(1) == f"{metrics['history']['test_acc'][-1]:.2f}"


def test_a_onecycle_resume_refuses_a_new_length_or_peak(compact_cli_run):
    done = run_train("--resume", str(compact_cli_run["checkpoint"]), "--epochs", "3",
                     "--device", "cpu", "--quiet")
    assert done.returncode == 2
    assert "follows a OneCycle schedule fixed at its start by its 2 epochs and peak lr 0.2, " \
           "so --epochs cannot change it" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# The search: benchmarks/compact.py's candidates and its report.
# ---------------------------------------------------------------------------------------------
def test_every_candidate_is_a_compact_recipe_of_at_most_15_epochs():
    from benchmarks import compact

    for name in compact.CANDIDATES:
        got = recipe_of(compact.train_flags(name))
        assert got["model"] == "compact" and got["epochs"] <= 15, name


def test_the_named_recipe_is_the_candidate_the_search_kept():
    from benchmarks import compact

    assert recipe_of(compact.train_flags(compact.KEPT)) == recipe_of(["--model", "compact"])


def test_the_report_reads_the_last_epoch_of_each_seed(tmp_path):
    from benchmarks import compact

    for seed, finals in ((1, [99.1, 99.5, 99.48]), (2, [99.2, 99.3, 99.42])):
        history = {"epoch": [1, 2, 3], "test_acc": finals}
        (tmp_path / f"trial_seed{seed}.json").write_text(json.dumps(
            {"parameters": 7594, "final_test_acc": finals[-1], "history": history}))
    table = compact.report(tmp_path)
    assert ("| trial | 7,594 | 1, 2 | 99.48, 99.42 | 99.450 | 0.042 | 99.42 | 99.50, 99.42 "
            "| met so far (2 seeds) |") in table, table


def test_docs_compact_shows_the_computed_layer_table(repo_root):
    text = (repo_root / "docs" / "compact.md").read_text()
    assert format_layer_table(layer_table(CompactNet())) in text
