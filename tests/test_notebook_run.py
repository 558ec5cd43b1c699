"""What the notebook's cells rely on: S6_SMOKE's one rule, the recipe in view, a training cell
that resumes from its checkpoint (utils.load_checkpoint, save_checkpoint), figures saved only
for a complete run, and bars that clear themselves. Each cell runs as the notebook holds it:
its own source, with the names the notebook's earlier cells define."""

from __future__ import annotations

import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
from runs import cols
from test_checkpoints import CPU, TINY, without_seconds

import model
import train as cli
import utils
from support import bookkeeping, checkpoints, recipe
from support.mnist_files import ensure_mnist

RECIPE = {**utils.RECIPE, **TINY, "epochs": 3}
NOTEBOOK = Path(__file__).resolve().parent.parent / "Session_6_Solution.ipynb"
CELLS = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def cell(marker: str) -> str:
    """The one code cell of the notebook that contains `marker`."""
    (source,) = [source for source in CELLS if marker in source]
    return source


SETTINGS_CELL, PLOTS_CELL = cell("CHECKPOINT = "), cell("finished = ")


def the_notebooks_names() -> dict:
    """What the settings cell imports from model and utils, as they are now (so that a test's
    monkeypatch reaches the cells), and torch and time."""
    names = re.search(r"from utils import \((.*?)\)", SETTINGS_CELL, re.S).group(1)
    return {**{n.strip(): getattr(utils, n.strip()) for n in names.split(",") if n.strip()},
            **{n: getattr(model, n) for n in ("Net", "layer_table")}, "torch": torch,
            "time": time}


def settings_cell(monkeypatch, smoke: str | None) -> dict:
    """Run the settings cell with S6_SMOKE set to `smoke` (None: unset); return its names."""
    if smoke is None:
        monkeypatch.delenv("S6_SMOKE", raising=False)
    else:
        monkeypatch.setenv("S6_SMOKE", smoke)
    names: dict = {}
    exec(SETTINGS_CELL, names)
    return names


# ---------------------------------------------------------------------------------------------
# S6_SMOKE: unset, empty or 0 is the full run; 1 the smoke run; anything else is refused.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "", "0"])
def test_unset_empty_or_0_is_the_full_run(monkeypatch, value):
    names = settings_cell(monkeypatch, value)
    assert names["recipe"]["epochs"] == 20 and "limit_train" not in names["recipe"]
    assert names["CHECKPOINT"] == "checkpoints/notebook.pt" and names["IMAGES"] == "images"


def test_1_is_the_smoke_run(monkeypatch):
    names = settings_cell(monkeypatch, "1")
    assert names["recipe"]["epochs"] == 1 and names["recipe"]["limit_train"] == 2048
    assert names["CHECKPOINT"] == "checkpoints/notebook-smoke.pt" and names["IMAGES"] is None


@pytest.mark.parametrize("value", ["true", "yes", " 1", "1 ", "2", "on", "false", "smoke"])
def test_any_other_value_is_refused_rather_than_run_in_full(monkeypatch, value):
    with pytest.raises(ValueError) as refused:
        settings_cell(monkeypatch, value)
    message = str(refused.value)
    assert f"S6_SMOKE={value!r}" in message
    assert "S6_SMOKE=1" in message and "unset" in message


# ---------------------------------------------------------------------------------------------
# The recipe in view: the write-up's settings, and nothing else.
# ---------------------------------------------------------------------------------------------
def test_the_notebooks_recipe_is_the_write_ups(monkeypatch):
    assert settings_cell(monkeypatch, "0")["recipe"] == recipe.WRITE_UP
    assert recipe.full_recipe(recipe.WRITE_UP) == recipe.RECIPE  # the switches: the defaults


# ---------------------------------------------------------------------------------------------
# Figures go to images/ only for a run with all its epochs.
# ---------------------------------------------------------------------------------------------
def plots_cell(tmp_path: Path, done: int, epochs: int, images: str | None) -> str:
    """Run the plots cell after `done` of `epochs` epochs; return what it printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = dict(train_loss=0.1, train_acc=98.0, test_loss=0.05, test_acc=99.0, lr=0.01,
               seconds=1.0)
    history = [{"epoch": e, **row} for e in range(1, done + 1)]
    folder = None if images is None else str(tmp_path / images)
    out = io.StringIO()
    names = {**the_notebooks_names(), "history": history, "recipe": {"epochs": epochs},
             "IMAGES": folder, "samples_fig": plt.figure(), "print": lambda *a, **k: print(
                 *a, **k, file=out)}
    exec(PLOTS_CELL, names)
    plt.close("all")
    return out.getvalue()


def test_a_complete_run_saves_its_figures_in_images(tmp_path):
    assert plots_cell(tmp_path, 3, 3, "images") == ""
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "accuracy.png", "loss.png", "samples.png"]


def test_an_incomplete_run_draws_its_figures_but_does_not_save_them(tmp_path):
    out = plots_cell(tmp_path, 1, 3, "images")
    assert "incomplete (1 of 3 epochs)" in out and "not saved in" in out
    assert "run the training cell again" in out
    assert not (tmp_path / "images").exists()


def test_no_images_folder_means_nothing_is_saved_and_nothing_said(tmp_path):
    assert plots_cell(tmp_path, 1, 3, None) == ""
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The bars: on stderr (train.py) or on the stream given (the notebook), cleared when done.
# ---------------------------------------------------------------------------------------------
def last_line(text: str) -> str:
    """What a terminal or Jupyter shows of the last line: the text after its last \\r."""
    return text.rstrip("\r").rsplit("\r", 1)[-1]


def test_a_bar_on_a_given_stream_clears_itself_when_its_pass_ends(capsys):
    stream = io.StringIO()
    for _ in bookkeeping.progress_bar(range(3), "epoch  1 train", stream):
        pass
    assert "epoch  1 train" in stream.getvalue()
    assert last_line(stream.getvalue()).strip() == ""
    assert capsys.readouterr().err == ""


def test_a_bar_with_progress_true_goes_to_stderr_and_clears_itself(capsys):
    for _ in bookkeeping.progress_bar(range(3), "epoch  1 train", True):
        pass
    err = capsys.readouterr().err
    assert "epoch  1 train" in err and last_line(err).strip() == ""


def test_no_bar_when_progress_is_off(capsys):
    for _ in bookkeeping.progress_bar(range(3), "epoch  1 train", False):
        pass
    assert capsys.readouterr() == ("", "")

# ---------------------------------------------------------------------------------------------
# The notebook's run: new, interrupted, resumed, finished; another recipe's is refused. The
# training cell runs as the notebook holds it.
# ---------------------------------------------------------------------------------------------
TRAINING_CELL = cell("for epoch in")


def training_cell(recipe: dict, path: Path, data_dir: Path, retrain: bool = False,
                  edit: tuple[str, str] | None = None) -> SimpleNamespace:
    """Run the notebook's training cell (with `edit`: one string of it replaced, as a learner
    would edit it); return its names: model, optimizer, scheduler, history..."""
    ensure_mnist(data_dir, verbose=False)  # the Data cell, run before it, fetched MNIST
    source = TRAINING_CELL if edit is None else TRAINING_CELL.replace(*edit)
    assert edit is None or source != TRAINING_CELL, "the edit changes nothing"
    names = {**the_notebooks_names(), "recipe": recipe, "device": CPU,
             "DATA": str(data_dir), "CHECKPOINT": path, "RETRAIN": retrain}
    exec(source, names)
    return SimpleNamespace(**names)


def opened(recipe: dict, path: Path, data_dir: Path, retrain: bool = False) -> cli.Run:
    """The run as the training cell holds it when its loop starts."""
    run = cli.build_run(recipe, CPU, data_dir)
    run.history = utils.load_checkpoint(path, run.model, run.optimizer, run.scheduler,
                                        run.train_loader, run.recipe, retrain)
    return run


def stop_in_epoch(monkeypatch, epoch: int) -> None:
    """Interrupt the run in the first batch of `epoch`, as the stop button would: mid-epoch,
    after the previous epoch was saved."""
    save = utils.save_checkpoint

    def save_then_arm(*args, **kwargs) -> None:
        save(*args, **kwargs)
        given = inspect.signature(save).bind(*args, **kwargs).arguments
        optimizer = given["optimizer"]
        if len(given["history"]) == epoch - 1:
            def interrupt(*args: object, **kwargs: object) -> None:
                raise KeyboardInterrupt
            optimizer.step = interrupt

    monkeypatch.setattr(utils, "save_checkpoint", save_then_arm)


def shown(text: str) -> str:
    """The text as a terminal or Jupyter shows it: each line from its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def epochs_logged(text: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch +(\d+): train loss", shown(text), re.M)]


def test_the_notebook_has_one_training_cell_with_its_loop_in_view():
    assert TRAINING_CELL.count("for epoch in") == 1
    assert "train(model, device, train_loader, optimizer, epoch)" in TRAINING_CELL
    assert "test(model, device, test_loader" in TRAINING_CELL


def test_the_notebook_imports_at_most_ten_names_each_used():
    imported = [n for n in the_notebooks_names() if n not in ("torch", "time")]
    assert len(imported) <= 10
    rest = "\n".join(CELLS).split("from utils import", 1)[1].split(")", 1)[1]
    assert all(re.search(rf"\b{name}\(", rest) for name in imported), imported


def test_the_training_cell_and_the_colab_cell_are_short():
    assert len(TRAINING_CELL.splitlines()) <= 20
    assert len(COLAB_CELL.splitlines()) <= 12


def test_an_interrupted_run_resumes_from_its_last_saved_epoch(tmp_path, mnist_dir, capsys,
                                                              monkeypatch):
    path = tmp_path / "notebook.pt"
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            training_cell(RECIPE, path, mnist_dir)
    out = shown(capsys.readouterr().out)
    assert out.splitlines()[0] == f"a new run: 3 epochs, each saved in {path}"
    assert epochs_logged(out) == [1]
    assert out.splitlines()[-1] == (f"interrupted: epoch 1 of 3 is saved in {path}; "
                                    f"run this cell again to go on from there")

    resumed = training_cell(RECIPE, path, mnist_dir)
    out = capsys.readouterr().out
    assert shown(out).splitlines()[0] == f"resuming {path} after epoch 1 of 3"
    assert epochs_logged(out) == [2, 3]  # epoch 1 is not trained again
    assert cols(resumed.history)["epoch"] == [1, 2, 3]
    assert checkpoints.read_checkpoint(path)["history"]["epoch"] == [1, 2, 3]

    unbroken = cli.build_run(RECIPE, CPU, mnist_dir)
    cli.fit(unbroken, progress=False, log=False)
    assert without_seconds(cols(resumed.history)) == without_seconds(cols(unbroken.history))


def test_the_bars_go_to_stdout_and_clear_themselves(tmp_path, mnist_dir, capsys):
    training_cell({**RECIPE, "epochs": 1}, tmp_path / "a.pt", mnist_dir)
    captured = capsys.readouterr()
    assert captured.err == ""  # nothing Jupyter would show as a pink block
    assert "epoch  1 train" in captured.out  # the bar was there while it ran
    from nbconvert.preprocessors.coalescestreams import CR_PAT

    # As the README's nbconvert command saves it: the bar's carriage returns applied.
    assert epochs_logged(CR_PAT.sub("", captured.out)) == [1]
    assert "train:" not in CR_PAT.sub("", captured.out)


def finished_run(path: Path, mnist_dir: Path, epochs: int = 1) -> SimpleNamespace:
    return training_cell({**RECIPE, "epochs": epochs}, path, mnist_dir)


def test_a_finished_run_is_loaded_not_trained_again(tmp_path, mnist_dir, capsys):
    path = tmp_path / "notebook.pt"
    trained = finished_run(path, mnist_dir)
    capsys.readouterr()
    loaded = training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    out = capsys.readouterr().out
    assert out.startswith(f"loaded the finished run in {path} (1 epoch)")
    assert epochs_logged(out) == []
    assert loaded.history == trained.history
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_retrain_trains_a_finished_run_again_from_scratch(tmp_path, mnist_dir, capsys):
    path = tmp_path / "notebook.pt"
    finished_run(path, mnist_dir)
    capsys.readouterr()
    run = opened({**RECIPE, "epochs": 1}, path, mnist_dir, retrain=True)
    assert "a new run (RETRAIN = True)" in capsys.readouterr().out
    assert cols(run.history)["epoch"] == []


def test_retrain_still_resumes_an_unfinished_run_of_the_recipe(tmp_path, mnist_dir, capsys,
                                                               monkeypatch):
    """A run started with RETRAIN = True and interrupted goes on when its cell runs again."""
    path = tmp_path / "notebook.pt"
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            training_cell(RECIPE, path, mnist_dir, retrain=True)
    capsys.readouterr()
    again = opened(RECIPE, path, mnist_dir, retrain=True)
    assert capsys.readouterr().out == f"resuming {path} after epoch 1 of 3\n"
    assert cols(again.history)["epoch"] == [1]


def test_another_recipes_run_is_refused_saying_what_differs_and_what_to_do(tmp_path, mnist_dir):
    path = tmp_path / "notebook.pt"
    finished_run(path, mnist_dir)
    with pytest.raises(ValueError) as refused:
        training_cell({**RECIPE, "epochs": 1, "lr": 0.02}, path, mnist_dir)
    message = str(refused.value)
    assert "another recipe" in message and "not resumed" in message
    assert "lr 0.01 (the notebook's: 0.02)" in message
    assert "RETRAIN = True" in message and "CHECKPOINT" in message
    assert checkpoints.read_checkpoint(path)["recipe"]["lr"] == 0.01  # left as it was


def test_more_epochs_than_saved_is_another_recipe_too(tmp_path, mnist_dir):
    path = tmp_path / "notebook.pt"
    finished_run(path, mnist_dir)
    with pytest.raises(ValueError, match=r"epochs 1 \(the notebook's: 3\)"):
        training_cell(RECIPE, path, mnist_dir)


def test_retrain_replaces_another_recipes_run(tmp_path, mnist_dir, capsys):
    path = tmp_path / "notebook.pt"
    finished_run(path, mnist_dir)
    capsys.readouterr()
    run = opened(RECIPE, path, mnist_dir, retrain=True)
    assert "in place of another recipe's run" in capsys.readouterr().out
    assert cols(run.history)["epoch"] == []


def test_a_file_that_is_not_a_checkpoint_is_refused_with_what_to_do(tmp_path, mnist_dir,
                                                                    capsys):
    path = tmp_path / "notebook.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="RETRAIN = True"):
        training_cell(RECIPE, path, mnist_dir)
    run = opened(RECIPE, path, mnist_dir, retrain=True)
    assert "in place of a file that is not a checkpoint" in capsys.readouterr().out
    assert cols(run.history)["epoch"] == []


def test_interrupted_before_the_first_save_says_the_run_starts_over(tmp_path, mnist_dir,
                                                                    capsys, monkeypatch):
    path = tmp_path / "notebook.pt"

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.SGD, "step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        training_cell(RECIPE, path, mnist_dir)
    assert shown(capsys.readouterr().out).splitlines()[-1] == (
        "interrupted before the first epoch was saved: running this cell again starts the run "
        "over")
    assert not path.exists()


def test_the_cell_run_again_after_an_interrupt_before_any_save_starts_afresh(
        tmp_path, mnist_dir, capsys, monkeypatch):
    """Cells run twice: the steps taken before the interrupt are not carried into the rerun."""
    path = tmp_path / "notebook.pt"
    step, steps = torch.optim.SGD.step, []

    def second_step_interrupts(optimizer, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:  # one step taken: the model is no longer the seed's
            raise KeyboardInterrupt
        return step(optimizer, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", second_step_interrupts)
        with pytest.raises(KeyboardInterrupt):
            training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    again = training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    straight = cli.build_run({**RECIPE, "epochs": 1}, CPU, mnist_dir)
    cli.fit(straight, progress=False, log=False)
    assert without_seconds(cols(again.history)) == without_seconds(cols(straight.history))


def test_a_compile_recipe_is_refused_rather_than_trained_eagerly(tmp_path, mnist_dir):
    with pytest.raises(ValueError, match=r"compiling is train.py's switch \(its --compile"):
        training_cell({**RECIPE, "compile": True}, tmp_path / "c.pt", mnist_dir)


def test_leftovers_of_a_killed_save_are_removed(tmp_path, mnist_dir, capsys):
    path = tmp_path / "notebook.pt"
    leftover = tmp_path / ".notebook.pt.abc123.partial"
    leftover.write_bytes(b"half a checkpoint")
    opened(RECIPE, path, mnist_dir)
    assert not leftover.exists()
    assert f"removed {leftover}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Colab's first cell: with the placeholder address, or a clone that fails, one line and no
# traceback.
# ---------------------------------------------------------------------------------------------
COLAB_CELL = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                  if c.cell_type == "code" and "REPO = " in c.source)
PLACEHOLDER = re.search(r'^REPO = "([^"]+)"', COLAB_CELL, re.M).group(1)


def run_colab_cell(tmp_path: Path, repo: str, git: str, times: int = 1
                   ) -> subprocess.CompletedProcess:
    """Run the cell `times` times in one process, where the repository's files are not (a fresh
    folder, as Colab's /content), with REPO set to `repo` and `git` (a shell script) standing in
    for git; between two runs it prints the folder it is in."""
    bin_dir, work = tmp_path / "bin", tmp_path / "content"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "git").write_text(f"#!/bin/sh\n{git}")
    (bin_dir / "git").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    source = COLAB_CELL.replace(f'REPO = "{PLACEHOLDER}"', f'REPO = "{repo}"')
    code = "\nimport os\nprint('cwd', os.getcwd())\n".join([f"exec({source!r})"] * times)
    return subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def colab_cell(tmp_path: Path, repo: str) -> tuple[subprocess.CompletedProcess, bool]:
    """The cell with a `git` that fails as one offline would; the run and whether git ran."""
    called = tmp_path / "git-called"
    done = run_colab_cell(tmp_path, repo, f"touch {shlex.quote(str(called))}\n"
                          "echo \"fatal: unable to access 'https://github.com/': Could not "
                          "resolve host\" >&2\nexit 128\n")
    return done, called.exists()


def test_colab_cell_with_the_placeholder_says_what_to_set_in_one_line(tmp_path):
    done, git_ran = colab_cell(tmp_path, PLACEHOLDER)
    assert done.returncode == 0 and done.stderr == ""
    (line,) = done.stdout.splitlines()
    assert "set REPO above" in line and "upload" in line
    assert not git_ran


def test_colab_cell_whose_clone_fails_says_why_in_one_line(tmp_path):
    done, git_ran = colab_cell(tmp_path, "someone/s6-mnist")
    assert git_ran
    assert done.returncode == 0 and done.stderr == ""
    (line,) = done.stdout.splitlines()
    assert line.startswith("could not clone https://github.com/someone/s6-mnist: fatal:")


def test_a_compact_recipe_is_refused_by_the_cell_that_builds_net(tmp_path, mnist_dir):
    with pytest.raises(ValueError, match="train.py's --model compact trains it"):
        training_cell({**RECIPE, "model": "compact"}, tmp_path / "c.pt", mnist_dir)
    assert not (tmp_path / "c.pt").exists()  # refused before the first epoch
