"""Checkpoints: atomic saves, refusals on load, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import runs
import torch
from runs import cols

import model
import train as cli
import utils
from support import bookkeeping, checkpoints, recipe

CPU = torch.device("cpu")
# A few batches of real MNIST: never a full epoch.
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}


def tiny_recipe(loader: str, epochs: int) -> dict:
    return {**utils.RECIPE, **TINY, "loader": loader, "epochs": epochs}


def valid_state() -> dict:
    torch.manual_seed(0)
    net = model.Net()
    opt, sched = recipe.make_optimizer(net, utils.RECIPE)
    return {"model": net.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "history": bookkeeping.new_history(),
            "recipe": dict(utils.RECIPE),
            "rng": {"torch": torch.get_rng_state(), "loader": torch.Generator().get_state()}}


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# save_checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_save_and_load_round_trip(tmp_path):
    state = valid_state()
    path = tmp_path / "sub" / "last.pt"  # the folder is created
    checkpoints.write_checkpoint(state, path)
    loaded = checkpoints.read_checkpoint(path)
    assert set(loaded) == set(state)
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "last.pt"
    state = valid_state()
    checkpoints.write_checkpoint(state, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise exc

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    new_state = {**state, "history": {**bookkeeping.new_history(), "epoch": [1]}}
    with pytest.raises(type(exc)):
        checkpoints.write_checkpoint(new_state, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded = checkpoints.read_checkpoint(path)
    assert loaded["history"]["epoch"] == []
    assert leftovers(tmp_path) == []
    assert os.listdir(tmp_path) == ["last.pt"]


# ---------------------------------------------------------------------------------------------
# load_checkpoint refusals: each a CheckpointError naming the file, nothing of it run
# ---------------------------------------------------------------------------------------------
def assert_refused(path: Path) -> checkpoints.CheckpointError:
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.read_checkpoint(path)
    assert str(path) in str(err.value)
    return err.value


@pytest.mark.quick
def test_refuses_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    assert_refused(path)


def test_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_refused(path)


def test_refuses_a_missing_file(tmp_path):
    err = assert_refused(tmp_path / "nope.pt")
    assert "no such file" in str(err)


@pytest.mark.quick
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["system", "eval"])
@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_refuses_a_pickle_that_runs_code(tmp_path, evil, writer, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {**valid_state(), "history": evil(kind, marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    assert_refused(path)
    assert not marker.exists()
    # The payload is live: an unguarded load would have run it.
    if writer == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.quick
def test_refuses_a_model_of_another_shape(tmp_path):
    state = valid_state()
    state["model"] = model.Net(channels=(8, 16, 12, 24, 32, 16, 16, 10)).state_dict()
    path = tmp_path / "other.pt"
    torch.save(state, path)
    assert_refused(path)


def test_refusal_of_another_shape_says_what_does_not_fit(tmp_path):
    state = valid_state()
    state["model"] = model.Net(channels=(8, 16, 12, 24, 32, 16, 16, 10)).state_dict()
    path = tmp_path / "other.pt"
    torch.save(state, path)
    err = assert_refused(path)
    assert "size mismatch" in str(err)
    assert "features.conv5" in str(err)


def test_refuses_a_model_with_missing_weights(tmp_path):
    state = valid_state()
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("features.conv6")}
    path = tmp_path / "partial-model.pt"
    torch.save(state, path)
    assert_refused(path)


@pytest.mark.parametrize("missing", checkpoints.FORMAT)
def test_refuses_a_dict_missing_a_key(tmp_path, missing):
    state = valid_state()
    del state[missing]
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    err = assert_refused(path)
    assert missing in str(err)


@pytest.mark.parametrize("payload", [["model"], torch.zeros(3), "a string"],
                         ids=["list", "tensor", "str"])
def test_refuses_something_else(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    assert_refused(path)


def test_refuses_a_bare_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(model.Net().state_dict(), path)
    assert_refused(path)


# ---------------------------------------------------------------------------------------------
# Resume: 1 epoch + save + load + 1 epoch == 2 epochs straight, bit for bit.
# ---------------------------------------------------------------------------------------------
def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


@pytest.mark.quick
@pytest.mark.parametrize("loader", ["fast", "torchvision"])
def test_resumed_run_equals_an_unbroken_run(tmp_path, mnist_dir, loader):
    straight = cli.build_run(tiny_recipe(loader, 2), CPU, mnist_dir)
    cli.fit(straight, progress=False, log=False)
    assert cols(straight.history)["epoch"] == [1, 2]

    first = cli.build_run(tiny_recipe(loader, 1), CPU, mnist_dir)
    cli.fit(first, progress=False, log=False)
    path = tmp_path / "epoch1.pt"
    cli.save_run(first, path)
    del first

    # Something else uses the global RNG in between: the checkpoint must carry its own state.
    torch.manual_seed(12345)
    torch.rand(1000)

    resumed = cli.build_run(tiny_recipe(loader, 1), CPU, mnist_dir)
    runs.restore_run(resumed, checkpoints.read_checkpoint(path))
    resumed.recipe["epochs"] = 2
    cli.fit(resumed, progress=False, log=False)

    assert without_seconds(cols(resumed.history)) == without_seconds(cols(straight.history))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The optimiser's momentum buffers too.
    for sa, sb in zip(straight.optimizer.state_dict()["state"].values(),
                      resumed.optimizer.state_dict()["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()


@pytest.mark.quick
def test_checkpoint_carries_the_run(tmp_path, mnist_dir):
    recipe = {**tiny_recipe("fast", 1), "limit_train": 64}
    run = cli.build_run(recipe, CPU, mnist_dir)
    cli.fit(run, progress=False, log=False)
    path = tmp_path / "run.pt"
    cli.save_run(run, path)
    loaded = checkpoints.read_checkpoint(path)
    assert loaded["recipe"] == run.recipe
    assert loaded["history"]["epoch"] == [1]
    # The saved weights score exactly what the run scored.
    net = model.Net()
    net.load_state_dict(loaded["model"])
    loss, acc = utils.test(net, CPU, run.test_loader, progress=False)
    assert loss == pytest.approx(cols(run.history)["test_loss"][-1], rel=1e-5)
    assert acc == cols(run.history)["test_acc"][-1]


def test_run_fit_can_be_silent(mnist_dir, capsys):
    recipe = {**tiny_recipe("fast", 1), "limit_train": 64, "limit_test": 64}
    run = cli.build_run(recipe, CPU, mnist_dir)
    cli.fit(run, progress=False, log=False)
    assert cols(run.history)["epoch"] == [1]
    captured = capsys.readouterr()
    assert "epoch" not in captured.out + captured.err


# ---------------------------------------------------------------------------------------------
# Each part is checked against fresh objects of the saved recipe, not against lists of keys.
# ---------------------------------------------------------------------------------------------
def saved(tmp_path: Path, state: dict, name: str = "edited.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_a_scheduler_key_this_torch_does_not_write_is_left_out_and_the_run_resumes(
        tmp_path, mnist_dir):
    """Another torch release may write one key more into StepLR's state: not applied."""
    first = cli.build_run(tiny_recipe("fast", 1), CPU, mnist_dir)
    cli.fit(first, progress=False, log=False)
    state = runs.run_state(first)
    state["scheduler"]["_a_key_of_a_later_release"] = True
    loaded = checkpoints.read_checkpoint(saved(tmp_path, state))
    assert "_a_key_of_a_later_release" not in loaded["scheduler"]
    resumed = cli.build_run(tiny_recipe("fast", 2), CPU, mnist_dir)
    runs.restore_run(resumed, loaded)
    assert not hasattr(resumed.scheduler, "_a_key_of_a_later_release")
    cli.fit(resumed, progress=False, log=False)
    assert cols(resumed.history)["epoch"] == [1, 2]
    assert resumed.scheduler.last_epoch == 2


def test_a_scheduler_without_torchs_bookkeeping_keys_takes_a_fresh_steplrs(tmp_path):
    """An older release may not write a private key the running one does."""
    state = valid_state()
    private = [k for k in state["scheduler"] if k.startswith("_")]
    assert private
    for key in private:
        del state["scheduler"][key]
    loaded = checkpoints.read_checkpoint(saved(tmp_path, state))
    assert set(private) <= set(loaded["scheduler"])


def one_epoch(**values: float) -> dict:
    """A one-epoch history of plausible numbers, with `values` in place of some."""
    row = {"epoch": 1, "train_loss": 0.3, "train_acc": 90.0, "test_loss": 0.1, "test_acc": 97.0,
           "lr": 0.01, "seconds": 5.0, **values}
    return bookkeeping.history_columns([row])


def _loader_of_wrong_size(state: dict) -> None:
    state["rng"]["loader"] = torch.zeros(100, dtype=torch.uint8)


def negative_running_variance(state: dict) -> None:
    """Also test_robustness's edit of a file on disk."""
    state["model"]["features.conv3.1.running_var"].fill_(-1.0)


HAND_EDITED = {
    "cpu-generator-of-wrong-size": (
        lambda s: s["rng"].update(torch=torch.zeros(100, dtype=torch.uint8)), "rng torch"),
    "cpu-loader-generator-of-wrong-size": (_loader_of_wrong_size, "rng loader"),
    "weight-decay-a-string": (
        lambda s: s["optimizer"]["param_groups"][0].update(weight_decay="0"), "weight_decay"),
    "maximize": (lambda s: s["optimizer"]["param_groups"][0].update(maximize=True), "maximize"),
    "momentum-not-the-recipes": (
        lambda s: s["optimizer"]["param_groups"][0].update(momentum=0.5), "momentum"),
    "lr-a-string": (lambda s: s["optimizer"]["param_groups"][0].update(lr="0.01"), "lr"),
    "scheduler-step-size-not-the-recipes": (
        lambda s: s["scheduler"].update(step_size=3), "step_size"),
    "scheduler-gamma-a-string": (lambda s: s["scheduler"].update(gamma="0.1"), "gamma"),
    "scheduler-last-epoch-a-float": (
        lambda s: s["scheduler"].update(last_epoch=0.0), "last_epoch"),
    "negative-running-variance": (negative_running_variance, "negative running"),
    **{f"weights-stored-as-{kind}": (
        lambda s, kind=kind: s["model"].update(
            {"features.conv1.0.weight": s["model"]["features.conv1.0.weight"].to(kind)}),
        "features.conv1.0.weight") for kind in (torch.float16, torch.int64, torch.bool,
                                                torch.complex64)},
    "test-accuracy-999": (lambda s: s.update(history=one_epoch(test_acc=999.0)), "test_acc"),
    "negative-train-loss": (lambda s: s.update(history=one_epoch(train_loss=-1.0)),
                            "train_loss"),
}


@pytest.mark.quick
@pytest.mark.parametrize("edit", list(HAND_EDITED))
def test_a_hand_edited_checkpoint_is_refused_naming_what_does_not_fit(tmp_path, edit):
    state = valid_state()
    change, named = HAND_EDITED[edit]
    change(state)
    err = assert_refused(saved(tmp_path, state))
    assert named in str(err)


def test_an_optimizer_key_this_torch_does_not_write_is_left_out(tmp_path):
    state = valid_state()
    state["optimizer"]["param_groups"][0]["a_later_option"] = 3
    group = checkpoints.read_checkpoint(saved(tmp_path, state))["optimizer"]["param_groups"][0]
    assert "a_later_option" not in group
    assert group["momentum"] == utils.RECIPE["momentum"]


def test_a_learning_rate_that_is_not_the_schedules_is_refused(tmp_path):
    """The rate is the one the schedule sets; train.py's --lr on resume is in the history
    (test_robustness' test_resume_honours_lr_and_accepts_unchanged_flags)."""
    state = valid_state()
    state["optimizer"]["param_groups"][0]["lr"] = 0.0005
    err = assert_refused(saved(tmp_path, state))
    assert "the optimizer's lr is 0.0005, but the schedule sets 0.01" in str(err)
