"""train.py end to end, as a user runs it: in a subprocess, on the CPU, with tiny data."""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import pty
import re
import shlex
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch
from runs import TINY_ARGS, assert_no_traceback, env, train

import model
import train as cli
from support import checkpoints, command_line

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module", autouse=True)
def _mnist(mnist_dir):
    """train.py reads the repository's data/ folder; make sure it holds MNIST first."""
    return mnist_dir


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.rstrip().splitlines()[-1]


# The final line: the final accuracy first (the README reads it), the best epoch, what is kept.
FINAL = r"final test accuracy: [\d.]+% after {} \(best [\d.]+% at epoch \d+\); {}"


@pytest.mark.quick
def test_dry_run(tmp_path):
    done = train("--dry-run", "--no-save", "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout
    assert re.fullmatch(FINAL.format("1 epoch", re.escape("no checkpoint (--dry-run)")),
                        last_line(done)), done.stdout
    assert_no_traceback(done)


# ---------------------------------------------------------------------------------------------
# Bad arguments: a usage error (exit 2), before any training, never a traceback.
# ---------------------------------------------------------------------------------------------
def _readonly_dir(tmp: Path) -> Path:
    ro = tmp / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(ro, os.W_OK):  # root ignores permission bits
        ro.chmod(stat.S_IRWXU)
        pytest.skip("cannot make a read-only folder as this user (root?)")
    return ro


def _regular_file(tmp: Path) -> Path:
    f = tmp / "file.txt"
    f.write_text("not a folder\n")
    return f


# Refused after parsing: one line, without argparse's usage block (the others keep it).
POLICY_REFUSALS = {"device-cuda-unavailable", "data-dir-read-only", "data-dir-under-a-file",
                   "save-model-under-a-file"}
BAD_ARGS = {
    "epochs-0": lambda tmp: ["--epochs", "0"],
    "epochs-negative": lambda tmp: ["--epochs", "-1"],
    "batch-size-0": lambda tmp: ["--batch-size", "0"],
    "lr-nan": lambda tmp: ["--lr", "nan"],
    "lr-inf": lambda tmp: ["--lr", "inf"],
    "device-tpu": lambda tmp: ["--device", "tpu"],
    "device-cuda-unavailable": lambda tmp: ["--device", "cuda"],
    "data-dir-read-only": lambda tmp: ["--data-dir", str(_readonly_dir(tmp) / "data")],
    "data-dir-under-a-file": lambda tmp: ["--data-dir", str(_regular_file(tmp) / "sub")],
    "save-model-under-a-file": lambda tmp: ["--save-model",
                                            str(_regular_file(tmp) / "sub" / "last.pt")],
}


@pytest.mark.quick
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_are_usage_errors(tmp_path, case):
    if case == "device-cuda-unavailable" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = BAD_ARGS[case](tmp_path)
    if case != "save-model-under-a-file":
        args.append("--no-save")
    done = train(*args, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    if case in POLICY_REFUSALS:
        assert done.stderr.startswith("train.py: error: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    else:
        assert "usage" in done.stderr
    assert "error" in done.stderr
    assert_no_traceback(done)
    assert "final test accuracy" not in done.stdout


# ---------------------------------------------------------------------------------------------
# A tiny run with --metrics and a checkpoint; then --evaluate on it.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tiny_run")
    checkpoint, metrics = tmp / "ck" / "last.pt", tmp / "out" / "metrics.json"
    done = train(*TINY_ARGS, "--epochs", "1", "--save-model", str(checkpoint),
                 "--metrics", str(metrics))
    return {"done": done, "checkpoint": checkpoint, "metrics": metrics}


def test_tiny_run_succeeds(tiny_run):
    done = tiny_run["done"]
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout
    assert_no_traceback(done)


def test_metrics_json(tiny_run):
    metrics = json.loads(tiny_run["metrics"].read_text())
    for key in ("history", "parameters", "device", "recipe", "torch"):
        assert key in metrics
    assert metrics["parameters"] == 19200
    assert metrics["model"]["dropout_plan"] == "table"
    assert metrics["model"]["channels"] == list(model.CHANNELS)
    assert metrics["device"] == "cpu"
    assert metrics["torch"] == torch.__version__
    assert metrics["history"]["epoch"] == [1]
    assert metrics["recipe"]["limit_train"] == 256
    assert metrics["recipe"]["batch_size"] == 64
    assert metrics["recipe"]["epochs"] == 1
    assert metrics["final_test_acc"] == metrics["history"]["test_acc"][-1]
    assert f"final test accuracy: {metrics['final_test_acc']:.2f}%" in tiny_run["done"].stdout


def test_checkpoint_of_tiny_run_loads(tiny_run):
    checkpoint = checkpoints.read_checkpoint(tiny_run["checkpoint"])
    assert checkpoint["history"]["epoch"] == [1]
    assert checkpoint["recipe"]["limit_train"] == 256
    assert [p.name for p in tiny_run["checkpoint"].parent.iterdir()] == ["last.pt"]


def test_evaluate_checkpoint(tiny_run):
    done = train("--evaluate", str(tiny_run["checkpoint"]), "--no-save", "--device", "cpu",
                 "--quiet", "--limit-test", "200", "--test-batch-size", "200")
    assert done.returncode == 0, done.stderr
    assert_no_traceback(done)
    found = re.search(r"accuracy ([\d.]+)% on 200 images", done.stdout)
    assert found, done.stdout
    # The same weights on the same 200 images score what the run itself reported.
    metrics = json.loads(tiny_run["metrics"].read_text())
    assert found.group(1) == f"{metrics['history']['test_acc'][-1]:.2f}"


# ---------------------------------------------------------------------------------------------
# A diverging run stops with a clear message.
# ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run(tmp_path):
    path = tmp_path / "nan.pt"
    done = train(*TINY_ARGS, "--lr", "1e12", "--momentum", "0.99", "--epochs", "3",
                 "--save-model", str(path))
    assert done.returncode != 0
    assert_no_traceback(done)
    assert "final test accuracy" not in done.stdout
    found = re.search(r"epoch (\d+), batch (\d+)", done.stderr)
    assert found, done.stderr
    assert "NaN" in done.stderr
    if found.group(1) == "1":
        assert not path.exists()
        assert "no good epoch was saved" in done.stderr


def test_diverged_epoch_is_not_saved_as_good(tmp_path):
    path = tmp_path / "nan.pt"
    # One batch per epoch: the step after the only (finite) loss of epoch 1 diverges.
    done = train(*TINY_ARGS, "--limit-train", "64", "--lr", "1e20", "--epochs", "3",
                 "--save-model", str(path))
    assert done.returncode != 0
    assert_no_traceback(done)
    if path.exists():
        checkpoint = checkpoints.read_checkpoint(path)
        assert all(math.isfinite(v) for v in checkpoint["history"]["test_loss"])
        for name, tensor in checkpoint["model"].items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), name


# ---------------------------------------------------------------------------------------------
# Ctrl-C keeps the last complete epoch, and --resume continues from it.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_then_resume(tmp_path):
    path = tmp_path / "run" / "last.pt"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    args = ["--device", "cpu", "--quiet", "--limit-train", "2048", "--limit-test", "200",
            "--batch-size", "32", "--epochs", "50", "--save-model", str(path)]
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=ROOT, env=env(), stdout=fout, stderr=ferr,
            # A child of a background shell may inherit SIGINT ignored; Python then never
            # turns it into KeyboardInterrupt. Start it with the default disposition.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                assert proc.poll() is None, f"train.py exited early: {err.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err.read_text()
    assert rc != 0
    assert "resume" in stderr
    assert_no_traceback(stderr + out.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no .partial left

    saved = checkpoints.read_checkpoint(path)
    epochs = len(saved["history"]["epoch"])
    assert epochs >= 1
    assert saved["history"]["epoch"] == list(range(1, epochs + 1))

    done = train("--resume", str(path), "--epochs", str(epochs + 1), "--device", "cpu",
                 "--quiet")
    assert done.returncode == 0, done.stderr
    assert_no_traceback(done)
    assert f"after epoch {epochs} of {epochs + 1}" in done.stdout
    assert re.fullmatch(FINAL.format(f"{epochs + 1} epochs", re.escape(f"checkpoint: {path}")),
                        last_line(done)), done.stdout
    resumed = checkpoints.read_checkpoint(path)
    assert resumed["history"]["epoch"] == list(range(1, epochs + 2))
    # The finished epochs are kept as they were; the recipe is the interrupted run's.
    for key in ("train_loss", "test_loss", "test_acc", "lr"):
        assert resumed["history"][key][:epochs] == saved["history"][key]
    assert resumed["recipe"]["limit_train"] == 2048
    assert resumed["recipe"]["batch_size"] == 32


# ---------------------------------------------------------------------------------------------
# The command line as a learner lives it.
# ---------------------------------------------------------------------------------------------
def test_epoch_lines_arrive_as_they_happen_through_a_pipe(tmp_path):
    """Without PYTHONUNBUFFERED, a piped stdout would hold every line until the run ended."""
    child_env = {k: v for k, v in env().items() if k != "PYTHONUNBUFFERED"}
    args = ["--device", "cpu", "--quiet", "--limit-train", "1024", "--limit-test", "200",
            "--batch-size", "32", "--epochs", "50", "--no-save"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=child_env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a line that never comes ends the wait
    watchdog.start()
    try:
        first = next((line for line in proc.stdout if line.startswith("epoch  1:")), None)
        assert first is not None, (tmp_path / "stderr.txt").read_text()
        assert proc.poll() is None  # epoch 1 of 50 arrived while the run went on
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


def test_a_redirected_log_has_no_bars(tmp_path):
    """A redirected 20-epoch log would get 1,900 bar refreshes (203 KB)."""
    done = train(*[a for a in TINY_ARGS if a != "--quiet"], "--epochs", "2", "--no-save")
    assert done.returncode == 0, done.stderr
    assert "epoch  1 train" not in done.stderr and "\r" not in done.stderr, done.stderr
    assert [line[:9] for line in done.stdout.splitlines() if line.startswith("epoch")] == [
        "epoch  1:", "epoch  2:"]


@pytest.mark.slow
def test_a_terminal_gets_bars_unless_quiet(tmp_path):
    def stderr_on_a_terminal(*flags: str) -> str:
        main_end, child_end = pty.openpty()
        # A terminal of 24 x 80 (a new pty is 0 x 0, where tqdm draws an empty bar).
        fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        proc = subprocess.Popen([sys.executable, "train.py", "--device", "cpu", *flags,
                                 "--limit-train", "256", "--limit-test", "200",
                                 "--epochs", "1", "--no-save"], cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=child_end)
        os.close(child_end)
        seen = b""
        while True:
            try:
                chunk = os.read(main_end, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        os.close(main_end)
        assert proc.wait(timeout=300) == 0, seen
        return seen.decode(errors="replace")

    assert "epoch  1 train" in stderr_on_a_terminal()
    assert "epoch  1 train" not in stderr_on_a_terminal("--quiet")


def test_the_last_line_says_where_the_run_is_kept(tiny_run):
    done = tiny_run["done"]
    kept = f"checkpoint: {tiny_run['checkpoint']}; metrics: {tiny_run['metrics']}"
    assert re.fullmatch(FINAL.format("1 epoch", re.escape(kept)), last_line(done)), done.stdout


def one_usage_line(done: subprocess.CompletedProcess) -> str:
    """A policy refusal: exit 2 and one line, without argparse's 13-line usage block."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert_no_traceback(done)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), done.stderr
    return lines[0]


# Paths a hint must give back exactly: spaces, quotes, shell characters, non-ASCII, and a
# leading '-' (which argparse takes for a flag unless it is joined to its own: --resume=-run.pt).
AWKWARD_PATHS = ["my run.pt", "it's \"here\".pt", "$HOME;`x` *.pt", "épreuve/последний.pt",
                 "-run.pt", "--resume", "- a b/c.pt"]


@pytest.mark.quick
@pytest.mark.parametrize("data_dir", [None, "my data", "-data"])
@pytest.mark.parametrize("path", AWKWARD_PATHS)
def test_a_hint_pastes_back_exactly_its_paths(path, data_dir):
    hints = {"resume": command_line.checkpoint_command("--resume", path, data_dir, "--epochs",
                                                       "6"),
             "evaluate": command_line.checkpoint_command("--evaluate", path, data_dir)}
    for dest, hint in hints.items():
        words = shlex.split(hint)  # as a shell splits the pasted line
        assert words[:2] == ["python", "train.py"], hint
        args = cli.build_parser().parse_args(words[2:])
        assert getattr(args, dest) == path, hint
        assert args.data_dir == (cli.DEFAULT_DATA_DIR if data_dir is None else data_dir), hint
    assert cli.build_parser().parse_args(shlex.split(hints["resume"])[2:]).epochs == 6


def test_a_policy_refusal_is_one_line_without_the_usage_block(tmp_path):
    path = tmp_path / "x.pt"
    line = one_usage_line(train(*TINY_ARGS, "--save-model", str(path), "--metrics", str(path)))
    assert line == (f"train.py: error: --save-model and --metrics name the same file {path}: "
                    f"give each its own path")
    assert not path.exists()


def test_threads_flag_sets_and_records_the_thread_count(tmp_path):
    metrics = tmp_path / "m.json"
    done = train(*TINY_ARGS, "--epochs", "1", "--no-save", "--threads", "2", "--metrics",
                 str(metrics))
    assert done.returncode == 0, done.stderr
    assert json.loads(metrics.read_text())["threads"] == 2
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "The README's timings and histories depend on it" in help_text


def test_no_deterministic_trains_and_records_it(tmp_path):
    metrics = tmp_path / "m.json"
    done = train(*TINY_ARGS, "--epochs", "1", "--no-save", "--no-deterministic", "--metrics",
                 str(metrics))
    assert done.returncode == 0, done.stderr
    assert json.loads(metrics.read_text())["recipe"]["deterministic"] is False


def test_every_flag_has_help():
    for action in cli.build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_help_groups_every_flag_and_ends_with_examples_that_parse():
    parser = cli.build_parser()
    titles = [group.title for group in parser._action_groups]
    for title in ("recipe", "model variants", "data", "checkpoints and outputs", "run"):
        assert any(t.startswith(title) for t in titles), titles
    grouped = {a.dest for g in parser._action_groups if g.title != "options"
               for a in g._group_actions}
    assert grouped == {a.dest for a in parser._actions} - {"help"}
    examples = [line.split("#")[0].split() for line in cli.EXAMPLES.splitlines()[1:]]
    assert [words[:2] for words in examples] == [["python", "train.py"]] * 4
    for words in examples:
        parser.parse_args(words[2:])  # each example is train.py's own flags
    assert "--model speedrun" in cli.EXAMPLES and "--resume" in cli.EXAMPLES
    assert "--evaluate" in cli.EXAMPLES and cli.EXAMPLES in parser.format_help()
