"""utils.save_checkpoint and load_checkpoint, the pair the notebook, train.py, the benchmarks
and the tests all save and resume with: checkpoints written before the pair existed still
resume exactly, and objects that are not the recipe's are refused before the first epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import CPU, TINY, cols, without_seconds

import train as cli
import utils
from support.bookkeeping import history_rows

ROOT = Path(__file__).resolve().parent.parent
# Written by train.py at commit 079f665, before the pair (--epochs 1 --limit-train 512
# --limit-test 256 --batch-size 64 --threads 1).
OLD = ROOT / "tests" / "fixtures" / "checkpoint-079f665.pt"
OLD_RECIPE = {"epochs": 1, "limit_train": 512, "limit_test": 256, "batch_size": 64}


def pair_args(run: cli.Run) -> tuple:
    return run.model, run.optimizer, run.scheduler, run.train_loader, run.recipe


# ---------------------------------------------------------------------------------------------
# A checkpoint from before the pair.
# ---------------------------------------------------------------------------------------------
def test_a_checkpoint_from_before_the_pair_loads_every_part_exactly(mnist_dir, capsys):
    saved = torch.load(OLD, weights_only=True)
    run = cli.build_run(OLD_RECIPE, CPU, mnist_dir)
    history = utils.load_checkpoint(OLD, *pair_args(run))
    assert f"loaded the finished run in {OLD} (1 epoch)" in capsys.readouterr().out
    assert history == history_rows(saved["history"])
    for key, value in saved["model"].items():
        assert torch.equal(run.model.state_dict()[key], value), key
    for mine, theirs in zip(run.optimizer.state_dict()["state"].values(),
                            saved["optimizer"]["state"].values(), strict=True):
        assert torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])
    assert run.scheduler.state_dict()["last_epoch"] == saved["scheduler"]["last_epoch"] == 1
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert torch.equal(run.train_loader.generator.get_state(), saved["rng"]["loader"])


def test_a_checkpoint_from_before_the_pair_resumes_as_one_the_pair_wrote(tmp_path, mnist_dir):
    """Resumed to epoch 2 from the old file, and from the same state saved again by the pair:
    the same epoch, draw for draw."""
    runs = []
    for source in (OLD, tmp_path / "again.pt"):
        run = cli.build_run({**OLD_RECIPE, "epochs": 2}, CPU, mnist_dir)
        cli.resume_run(run, str(source))
        if source == OLD:
            cli.save_run(run, str(tmp_path / "again.pt"))
        cli.fit(run, progress=False, log=False)
        runs.append(run)
    assert without_seconds(cols(runs[0].history)) == without_seconds(cols(runs[1].history))
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(runs[1].model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------
# Objects that are not the recipe's: refused before any epoch, in one line that says what to
# change, and nothing written.
# ---------------------------------------------------------------------------------------------
def edited(run: cli.Run, what: str) -> tuple:
    """The run's objects with one edit the training cell's own tests do not make
    (test_notebook_careless' EDITS)."""
    model, optimizer, scheduler, loader, recipe = pair_args(run)
    if what == "gamma":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 15, 0.5)
    elif what == "schedule":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 20)
    elif what == "lr":  # the training cell's SGD edited to another rate
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 15, 0.1)
    elif what == "lr set by hand":
        optimizer.param_groups[0]["lr"] = 0.1
    elif what == "stale scheduler":  # the optimizer rebuilt, the scheduler not
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9)
    return model, optimizer, scheduler, loader, recipe


CASES = {
    "gamma": "the StepLR's gamma is 0.5, the recipe's 0.1",
    "schedule": "the scheduler is CosineAnnealingLR, not the recipe's StepLR",
    "stale scheduler": "the scheduler drives another optimizer",
    "lr": "the optimizer's initial_lr is 0.05, the recipe's 0.01",
    "lr set by hand": "the optimizer's lr is 0.1, but the schedule sets 0.01",
}


@pytest.mark.parametrize("what", list(CASES))
def test_objects_that_are_not_the_recipes_are_refused_before_anything_is_written(
        tmp_path, mnist_dir, what):
    run = cli.build_run({**TINY, "epochs": 1}, CPU, mnist_dir)
    path = tmp_path / "notebook.pt"
    with pytest.raises(ValueError) as refused:
        utils.load_checkpoint(path, *edited(run, what))
    assert CASES[what] in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=CASES[what].split(" is ")[0]):
        utils.save_checkpoint(path, *edited(run, what), [])
    assert not path.exists()


def test_a_compiled_model_with_a_recipe_that_says_eager_is_refused(tmp_path, mnist_dir):
    run = cli.build_run({**TINY, "epochs": 1}, CPU, mnist_dir)
    compiled = torch.compile(run.model)  # wraps it; nothing compiles until it runs
    with pytest.raises(ValueError, match=r"recipe\['compile'\] is False: set it to True"):
        utils.load_checkpoint(tmp_path / "c.pt", compiled, *pair_args(run)[1:])


def test_a_history_row_without_a_column_is_refused_before_saving(tmp_path, mnist_dir):
    run = cli.build_run({**TINY, "epochs": 1}, CPU, mnist_dir)
    row = dict(epoch=1, train_loss=0.5, train_acc=90.0, test_loss=0.4, test_acc=91.0, lr=0.01)
    with pytest.raises(ValueError, match="needs exactly the keys .* seconds"):
        utils.save_checkpoint(tmp_path / "h.pt", *pair_args(run), [row])
    with pytest.raises(ValueError, match="says epoch 2: append one row per epoch"):
        utils.save_checkpoint(tmp_path / "h.pt", *pair_args(run), [{**row, "seconds": 1.0,
                                                                    "epoch": 2}])
    assert not (tmp_path / "h.pt").exists()


def test_saving_does_not_change_the_runs_draws(tmp_path, mnist_dir):
    """The checks build fresh objects to compare with: never from torch's generator."""
    before = torch.get_rng_state()
    run = cli.build_run({**TINY, "epochs": 1}, CPU, mnist_dir)
    before = torch.get_rng_state()
    utils.load_checkpoint(tmp_path / "n.pt", *pair_args(run))
    assert torch.equal(torch.get_rng_state(), before)
