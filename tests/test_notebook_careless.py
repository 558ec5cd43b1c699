"""The notebook as a careless user runs it: its training cell edited,
run twice or after a stale cell, its checkpoint named wrongly, a full disk, the Colab cell run
again. Each case either works or is refused before the first epoch in one line that says what
to change, and nothing saved is lost. docs/careless.md lists them."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import RECIPE, plots_cell, run_colab_cell, training_cell

from support import checkpoints, outputs

# Edits a learner makes to the training cell, and the line each is refused with.
EDITS = {
    "momentum 0.95": (("momentum=recipe[\"momentum\"]", "momentum=0.95"),
                      "the optimizer's momentum is 0.95, the recipe's 0.9: build SGD with "
                      "momentum=recipe['momentum']"),
    "Nesterov momentum": (("momentum=recipe[\"momentum\"])", "momentum=recipe[\"momentum\"], "
                                                             "nesterov=True)"),
                          "the optimizer's nesterov is True, the recipe's False"),
    "Adam for SGD": (("torch.optim.SGD(model.parameters(), lr=recipe[\"lr\"], "
                      "momentum=recipe[\"momentum\"])", "torch.optim.Adam(model.parameters())"),
                     "the optimizer is Adam, not the recipe's SGD"),
    "StepLR every 10 epochs": (("step_size=recipe[\"step_size\"]", "step_size=10"),
                               "the StepLR's step_size is 10, the recipe's 15"),
    "the GAP head": (("prepare_model(Net(),", "prepare_model(Net(head=\"gap\"),"),
                     "the model's layers are not the recipe's"),
    "dropout 0.2": (("prepare_model(Net(),", "prepare_model(Net(dropout=0.2),"),
                    "the model's dropout is [0.2, 0.2], the recipe's [0.1, 0.1]"),
    "the model cell run again after the optimizer's": (
        ("train_loader, test_loader =", "model = prepare_model(Net(), recipe, device)\n"
                                        "train_loader, test_loader ="),
        "the optimizer updates another model's parameters (was the model built again after "
        "the optimizer?)"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_training_cell_is_refused_before_its_first_epoch(tmp_path, mnist_dir, case):
    edit, words = EDITS[case]
    path = tmp_path / "notebook.pt"
    with pytest.raises(ValueError) as refused:
        training_cell(RECIPE, path, mnist_dir, edit=edit)
    assert words in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not path.exists() and os.listdir(tmp_path) == []  # no epoch, no file, no lock


def test_an_edit_refused_after_a_saved_run_leaves_the_run_as_it_was(tmp_path, mnist_dir):
    path = tmp_path / "notebook.pt"
    training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="momentum is 0.95"):
        training_cell({**RECIPE, "epochs": 1}, path, mnist_dir, edit=EDITS["momentum 0.95"][0])
    assert path.read_bytes() == before


@pytest.mark.parametrize("where", ["before train", "after scheduler.step"])
def test_an_lr_set_inside_the_epoch_loop_is_refused_at_the_first_save(tmp_path, mnist_dir,
                                                                      where):
    """The schedule sets the rate: one set by hand in the loop would be saved under a recipe
    that did not train (StepLR carries the rate it is given on)."""
    line = ("    train_loss, train_acc = train(" if where == "before train" else
            "    history.append(")
    edit = (line, f'    optimizer.param_groups[0]["lr"] = 0.1\n{line}')
    path = tmp_path / "notebook.pt"
    with pytest.raises(ValueError, match="the optimizer's lr is 0.1, but the schedule sets "
                                         "0.01 after epoch 1 at lr 0.01: leave the learning "
                                         "rate to the schedule"):
        training_cell({**RECIPE, "epochs": 2}, path, mnist_dir, edit=edit)
    assert not path.exists()


def test_checkpoint_naming_a_folder_says_to_name_a_file_in_it(tmp_path, mnist_dir):
    with pytest.raises(ValueError) as refused:
        training_cell(RECIPE, tmp_path, mnist_dir)
    assert str(refused.value) == (f"CHECKPOINT {tmp_path} is a folder: name a file in it, "
                                  f"such as {tmp_path / 'notebook.pt'}")
    assert os.listdir(tmp_path) == []


def test_checkpoint_under_a_file_says_so(tmp_path, mnist_dir):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is under .*notes.txt, which is a file, not a folder"):
        training_cell(RECIPE, tmp_path / "notes.txt" / "run.pt", mnist_dir)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_checkpoint_at_home_written_as_tilde_goes_home(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    training_cell({**RECIPE, "epochs": 1}, "~/s6/notebook.pt", mnist_dir)
    assert (tmp_path / "home" / "s6" / "notebook.pt").is_file()
    assert not (tmp_path / "~").exists()


def test_a_full_disk_at_a_save_keeps_the_saved_epoch_and_the_rerun_goes_on(tmp_path, mnist_dir,
                                                                           monkeypatch, capsys):
    path = tmp_path / "notebook.pt"
    real_save, saves = torch.save, []

    def full_at_the_second(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints.torch, "save", full_at_the_second)
        with pytest.raises(OSError, match="No space left on device"):
            training_cell(RECIPE, path, mnist_dir)
    assert checkpoints.read_checkpoint(path)["history"]["epoch"] == [1]
    assert outputs.scratch_files(path) == []  # the cut save's temporary file is gone
    capsys.readouterr()
    resumed = training_cell(RECIPE, path, mnist_dir)
    assert capsys.readouterr().out.startswith(f"resuming {path} after epoch 1 of 3")
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]


def test_the_training_cell_run_twice_in_a_row_loads_the_run_it_just_trained(tmp_path,
                                                                           mnist_dir, capsys):
    path = tmp_path / "notebook.pt"
    first = training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    again = training_cell({**RECIPE, "epochs": 1}, path, mnist_dir)
    assert "loaded the finished run" in capsys.readouterr().out
    assert again.history == first.history


def test_the_plots_cell_saves_into_an_images_folder_that_is_not_there_yet(tmp_path):
    assert plots_cell(tmp_path, 3, 3, "new/images") == ""
    assert sorted(p.name for p in (tmp_path / "new" / "images").iterdir()) == [
        "accuracy.png", "loss.png", "samples.png"]


def test_the_colab_cell_run_again_after_its_clone_does_nothing_more(tmp_path):
    """The first run clones (a stand-in git makes the folder) and moves into it; a second run
    of the cell, in the same process as a kernel's, finds model.py and clones nothing."""
    calls = tmp_path / "git-calls"
    done = run_colab_cell(tmp_path, "someone/s6-mnist", f"echo x >> {shlex.quote(str(calls))}\n"
                          "mkdir -p s6-mnist && touch s6-mnist/model.py\n", times=2)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.splitlines() == [f"cwd {tmp_path / 'content' / 's6-mnist'}"]
    assert calls.read_text().count("x") == 1  # cloned once


def test_the_colab_cell_never_waits_for_a_password(tmp_path):
    """A private or misspelt repository: git is told not to prompt, so the cell cannot hang."""
    done = run_colab_cell(tmp_path, "someone/privat",
                          "echo \"prompt=$GIT_TERMINAL_PROMPT\" >&2\nexit 128\n")
    assert done.stdout.strip() == "could not clone https://github.com/someone/privat: prompt=0"


def test_a_second_kernel_on_the_notebooks_checkpoint_is_refused(tmp_path, mnist_dir):
    """Another process holds the checkpoint, as a kernel's training cell would."""
    path = tmp_path / "notebook.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from support import checkpoints; checkpoints.hold(sys.argv[2]); print('held', "
         "flush=True); time.sleep(120)", str(Path(__file__).parent.parent), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(checkpoints.CheckpointInUse,
                           match=rf"in use by process {holder.pid}.*point CHECKPOINT at another"):
            training_cell(RECIPE, path, mnist_dir)
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()


class StoppedLoader:
    """A loader whose second batch never comes: the stop button pressed during its pass."""

    def __init__(self, batches: int = 3) -> None:
        self.batches = batches
        self.dataset = range(batches * 4)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        yield torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
        raise KeyboardInterrupt


@pytest.mark.parametrize("which", ["train", "test"])
def test_the_stop_button_in_either_pass_says_which_epoch_is_saved(tmp_path, capsys,
                                                                  monkeypatch, which):
    import utils
    from model import Net

    monkeypatch.setattr(checkpoints, "_WATCHED", {})
    checkpoints.watch(tmp_path / "run.pt", 1, 20)
    net, cpu = Net(), torch.device("cpu")
    with pytest.raises(KeyboardInterrupt):
        if which == "train":
            utils.train(net, cpu, StoppedLoader(), torch.optim.SGD(net.parameters(), lr=0.01),
                        epoch=2, progress=False)
        else:
            utils.test(net, cpu, StoppedLoader(), epoch=2, progress=False)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"interrupted: epoch 1 of 20 is saved in {tmp_path / 'run.pt'}; run this cell again "
        f"to go on from there")
