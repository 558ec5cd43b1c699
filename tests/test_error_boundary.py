"""One error boundary in train.py. Each failure a user can cause or meet is one line
that says what happened and what is on disk; a bug keeps its traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import (
    SMALL,
    TINY_ARGS,
    Uncompiled,
    assert_no_traceback,
    env,
    finish,
    main,
    spawn,
    wait_for,
)

import train as cli
import utils
from model import Net
from support import checkpoints, stopping, workers
from support.recipe import full_recipe
from support.torchvision_loader import torchvision_loaders

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("signals_restored")  # conftest.py's, for every test here


@pytest.fixture
def here(tmp_path, mnist_dir, monkeypatch) -> Path:
    """A folder to run in, whose data/ is the repository's MNIST."""
    (tmp_path / "data").symlink_to(mnist_dir.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# A full disk during a checkpoint save.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 300 KB tmpfs: room for one checkpoint, not for the next beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_during_a_save_is_one_line(here, tiny_disk, capsys):
    path = tiny_disk / "last.pt"
    code, _, err = main(capsys, *SMALL, "--epochs", "3", "--save-model", str(path))
    assert code == 1
    assert one_error_line(err) == (
        f"error: could not save epoch 2 in {path}: No space left on device; epoch 1 is saved "
        f"in {path}; continue with `python train.py --resume {path}`")
    assert checkpoints.read_checkpoint(path)["history"]["epoch"] == [1]
    assert os.listdir(tiny_disk) == ["last.pt"]


def test_torchs_report_of_a_failed_write_is_recognised(here, capsys, monkeypatch):
    """torch.save reports a full disk as RuntimeError "unexpected pos", with the OSError as
    its context; the line says the OSError's words, and the epoch that is on disk."""
    real_save = torch.save

    def save_fills_the_disk(obj, f, *args, **kwargs):
        if len(obj["history"]["epoch"]) == 2:
            try:
                raise OSError(28, "No space left on device")
            except OSError:  # torch's writer fails in turn, the OSError its context
                raise RuntimeError(  # noqa: B904
                    "[enforce fail at inline_container.cc:672] . unexpected pos 89152 vs 89040")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_fills_the_disk)
    code, _, err = main(capsys, *SMALL, "--epochs", "3", "--save-model", "last.pt")
    assert code == 1
    assert one_error_line(err).startswith(
        "error: could not save epoch 2 in last.pt: No space left on device; epoch 1 is saved")
    assert sorted(os.listdir(".")) == ["data", "last.pt"]


def test_a_bug_in_a_save_keeps_its_traceback(here, capsys, monkeypatch):
    def buggy(obj, f, *args, **kwargs):
        raise TypeError("a bug, not the user's")

    monkeypatch.setattr(checkpoints.torch, "save", buggy)
    with pytest.raises(TypeError, match="a bug"):
        cli.main([*SMALL, "--save-model", "last.pt"])


def test_write_failure_reads_the_whole_chain():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 1 vs 2")  # noqa: B904 - as torch raises it
    except RuntimeError as err:
        assert stopping.write_failure(err) == "No space left on device"
    assert stopping.write_failure(RuntimeError("file write failed")) is not None
    assert stopping.write_failure(RuntimeError("something else")) is None
    assert stopping.write_failure(BrokenPipeError(32, "Broken pipe")) is None


# ---------------------------------------------------------------------------------------------
# Out of memory: which flag to lower.
# ---------------------------------------------------------------------------------------------
def allocate_too_much(monkeypatch, when_training: bool) -> None:
    """The CPU allocator's own failure, raised in a training step or in a test batch."""
    real_forward = Net.forward

    def forward(self, x):
        if self.training == when_training:
            torch.empty(2**50)  # DefaultCPUAllocator: can't allocate memory
        return real_forward(self, x)

    monkeypatch.setattr(Net, "forward", forward)


@pytest.mark.parametrize("when_training,doing,flag", [(True, "training", "--batch-size"),
                                                      (False, "testing", "--test-batch-size")])
def test_out_of_memory_names_the_flag_to_lower(here, capsys, monkeypatch, when_training, doing,
                                               flag):
    allocate_too_much(monkeypatch, when_training)
    code, _, err = main(capsys, *SMALL, "--save-model", "last.pt")
    assert code == 1
    assert one_error_line(err) == (
        f"error: out of memory while {doing} epoch 1 with {flag} 64: run again with a "
        f"smaller {flag}; no complete epoch was saved.")


def test_out_of_memory_after_a_saved_epoch_says_a_new_run_is_needed(here, capsys, monkeypatch):
    real_forward, calls = Net.forward, []

    def forward(self, x):
        calls.append(self.training)
        if calls.count(True) > 1:  # epoch 1 (one training batch) went through
            torch.empty(2**50)
        return real_forward(self, x)

    monkeypatch.setattr(Net, "forward", forward)
    code, _, err = main(capsys, *SMALL, "--epochs", "2", "--save-model", "last.pt")
    assert code == 1
    assert one_error_line(err) == (
        "error: out of memory while training epoch 2 with --batch-size 64: start a new run "
        "with a smaller --batch-size and --save-model NEW.pt (a resume keeps the saved "
        "--batch-size); epoch 1 is saved in last.pt")


def test_out_of_memory_while_evaluating(here, capsys, monkeypatch):
    assert main(capsys, *SMALL, "--save-model", "last.pt")[0] == 0
    allocate_too_much(monkeypatch, when_training=False)
    code, _, err = main(capsys, "--evaluate", "last.pt", "--device", "cpu", "--quiet",
                        "--limit-test", "64", "--test-batch-size", "32")
    assert code == 1
    assert one_error_line(err) == (
        "error: out of memory while evaluating with --test-batch-size 32: run again with a "
        "smaller --test-batch-size; an evaluation writes nothing.")


def test_out_of_memory_is_recognised_in_each_form():
    assert stopping.out_of_memory(MemoryError())
    assert stopping.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to ..."))
    assert stopping.out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not stopping.out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------
# A closed stdout: stop quietly, keeping what is saved, never blaming the checkpoint.
# ---------------------------------------------------------------------------------------------
def test_a_closed_stdout_stops_quietly(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, "--epochs", "3",
                             "--save-model", str(path)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("device: cpu")
    proc.stdout.close()  # as `| head -1` does
    rc = proc.wait(timeout=300)
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGPIPE, err
    assert_no_traceback(err)
    assert "checkpoint" not in err.split(";")[0]  # the output's fault, not the checkpoint's
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: the output was closed;"), err
    done = len(checkpoints.read_checkpoint(path)["history"]["epoch"])
    assert done >= 1  # the epoch whose line could not be printed was saved all the same
    assert f"epoch {done} is saved in {path}" in lines[0]


# ---------------------------------------------------------------------------------------------
# --compile without a C++ compiler: the run can go on without it.
# ---------------------------------------------------------------------------------------------
def test_no_compiler_is_one_line_that_says_the_run_can_go_on(here, capsys, monkeypatch):
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    class NeedsACompiler(Uncompiled):  # torch.compile's wrapper, as it fails at its first call
        def forward(self, x):
            raise InductorError(InvalidCxxCompiler(), None)

    monkeypatch.setattr(cli, "compiled", lambda model, device: NeedsACompiler(model))
    code, _, err = main(capsys, *SMALL, "--compile", "--save-model", "last.pt")
    assert code == 1
    assert one_error_line(err) == (
        "error: --compile found no C++ compiler (No working C++ compiler found in "
        f"torch._inductor.config.cpp.cxx: {torch._inductor.config.cpp.cxx}): run again "
        "without --compile, or install a C++ compiler (g++ or clang++); no complete epoch "
        "was saved.")


# ---------------------------------------------------------------------------------------------
# Signals: a second one while the report is written is ignored; nohup's SIGHUP stays ignored.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gap", [0.0, 0.03])
def test_a_second_sigterm_cannot_cut_the_report_short(tmp_path, gap):
    path = tmp_path / "last.pt"
    args = ["--device", "cpu", "--quiet", "--limit-train", "2048", "--limit-test", "200",
            "--batch-size", "32", "--epochs", "50", "--save-model", str(path)]
    proc, out, err = spawn(args, tmp_path)
    wait_for(path, proc, err)
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    proc.send_signal(signal.SIGTERM)  # without the ignore: a traceback, and a lost report
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 128 + signal.SIGTERM
    stderr = err.read_text()
    assert_no_traceback(stderr + out.read_text())
    epochs = len(checkpoints.read_checkpoint(path)["history"]["epoch"])
    assert f"epoch {epochs} is saved in {path}" in stderr
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "stderr.txt", "stdout.txt"]


def test_the_first_signal_ignores_the_rest_until_main_returns():
    found = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    with stopping.stopping_on_signals():
        with pytest.raises(stopping.Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in stopping.STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS} == found


def test_a_command_that_exits_after_a_stop_ignores_the_signals_until_it_exits():
    """Since a second SIGTERM during the interpreter's shutdown killed the process (-15, not
    143) once in a full suite's run."""
    found = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    try:
        with stopping.stopping_on_signals(then_exit=True):
            with pytest.raises(stopping.Stopped):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in stopping.STOP_SIGNALS)
    finally:
        for s, handler in found.items():
            signal.signal(s, handler)


def test_a_signal_ignored_at_the_start_stays_ignored():
    """nohup ignores SIGHUP; a run started under it must not stop when the terminal closes."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with stopping.stopping_on_signals():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN


# ---------------------------------------------------------------------------------------------
# Ctrl-C while the torchvision loader's workers run: no worker's traceback.
# ---------------------------------------------------------------------------------------------
def test_workers_leave_ctrl_c_to_the_main_process(tmp_path, mnist_dir):
    recipe = full_recipe({"batch_size": 64, "test_batch_size": 64, "limit_train": 64,
                          "limit_test": 64, "loader": "torchvision"})
    train, test = torchvision_loaders(recipe, mnist_dir, torch.device("cpu"), num_workers=1)
    assert train.worker_init_fn is workers.leave_ctrl_c is test.worker_init_fn
    before = signal.getsignal(signal.SIGINT)
    try:
        workers.leave_ctrl_c(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


CTRL_C_AS_WORKERS_START = """
import os, signal, sys, time
import torch
from torch.utils.data import TensorDataset
from support import workers

parent, got = os.getpid(), []


def handler(signum, frame):  # train.py's raises; a forked worker would inherit it
    if os.getpid() != parent:
        raise KeyboardInterrupt
    got.append(signum)


def slow_start(worker_id):
    time.sleep(1.0)  # the moment between a worker's start and its worker_init_fn, made long
    workers.leave_ctrl_c(worker_id)


class CtrlCWhileMade(workers.CtrlCSafeDataLoader):
    def _get_iterator(self):
        batches = super()._get_iterator()
        os.kill(parent, signal.SIGINT)  # a Ctrl-C while the iterator is being made
        time.sleep(0.2)
        print("handled while made:", got)
        return batches


if __name__ == "__main__":
    signal.signal(signal.SIGINT, handler)
    data = TensorDataset(torch.arange(8.0))
    if sys.argv[1] == "worker":
        loader = workers.CtrlCSafeDataLoader(data, batch_size=4, num_workers=1,
                                           worker_init_fn=slow_start,
                                           multiprocessing_context="fork")
        batches = iter(loader)  # the worker is started, and sleeps
        os.killpg(parent, signal.SIGINT)  # a terminal's Ctrl-C: this process and its worker
    else:
        batches = iter(CtrlCWhileMade(data, batch_size=4, num_workers=1))
        print("handled once made:", got)
    print("batches:", len(list(batches)), "handled:", got)
"""


def ctrl_c_as_workers_start(tmp_path: Path, case: str) -> list[str]:
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_AS_WORKERS_START)
    done = subprocess.run([sys.executable, str(script), case], cwd=ROOT,
                          env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    assert_no_traceback(done)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


WORKER_EXCEPTHOOK = """
import sys
from support.workers import leave_ctrl_c
leave_ctrl_c(0)
for err in (ConnectionResetError(104, "Connection reset by peer"), EOFError(), ValueError("kept")):
    try:
        raise err
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as multiprocessing's resource sharer reports it
"""


def test_a_worker_is_quiet_about_a_main_process_that_hung_up_and_about_nothing_else():
    done = subprocess.run([sys.executable, "-c", WORKER_EXCEPTHOOK], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert "ValueError: kept" in done.stderr
    assert "ConnectionResetError" not in done.stderr and "EOFError" not in done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no forked workers")
def test_a_ctrl_c_before_a_worker_has_run_leave_ctrl_c_waits_for_it(tmp_path, mnist_dir):
    recipe = full_recipe({"batch_size": 64, "test_batch_size": 64, "limit_train": 64,
                          "limit_test": 64, "loader": "torchvision"})
    train, test = torchvision_loaders(recipe, mnist_dir, torch.device("cpu"), num_workers=1)
    assert isinstance(train, workers.CtrlCSafeDataLoader)
    assert isinstance(test, workers.CtrlCSafeDataLoader)
    # Unheld, the worker's KeyboardInterrupt ends it in its sleep, and the loader raises
    # "DataLoader worker exited unexpectedly"; held, both batches arrive, and the main process
    # takes the Ctrl-C.
    assert ctrl_c_as_workers_start(tmp_path, "worker") == [f"batches: 2 handled: [{SIGINT}]"]
    before = signal.getsignal(signal.SIGINT)
    assert sum(len(y) for _, y in test) == 64
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_a_ctrl_c_while_the_workers_are_set_up_arrives_once_they_are(tmp_path):
    # Unheld, it stopped the main process in the iterator's __init__, whose __del__ then
    # printed a traceback (an AttributeError on the half-made iterator).
    assert ctrl_c_as_workers_start(tmp_path, "main") == [
        "handled while made: []", f"handled once made: [{SIGINT}]",
        f"batches: 2 handled: [{SIGINT}]"]


SIGINT = int(signal.SIGINT)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_ctrl_c_during_a_torchvision_evaluation(tmp_path, mnist_dir):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("no /proc/PID/task/PID/children here")
    path = tmp_path / "tv.pt"
    run = cli.build_run({**utils.RECIPE, "loader": "torchvision", "epochs": 1, "limit_train": 64,
                     "limit_test": 64, "batch_size": 64}, torch.device("cpu"), mnist_dir)
    cli.fit(run, progress=False, log=False)
    cli.save_run(run, path)
    # A terminal's Ctrl-C goes to the whole process group: the workers get it too.
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--evaluate", str(path), "--device", "cpu", "--quiet",
         "--test-batch-size", "100"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while len(children(proc.pid)) < 2:  # the evaluation's two workers have started
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no DataLoader workers within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_traceback(output)
    if proc.returncode == 0:
        pytest.skip("the evaluation ended before the Ctrl-C")
    assert proc.returncode == 130, output
    assert "interrupted (Ctrl-C) while evaluating." in output
    assert "an evaluation writes nothing." in output
