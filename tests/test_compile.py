"""--compile for real: torch.compile with the inductor backend, which needs a C++
compiler on the CPU. The other tests that name --compile stub the compiler out, because they
are about its absence; this one is about the compile, so nothing is stubbed: train.py trains
a short run compiled, resumes it compiled, without compiling and compiled again, and scores
it, and the checkpoint loads into the notebook's model. Inductor writes its kernels into a
cache folder of the test's own, which proves it ran. Slow (a compile is tens of seconds on a
shared CPU), so it is not in the quick tier."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import TINY_ARGS, assert_no_traceback, env

import train as cli
import utils
from support import checkpoints

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's inductor needs a C++ compiler on the CPU")


def compiled_train(cache: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900,
                          env={**env(), "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert_no_traceback(done)
    return done


def kernels(cache: Path) -> set[Path]:
    """The C++ kernels inductor compiled into `cache`."""
    return {p for p in cache.rglob("*") if p.suffix in (".so", ".cpp")}


@pytest.mark.slow
def test_compile_trains_resumes_with_and_without_it_and_evaluates(tmp_path, mnist_dir):
    path, cache = tmp_path / "compiled.pt", tmp_path / "inductor"
    compiled_train(cache, *TINY_ARGS, "--epochs", "1", "--compile", "--save-model", str(path))
    first = kernels(cache)
    assert first, "inductor compiled no kernel: --compile did not compile"
    assert checkpoints.read_checkpoint(path)["recipe"]["compile"] is True

    compiled_train(cache, "--resume", str(path), "--epochs", "2", "--quiet")  # compiled again
    assert checkpoints.read_checkpoint(path)["recipe"]["compile"] is True

    shutil.rmtree(cache)
    compiled_train(cache, "--resume", str(path), "--epochs", "3", "--no-compile", "--quiet")
    assert not kernels(cache), "--no-compile compiled"
    assert checkpoints.read_checkpoint(path)["recipe"]["compile"] is False

    compiled_train(cache, "--resume", str(path), "--epochs", "4", "--compile", "--quiet")
    assert kernels(cache)
    saved = checkpoints.read_checkpoint(path)
    assert saved["history"]["epoch"] == [1, 2, 3, 4]
    assert saved["recipe"]["compile"] is True

    done = compiled_train(cache, "--evaluate", str(path), "--device", "cpu", "--quiet",
                          "--limit-test", "200", "--test-batch-size", "200")
    found = re.search(r"accuracy ([\d.]+)% on 200 images", done.stdout)
    assert found and found.group(1) == f"{saved['history']['test_acc'][-1]:.2f}", done.stdout

    # The notebook takes the run as it is: the plain module's keys, not the compiled
    # wrapper's (_orig_mod.*), loaded by its load_checkpoint into its eager objects.
    assert not any(k.startswith("_orig_mod") for k in saved["model"])
    notebook = cli.build_run({**saved["recipe"], "compile": False}, CPU, mnist_dir)
    history = utils.load_checkpoint(path, notebook.model, notebook.optimizer, notebook.scheduler,
                                    notebook.train_loader, notebook.recipe)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    for key, value in saved["model"].items():
        assert torch.equal(notebook.model.state_dict()[key], value), key
    assert os.listdir(tmp_path / "inductor")  # the cache was the test's own, not the user's
