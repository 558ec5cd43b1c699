"""One output policy for every file train.py writes, and one lock per checkpoint and
per data-folder fetch. Most cases run train.main in this process (a refusal comes before any
training); the races run real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from runs import SMALL, TINY_ARGS, TINY_RECIPE, assert_no_traceback, env, main, refused

import train as cli
from support import checkpoints, locks, metrics, mnist_files, outputs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _signals_restored(signals_restored):
    """train.main installs its own signal handlers and restores them; check it stays so
    (conftest.py's signals_restored then puts them back either way)."""
    import signal

    yield
    for s, handler in signals_restored.items():
        assert signal.getsignal(s) == handler


@pytest.fixture
def files(tmp_path, mnist_dir, one_epoch_checkpoint) -> dict[str, Path]:
    """Files of every kind an output could wrongly land on, and the data folder as a link."""
    (tmp_path / "data").symlink_to(mnist_dir.resolve(), target_is_directory=True)
    found = {"checkpoint": tmp_path / "run.pt", "text": tmp_path / "notes.txt",
             "json": tmp_path / "other.json"}
    found["checkpoint"].write_bytes(one_epoch_checkpoint)
    found["text"].write_text("my notes\n")
    found["json"].write_text('{"not": "metrics"}\n')
    return found


@pytest.fixture(scope="module")
def one_epoch_checkpoint(mnist_dir, tmp_path_factory) -> bytes:
    run = cli.build_run({**TINY_RECIPE, "limit_train": 64, "limit_test": 64,
                           "test_batch_size": 64}, torch.device("cpu"), mnist_dir)
    cli.fit(run, progress=False, log=False)
    path = tmp_path_factory.mktemp("outputs") / "run.pt"
    cli.save_run(run, path)
    return path.read_bytes()


def unchanged(files: dict[str, Path], before: dict[str, bytes]) -> bool:
    return all(files[k].read_bytes() == v for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# No output replaces a file that is not its own without --force.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["checkpoint", "text", "json"])
def test_metrics_never_replaces_another_kind_of_file(files, capsys, monkeypatch, kind):
    monkeypatch.chdir(files["text"].parent)
    before = {k: p.read_bytes() for k, p in files.items()}
    line = refused(capsys, *SMALL, "--no-save", "--metrics", str(files[kind]))
    assert "already exists and is not a metrics file of train.py" in line and "--force" in line
    assert unchanged(files, before)


def test_metrics_replaces_its_own_kind_and_force_any(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    metrics = files["text"].parent / "m.json"
    for seed in (1, 2):  # the second run replaces the first run's metrics file
        code, _, err = main(capsys, *SMALL, "--no-save", "--seed", str(seed),
                            "--metrics", str(metrics))
        assert code == 0, err
        assert json.loads(metrics.read_text())["recipe"]["seed"] == seed
    code, _, _ = main(capsys, *SMALL, "--no-save", "--metrics", str(files["text"]), "--force")
    assert code == 0
    assert "history" in json.loads(files["text"].read_text())


def test_an_output_is_never_an_input(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    data_file = Path("data/MNIST/raw/t10k-labels-idx1-ubyte")
    before = {k: p.read_bytes() for k, p in files.items()}
    ck = str(files["checkpoint"])
    line = refused(capsys, *SMALL, "--no-save", "--metrics", str(data_file), "--force")
    assert "is the MNIST file t10k-labels-idx1-ubyte, which this run reads" in line
    line = refused(capsys, "--resume", ck, "--epochs", "2", "--metrics", ck)
    assert "--resume and --metrics name the same file" in line
    line = refused(capsys, "--resume", ck, "--epochs", "2", "--no-save", "--metrics", ck,
                   "--force")
    assert "is the --resume checkpoint, which this run reads" in line
    line = refused(capsys, "--evaluate", ck, "--metrics", ck)
    assert "--evaluate prints its score and writes no file" in line
    line = refused(capsys, *SMALL, "--save-model", "x.pt", "--metrics", "./x.pt", "--force")
    assert "--save-model and --metrics name the same file" in line
    assert unchanged(files, before)
    assert not Path("x.pt").exists()
    assert mnist_files.md5sum(data_file) == mnist_files.MNIST_FILES[data_file.name][1]


def test_evaluate_refuses_every_flag_that_would_write_a_file(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    ck = str(files["checkpoint"])
    before = {k: p.read_bytes() for k, p in files.items()}
    for flags, named in ((["--save-model", "x.pt"], "--save-model"), (["--force"], "--force"),
                         (["--save-model", ck, "--force"], "--save-model and --force")):
        line = refused(capsys, "--evaluate", ck, *flags)
        assert line.endswith(f"--evaluate prints its score and writes no file: drop {named}")
    assert unchanged(files, before)
    assert not Path("x.pt").exists()


def test_a_metrics_file_names_the_commit_its_run_started_from(tmp_path, capsys, monkeypatch):
    trained = []
    fit = cli.fit
    monkeypatch.setattr(cli, "fit", lambda run, **kw: trained.append(1) or fit(run, **kw))
    # What `git describe` says: the commit checked out as the run starts, another once it trains.
    monkeypatch.setattr(metrics, "git_commit", lambda: "def5678" if trained else "abc1234")
    code, _, err = main(capsys, *SMALL, "--no-save", "--metrics", str(tmp_path / "m.json"))
    assert code == 0, err
    assert trained
    assert json.loads((tmp_path / "m.json").read_text())["commit"] == "abc1234"


def test_no_save_metrics_keeps_a_checkpoint(files, capsys, monkeypatch):
    """`--no-save --metrics keep.pt` used to turn a checkpoint into JSON."""
    monkeypatch.chdir(files["text"].parent)
    before = files["checkpoint"].read_bytes()
    refused(capsys, *SMALL, "--no-save", "--metrics", str(files["checkpoint"]))
    assert files["checkpoint"].read_bytes() == before
    checkpoints.read_checkpoint(files["checkpoint"])


def test_a_symlink_is_checked_as_the_file_it_names(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    link = files["text"].parent / "link.json"
    link.symlink_to(files["checkpoint"])
    before = files["checkpoint"].read_bytes()
    refused(capsys, *SMALL, "--no-save", "--metrics", str(link))
    assert files["checkpoint"].read_bytes() == before
    line = refused(capsys, *SMALL, "--save-model", str(files["checkpoint"]), "--metrics",
                   str(link))
    assert "name the same file" in line


@pytest.mark.parametrize("flag", ["--evaluate", "--resume", "--save-model", "--metrics",
                                  "--data-dir"])
def test_an_empty_path_is_a_usage_error(capsys, tmp_path, monkeypatch, flag):
    """`--evaluate ""` used to start a 20-epoch training, `--resume ""` a fresh run."""
    monkeypatch.chdir(tmp_path)
    code, out, err = main(capsys, *SMALL, flag, "")
    assert code == 2
    assert f"argument {flag}: must not be empty" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", ["--evaluate", "--resume", "--save-model", "--metrics",
                                  "--data-dir"])
def test_a_name_too_long_is_a_one_line_usage_error(capsys, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, flag, str(tmp_path / ("x" * 300))]
    if flag == "--metrics":
        args.append("--no-save")
    assert "File name too long" in refused(capsys, *args)
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # checks make folders only


def test_the_temporary_name_is_checked_too(capsys, tmp_path, monkeypatch):
    """A name that fits but whose temporary file (`.NAME.XXXXXXXX.partial`) would not is
    refused before the epoch of training that would end in that failure."""
    monkeypatch.chdir(tmp_path)
    name = "y" * 250 + ".pt"
    assert "is not writable: File name too long" in refused(capsys, *SMALL, "--save-model",
                                                             name)


# ---------------------------------------------------------------------------------------------
# Every write is atomic, metrics included.
# ---------------------------------------------------------------------------------------------
def test_a_failed_metrics_write_keeps_the_old_file_and_says_so(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    metrics, save = files["text"].parent / "m.json", files["text"].parent / "new.pt"
    assert main(capsys, *SMALL, "--no-save", "--metrics", str(metrics))[0] == 0
    before = metrics.read_bytes()
    real_replace = os.replace

    def disk_full_for_json(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", disk_full_for_json)
    code, _, err = main(capsys, *SMALL, "--save-model", str(save), "--metrics", str(metrics))
    assert code == 1
    assert err.strip() == (f"error: could not write --metrics {metrics}: No space left on "
                           f"device; epoch 1 is saved in {save}; write its metrics with "
                           f"`python train.py --resume {save} --metrics {metrics}`")
    assert metrics.read_bytes() == before
    assert not [p for p in os.listdir(metrics.parent) if p.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# One lock per checkpoint: a second run refuses at once, naming the process.
# ---------------------------------------------------------------------------------------------
HOLDER = ("import sys; sys.path.insert(0, sys.argv[1]); from support import locks; "
          "lock = locks.acquire(sys.argv[2], wait=False); print('held', flush=True); "
          "sys.stdin.read(); lock.release()")


@pytest.fixture
def held(tmp_path):
    """hold(path): another process holds `path`'s lock file until the test ends."""
    procs = []

    def hold(lock_path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(lock_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.communicate("", timeout=30)


def test_a_checkpoint_in_use_is_refused_naming_its_process(files, capsys, monkeypatch, held):
    monkeypatch.chdir(files["text"].parent)
    ck = files["checkpoint"]
    leftover = ck.parent / f".{ck.name}.abc123{outputs.SCRATCH_SUFFIX}"
    leftover.write_bytes(b"a save in progress")
    holder = held(checkpoints.lock_file(ck))
    before = ck.read_bytes()
    for args in (["--resume", str(ck), "--epochs", "2"],
                 [*SMALL, "--save-model", str(ck), "--force"]):
        code, out, err = main(capsys, *args)
        assert code == 1
        assert err.strip() == (f"error: {ck} is in use by process {holder.pid}, which is "
                               f"training into it: wait for it to finish or stop it, or save "
                               f"to another file (--save-model OTHER.pt)")
    assert ck.read_bytes() == before
    assert leftover.exists()  # another run's scratch file is never removed
    code, out, _ = main(capsys, "--evaluate", str(ck), "--device", "cpu", "--quiet",
                        "--limit-test", "64")  # reading needs no lock
    assert code == 0 and "accuracy" in out


def test_the_lock_is_gone_after_the_run(files, capsys, monkeypatch):
    monkeypatch.chdir(files["text"].parent)
    assert main(capsys, *SMALL, "--save-model", "new/last.pt")[0] == 0
    assert os.listdir("new") == ["last.pt"]


def test_two_runs_started_at_once_on_one_checkpoint(tmp_path):
    """They used to both exit 0, the file holding the second run only: now one trains, and
    the other refuses (in use, or already there if the first was that quick)."""
    path = tmp_path / "last.pt"
    procs = [subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, "--epochs", "1", "--seed",
                               str(seed), "--save-model", str(path)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(proc.wait(timeout=300), *proc.communicate()) for proc in procs]
    for _, out, err in results:
        assert_no_traceback(out + err)
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    winner = next(seed for seed, (code, _, _) in zip((1, 2), results, strict=True) if code == 0)
    assert checkpoints.read_checkpoint(path)["recipe"]["seed"] == winner
    loser = next(err for code, _, err in results if code != 0)
    assert "is in use by process" in loser or "already exists" in loser
    assert os.listdir(tmp_path) == ["last.pt"]


def test_lock_is_taken_over_from_a_killed_holder(tmp_path):
    """A SIGKILL leaves the lock file, but not the lock: the kernel dropped it."""
    path = tmp_path / ".x.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(locks.Busy) as busy:
        locks.acquire(path, wait=False)
    assert busy.value.pid == proc.pid
    proc.kill()
    proc.wait()
    assert path.exists()
    locks.acquire(path, wait=False).release()
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# One lock per data-folder fetch: a second fetch waits, and never removes the first's files.
# ---------------------------------------------------------------------------------------------
def test_a_second_fetch_waits_for_the_first(tmp_path, small_mnist, monkeypatch, capsys):
    entered, release = threading.Event(), threading.Event()
    raw = mnist_files.raw_dir(tmp_path)
    scratch = raw.parent / ".fetch-first"
    called = []

    def slow(dest, files):
        scratch.mkdir(parents=True)  # as torchvision's download folder
        entered.set()
        assert release.wait(60)
        small_mnist.write(tmp_path)
        scratch.rmdir()

    def second_source(dest, files):
        called.append(dest)

    monkeypatch.setitem(mnist_files.SOURCES, "slow", slow)
    monkeypatch.setitem(mnist_files.SOURCES, "second", second_source)
    results = {}

    def fetch(name: str, source: str) -> None:
        results[name] = mnist_files.ensure_mnist(tmp_path, sources=(source,),
                                                 files=small_mnist.files, verbose=True)

    first = threading.Thread(target=fetch, args=("first", "slow"))
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=fetch, args=("second", "second"))
    second.start()
    deadline = time.monotonic() + 60
    while "MNIST: waiting for process" not in capsys.readouterr().out:
        assert time.monotonic() < deadline, "the second fetch did not wait"
        time.sleep(0.05)
    assert scratch.is_dir()  # the waiting fetch left the first one's scratch folder alone
    release.set()
    first.join(60)
    second.join(60)
    assert results == {"first": "slow", "second": "local"}
    assert called == []  # the second found the first's files
    assert sorted(os.listdir(raw.parent)) == ["raw"]  # no lock file, no scratch left


@pytest.mark.parametrize("mode", [0o444, 0o600, 0o640])
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "k.pt"
    path.write_bytes(b"old")
    path.chmod(mode)
    outputs.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_new_file_gets_the_umasks_mode(tmp_path):
    old = os.umask(0o027)
    try:
        outputs.atomic_write(tmp_path / "new.pt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o640
