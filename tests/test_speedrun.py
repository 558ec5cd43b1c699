"""The speedrun (issue 33): SpeedNet passes the course's checks, `--model speedrun` is its named
recipe, its OneCycle is stepped after every batch (and checked so in a checkpoint), its runs
save, resume, stop on Ctrl-C and are scored like every other, and benchmarks/speedrun.py runs
it beside the compact recipe and reports both. Behaviour on short runs only, never a time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import runs
import torch
from runs import cols, total_parameters
from torch import nn

import train
import train as cli
import utils
from benchmarks import speedrun as bench
from model import SpeedNet, count_parameters, format_layer_table, layer_table
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
FORMS = {"plain": SpeedNet, "fused": lambda: fuse_relu_dropout(SpeedNet())}


@pytest.mark.parametrize("form", FORMS)
def test_total_parameters_under_20k(form):
    assert total_parameters(FORMS[form]()) == count_parameters(SpeedNet()) == 18242 < 20000


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


def test_no_map_of_speednet_is_larger_than_13x13_after_its_first_conv():
    """The point of the design: the first conv's 26x26 maps are pooled before BatchNorm."""
    net = SpeedNet()
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
             for m in net.features.conv1]
    net(torch.randn(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert sizes == [26, 13, 13, 13]  # conv, pool, BatchNorm, ReLU
    assert max(r.out_size for r in layer_table(net)) == 13


def test_layer_table_reads_speednet_with_its_pooled_first_conv():
    net = SpeedNet()
    rows = layer_table(net)
    assert [r.name for r in rows] == list(dict(net.features.named_children()))
    assert (rows[0].kind, rows[0].out_size, rows[0].receptive_field, rows[0].jump) == (
        "conv3x3+pool", 13, 4, 2)
    assert rows[-2].kind == "gap"
    assert (rows[-1].out_size, rows[-1].out_channels) == (1, 10)
    assert "**18,242**" in format_layer_table(rows)


# ---------------------------------------------------------------------------------------------
# The named recipe and its per-batch schedule.
# ---------------------------------------------------------------------------------------------
def recipe_of(flags: list[str]) -> dict:
    return train.recipe_from(train.build_parser().parse_args(flags))


def test_model_speedrun_is_the_named_recipe():
    assert recipe_of(["--model", "speedrun"]) == {**utils.RECIPE, **recipe.SPEEDRUN}
    assert recipe.SPEEDRUN["schedule"] == "onecycle-batch"
    assert recipe.SPEEDRUN["nesterov"] is True
    assert recipe_of([])["nesterov"] is False  # the write-up's stays plain momentum


def test_flags_given_override_the_named_recipe():
    got = recipe_of(["--model", "speedrun", "--epochs", "3", "--no-nesterov",
                     "--schedule", "onecycle", "--batch-size", "128"])
    assert got == {**utils.RECIPE, **recipe.SPEEDRUN, "epochs": 3, "nesterov": False,
                   "schedule": "onecycle", "batch_size": 128}


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(train.UsageError, match="--nesterov needs momentum"):
        recipe_of(["--model", "speedrun", "--momentum", "0"])
    with pytest.raises(ValueError, match="nesterov=True needs a momentum above 0"):
        recipe.check_recipe({"model": "speedrun", "momentum": 0.0})


def test_only_the_per_batch_schedule_steps_per_batch():
    assert recipe.steps_per_batch({"model": "speedrun"})
    assert not recipe.steps_per_batch({"model": "compact"})
    assert not recipe.steps_per_batch({})
    assert recipe.batches_per_epoch({"model": "speedrun"}) == 469  # 60,000 / 128, rounded up
    assert recipe.batches_per_epoch({"model": "speedrun", **TINY}) == 4
    assert recipe.schedule_steps({"model": "speedrun", **TINY, "epochs": 3}) == 12
    assert recipe.schedule_steps({"model": "compact", **TINY, "epochs": 3}) == 3


def test_the_compact_recipes_schedule_is_unchanged():
    """Its results were run with OneCycle stepped once per epoch, at torch's warm-up share."""
    compact = recipe.full_recipe({"model": "compact"})
    _, scheduler = recipe.make_optimizer(CompactNetLike(), compact)
    assert scheduler.total_steps == compact["epochs"]
    assert scheduler._schedule_phases[0]["end_step"] == pytest.approx(0.3 * compact["epochs"] - 1)


def CompactNetLike() -> nn.Module:
    return nn.Linear(2, 2)


def test_the_speedrun_optimizer_is_nesterov_sgd_with_a_per_batch_onecycle():
    speed = recipe.full_recipe({"model": "speedrun", **TINY, "epochs": 2})
    optimizer, scheduler = recipe.make_optimizer(SpeedNet(), speed)
    assert optimizer.param_groups[0]["nesterov"] is True
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == 2 * 4
    rates = []
    for _ in range(scheduler.total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(speed["lr"])
    assert rates.index(max(rates)) == 1  # the peak a quarter of the way: step 1 of 8
    assert rates[-1] < speed["lr"] / 1000


def test_train_steps_a_given_scheduler_after_every_batch(mnist_dir):
    run = cli.build_run({"model": "speedrun", **TINY, "epochs": 2}, CPU, mnist_dir)
    steps = []  # where the scheduler is as each SGD step ends
    run.optimizer.register_step_post_hook(
        lambda *_: steps.append(run.scheduler.last_epoch))
    utils.train(run.model, CPU, run.train_loader, run.optimizer, 1, progress=False,
                scheduler=run.scheduler)
    assert steps == [0, 1, 2, 3]
    assert run.scheduler.last_epoch == 4


@pytest.mark.parametrize("model", ["speedrun", "compact"])
def test_fit_leaves_the_scheduler_at_its_total_steps(model, mnist_dir):
    run = cli.build_run({"model": model, **TINY, "epochs": 2}, CPU, mnist_dir)
    cli.fit(run, progress=False, log=False)
    assert run.scheduler.last_epoch == recipe.schedule_steps(run.recipe) == (
        8 if model == "speedrun" else 2)
    assert cols(run.history)["epoch"] == [1, 2]
    if model == "speedrun":  # each epoch's rate as it started: the warm-up's first, then more
        assert cols(run.history)["lr"][0] == pytest.approx(run.recipe["lr"] / 25)
        assert cols(run.history)["lr"][1] > cols(run.history)["lr"][0]


# ---------------------------------------------------------------------------------------------
# Checkpoints: a speedrun saves, loads (checked per batch) and resumes as an unbroken run.
# ---------------------------------------------------------------------------------------------
def speed_run(epochs: int, mnist_dir: Path) -> cli.Run:
    return cli.build_run({"model": "speedrun", **TINY, "epochs": epochs}, CPU, mnist_dir)


def test_a_speedrun_checkpoint_saves_loads_and_resumes_as_an_unbroken_run(tmp_path, mnist_dir):
    unbroken = speed_run(2, mnist_dir)
    cli.fit(unbroken, progress=False, log=False)

    class Stop(Exception):
        pass

    def save_then_stop(_history: dict) -> None:  # saved after epoch 1, then cut short
        cli.save_run(first, tmp_path / "speedrun.pt")
        raise Stop

    first = speed_run(2, mnist_dir)
    with pytest.raises(Stop):
        cli.fit(first, on_epoch_end=save_then_stop, progress=False, log=False)
    loaded = checkpoints.read_checkpoint(tmp_path / "speedrun.pt")
    assert loaded["recipe"]["schedule"] == "onecycle-batch"
    assert loaded["scheduler"]["last_epoch"] == 4  # one epoch of 4 batches

    resumed = speed_run(2, mnist_dir)
    runs.restore_run(resumed, loaded)
    cli.fit(resumed, progress=False, log=False)
    for column, values in cols(unbroken.history).items():
        if column != "seconds":
            assert cols(resumed.history)[column] == values, column
    for key, value in unbroken.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_scheduler_stepped_per_epoch_is_refused_for_a_per_batch_recipe(mnist_dir):
    run = speed_run(2, mnist_dir)
    cli.fit(run, progress=False, log=False)
    state = runs.run_state(run)
    checkpoints.check_checkpoint(state)  # as saved: 2 epochs of 4 batches
    per_epoch = {**state, "scheduler": {**state["scheduler"], "last_epoch": 2}}
    with pytest.raises(ValueError, match=r"scheduler at step 2, history at 2 epochs = step 8"):
        checkpoints.check_checkpoint(per_epoch)
    as_compact = {**state, "recipe": {**state["recipe"], "schedule": "onecycle"}}
    with pytest.raises(ValueError, match="total_steps=8 is not the recipe's"):
        checkpoints.check_checkpoint(as_compact)


# ---------------------------------------------------------------------------------------------
# train.py end to end: --model speedrun trains, records its recipe, is scored, stops on Ctrl-C
# and resumes.
# ---------------------------------------------------------------------------------------------
def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env())


@pytest.fixture(scope="module")
def speed_cli_run(tmp_path_factory, mnist_dir) -> dict:
    tmp = tmp_path_factory.mktemp("speedrun_cli")
    checkpoint, metrics = tmp / "speedrun.pt", tmp / "speedrun.json"
    done = run_train("--model", "speedrun", *TINY_FLAGS, "--epochs", "2",
                     "--save-model", str(checkpoint), "--metrics", str(metrics))
    return {"done": done, "checkpoint": checkpoint, "metrics": metrics}


def test_train_py_model_speedrun_records_its_recipe(speed_cli_run):
    done = speed_cli_run["done"]
    assert done.returncode == 0, done.stderr
    assert "parameters: 18,242" in done.stdout
    metrics = json.loads(speed_cli_run["metrics"].read_text())
    assert metrics["parameters"] == 18242
    assert {k: metrics["recipe"][k] for k in recipe.SPEEDRUN if k not in ("epochs",
                                                                          "batch_size")} == {
        k: v for k, v in recipe.SPEEDRUN.items() if k not in ("epochs", "batch_size")}
    assert metrics["model"]["channels"] == list(SpeedNet().channels)
    saved = checkpoints.read_checkpoint(speed_cli_run["checkpoint"])
    assert saved["recipe"] == metrics["recipe"]
    assert saved["scheduler"]["last_epoch"] == 2 * 4


def test_evaluate_of_a_speedrun_checkpoint_prints_its_last_epochs_accuracy(speed_cli_run):
    done = run_train("--evaluate", str(speed_cli_run["checkpoint"]), "--device", "cpu",
                     "--quiet", "--limit-test", "200", "--test-batch-size", "200")
    assert done.returncode == 0, done.stderr
    found = re.search(r"accuracy ([\d.]+)% on 200 images", done.stdout)
    assert found, done.stdout
    metrics = json.loads(speed_cli_run["metrics"].read_text())
    assert found.group(1) == f"{metrics['history']['test_acc'][-1]:.2f}"


def test_a_per_batch_onecycle_resume_refuses_a_new_length(speed_cli_run):
    done = run_train("--resume", str(speed_cli_run["checkpoint"]), "--epochs", "3",
                     "--device", "cpu", "--quiet")
    assert done.returncode == 2
    assert "follows a OneCycle schedule fixed at its start by its" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes_the_run(tmp_path):
    path = tmp_path / "speedrun.pt"
    err = tmp_path / "stderr.txt"
    flags = [*TINY_FLAGS, "--epochs", "30", "--save-model", str(path)]
    with open(err, "w") as ferr:
        proc = subprocess.Popen(
            [sys.executable, "train.py", "--model", "speedrun", *flags], cwd=ROOT, env=env(),
            stdout=subprocess.DEVNULL, stderr=ferr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                assert proc.poll() is None, f"train.py exited early: {err.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc != 0
    assert "resume" in err.read_text()
    assert "Traceback" not in err.read_text()
    saved = checkpoints.read_checkpoint(path)  # checked: its scheduler at epochs x 4 batches
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
# benchmarks/speedrun.py: both recipes side by side, one result file each, the report.
# ---------------------------------------------------------------------------------------------
def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/speedrun.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, mnist_dir) -> dict:
    out = tmp_path_factory.mktemp("speedrun_bench")
    figure = out / "speedrun.png"
    done = run_bench("--seeds", "1", "2", "--threads", "1", "--out", str(out), "--figure",
                     str(figure), "--", "--limit-train", "256", "--limit-test", "200",
                     "--epochs", "2", "--data-dir", str(mnist_dir))
    return {"done": done, "out": out, "figure": figure}


@pytest.mark.slow
def test_the_benchmark_writes_one_result_file_per_run_with_its_process_time(bench_run):
    done = bench_run["done"]
    assert done.returncode == 0, done.stderr + done.stdout
    names = sorted(p.name for p in bench_run["out"].glob("*.json"))
    assert names == ["compact_seed1.json", "compact_seed2.json", "speedrun_seed1.json",
                     "speedrun_seed2.json"]
    for name in names:
        result = json.loads((bench_run["out"] / name).read_text())
        assert result["recipe"]["model"] == name.split("_")[0]
        assert result["threads"] == 1
        assert result["process_seconds"] > sum(result["history"]["seconds"]) > 0
        assert set(result["machine"]) == {"cpu", "cores", "os"}
        assert len(result["history"]["test_acc"]) == 2


@pytest.mark.slow
def test_the_benchmark_runs_the_recipes_side_by_side_seed_by_seed(bench_run):
    order = re.findall(r"^(\w+) seed (\d+)", bench_run["done"].stdout, re.M)
    logs = sorted(p.name for p in bench_run["out"].glob("*.log"))
    assert len(logs) == 4
    assert not order or order == [("speedrun", "1"), ("compact", "1"), ("speedrun", "2"),
                                  ("compact", "2")]


def test_the_benchmarks_report_gives_every_seed_the_ratio_and_the_figure(bench_run):
    stdout = bench_run["done"].stdout
    assert re.search(r"^\| speedrun \| 18,242 \| 2 \| 1 \| 1, 2 \|", stdout, re.M), stdout
    assert re.search(r"^\| compact \| 7,594 \| 2 \| 1 \| 1, 2 \|", stdout, re.M), stdout
    assert re.search(r"time ratio \(compact / speedrun.*\): \d+\.\d\dx", stdout), stdout
    assert bench_run["figure"].stat().st_size > 0


@pytest.mark.slow
def test_the_benchmark_skips_runs_whose_results_exist(bench_run):
    done = run_bench("--seeds", "1", "--out", str(bench_run["out"]), "--figure",
                     str(bench_run["figure"]))
    assert done.returncode == 0, done.stderr
    assert "speedrun seed 1: skipped, results exist" in done.stdout
    assert "compact seed 1: skipped, results exist" in done.stdout


def test_a_result_file_without_its_process_time_is_run_again(tmp_path):
    metrics = {"parameters": 1, "final_test_acc": 99.0, "threads": 1,
               "history": {"epoch": [1], "test_acc": [99.0], "seconds": [1.0]}}
    path = bench.result_path(tmp_path, "speedrun", 1)
    path.write_text(json.dumps(metrics))  # as train.py leaves it when the timer is killed
    assert bench.common.still_to_run(path, bench.NEEDS, "speedrun seed 1")
    path.write_text(json.dumps({**metrics, "process_seconds": 2.0}))
    assert not bench.common.still_to_run(path, bench.NEEDS, "speedrun seed 1")


def test_the_time_ratio_pairs_seeds_both_recipes_ran():
    def row(name: str, seconds: dict[int, float]) -> bench.Row:
        return bench.Row(name, 1, 1, [2], dict.fromkeys(seconds, 99.5), seconds)

    rows = [row("speedrun", {1: 60.0, 2: 70.0, 3: 1.0}), row("compact", {1: 240.0, 2: 280.0})]
    assert bench.time_ratio(rows) == pytest.approx(260 / 65)
    assert bench.time_ratio(rows[:1]) is None


# ---------------------------------------------------------------------------------------------
# The docs say what the code does.
# ---------------------------------------------------------------------------------------------
def test_the_speedrun_page_holds_speednets_computed_table():
    page = (ROOT / "docs" / "speedrun.md").read_text()
    assert format_layer_table(layer_table(SpeedNet())) in page


def test_the_readmes_first_screen_offers_the_speedrun():
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    assert "python train.py --model speedrun" in first
    assert "docs/speedrun.md" in first


@pytest.mark.slow
def test_the_exploration_script_runs_a_candidate_and_skips_it_the_second_time(tmp_path):
    """benchmarks/speedrun_explore.py, the source of docs/speedrun.md's lever table: one epoch
    of a candidate on the real data, one JSON file, then skipped."""
    args = [sys.executable, "benchmarks/speedrun_explore.py", "--run", "arch=cp16h,epochs=1",
            "--out", str(tmp_path)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (result,) = tmp_path.glob("*.json")
    assert json.loads(result.read_text())["final_test_acc"] > 90
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert f"{result.name}: exists, skipped" in again.stdout
