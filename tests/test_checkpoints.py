"""Checkpoints: atomic saves, refusals on load, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import runs
import torch
from runs import CPU, TINY, cols, saved, without_seconds

import model
import train as cli
import utils
from support import bookkeeping, checkpoints, recipe


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
    err = str(assert_refused(path))
    names_globals = hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")  # 2.5+
    if writer == "torch" and names_globals:  # torch names what it refused; its advice to
        # disable that is not kept
        assert "not plain tensors" in err and "nothing in it ran" in err
        assert ("posix.system" if kind == "system" else "builtins.eval") in err
    elif writer == "torch":  # torch 2.4 cannot name them: the file is called not torch.save's
        assert "not a file written by torch.save (UnpicklingError)" in err
    assert "weights_only" not in err
    assert not marker.exists()
    # The payload is live: an unguarded load would have run it.
    if writer == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_refusal_of_another_shape_says_what_does_not_fit(tmp_path):
    state = valid_state()
    state["model"] = model.Net(channels=(8, 16, 12, 24, 32, 16, 16, 10)).state_dict()
    path = tmp_path / "other.pt"
    torch.save(state, path)
    err = assert_refused(path)
    assert "size mismatch" in str(err)
    assert "features.conv5" in str(err)


def _without(key: str) -> dict:
    state = valid_state()
    del state[key]
    return state


NOT_CHECKPOINTS = {"list": lambda: ["model"], "tensor": lambda: torch.zeros(3),
                   "str": lambda: "a string", "bare-state-dict": lambda: model.Net().state_dict(),
                   **{f"without-{key}": lambda key=key: _without(key)
                      for key in checkpoints.FORMAT}}


@pytest.mark.parametrize("payload", list(NOT_CHECKPOINTS))
def test_refuses_what_is_not_a_checkpoints_dict(tmp_path, payload):
    err = assert_refused(saved(tmp_path, NOT_CHECKPOINTS[payload]()))
    assert "expected a dict with keys model, optimizer" in str(err)


# ---------------------------------------------------------------------------------------------
# Resume: 1 epoch + save + load + 1 epoch == 2 epochs straight, bit for bit.
# ---------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def trained(mnist_dir) -> dict:
    """A real checkpoint dict after one epoch of the tiny recipe (momentum buffers and all)."""
    run = cli.build_run(tiny_recipe("fast", 1), CPU, mnist_dir)
    cli.fit(run, progress=False, log=False)
    return runs.run_state(run)


def one_epoch(**values: float) -> dict:
    """A one-epoch history of plausible numbers, with `values` in place of some."""
    row = {"epoch": 1, "train_loss": 0.3, "train_acc": 90.0, "test_loss": 0.1, "test_acc": 97.0,
           "lr": 0.01, "seconds": 5.0, **values}
    return bookkeeping.history_columns([row])


def _other_optimizer(state: dict) -> None:
    other = model.Net(channels=(8, 16, 12, 24, 32, 16, 16, 10))
    opt = torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9)
    other(torch.zeros(2, 1, 28, 28)).sum().backward()
    opt.step()
    state["optimizer"] = opt.state_dict()


def _buffer(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


def _group(state: dict) -> dict:
    return state["optimizer"]["param_groups"][0]


def _nan_weight(state: dict) -> None:
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))


# A part of a real checkpoint edited by hand, and what the refusal names.
DAMAGED = {
    "cpu-generator-of-wrong-size": (
        lambda s: s["rng"].update(torch=torch.zeros(100, dtype=torch.uint8)), "rng torch"),
    "cpu-loader-generator-of-wrong-size": (
        lambda s: s["rng"].update(loader=torch.zeros(100, dtype=torch.uint8)), "rng loader"),
    "rng-float": (lambda s: s["rng"].update(torch=torch.zeros(5056)), "rng torch"),
    "rng-missing-loader": (lambda s: s["rng"].pop("loader"), "rng needs"),
    "weight-decay-a-string": (lambda s: _group(s).update(weight_decay="0"), "weight_decay"),
    "maximize": (lambda s: _group(s).update(maximize=True), "maximize"),
    "momentum-not-the-recipes": (lambda s: _group(s).update(momentum=0.5), "momentum"),
    "lr-a-string": (lambda s: _group(s).update(lr="0.01"), "lr"),
    "lr-not-the-schedules": (lambda s: _group(s).update(lr=0.0005),
                             "the optimizer's lr is 0.0005, but the schedule sets 0.01 after "
                             "epoch 1 at lr 0.01"),
    "optimizer-of-another-model": (_other_optimizer, "optimizer"),
    "optimizer-buffer-of-another-shape": (
        lambda s: _buffer(s).update(momentum_buffer=torch.zeros(3)), "does not fit"),
    "optimizer-inf-buffer": (
        lambda s: _buffer(s).update(momentum_buffer=torch.full_like(
            _buffer(s)["momentum_buffer"], float("inf"))), "NaN or infinite"),
    "scheduler-step-size-not-the-recipes": (lambda s: s["scheduler"].update(step_size=3),
                                            "step_size"),
    "scheduler-gamma-a-string": (lambda s: s["scheduler"].update(gamma="0.1"), "gamma"),
    "scheduler-last-epoch-a-float": (lambda s: s["scheduler"].update(last_epoch=1.0),
                                     "last_epoch"),
    "scheduler-behind-history": (lambda s: s["scheduler"].update(last_epoch=0),
                                 "scheduler at epoch 0, history at 1"),
    # A LambdaLR's state has no step_size or gamma.
    "scheduler-not-steplr": (lambda s: [s["scheduler"].pop(k) for k in ("step_size", "gamma")],
                             "not a StepLR"),
    "negative-running-variance": (runs.negative_running_variance, "negative running"),
    "nan-weight": (_nan_weight, "NaN"),
    "missing-weights": (lambda s: [s["model"].pop(k) for k in list(s["model"])
                                   if k.startswith("features.conv6")], "Missing key"),
    **{f"weights-stored-as-{kind}": (
        lambda s, kind=kind: s["model"].update(
            {"features.conv1.0.weight": s["model"]["features.conv1.0.weight"].to(kind)}),
        "features.conv1.0.weight") for kind in (torch.float16, torch.int64, torch.bool,
                                                torch.complex64)},
    "test-accuracy-999": (lambda s: s.update(history=one_epoch(test_acc=999.0)), "test_acc"),
    "negative-train-loss": (lambda s: s.update(history=one_epoch(train_loss=-1.0)),
                            "train_loss"),
    "history-of-strings": (lambda s: s["history"].update(test_acc=["99%"]), "test_acc"),
    "history-ragged": (lambda s: s["history"]["lr"].append(0.01), "line up"),
    "history-missing-a-column": (lambda s: s["history"].pop("seconds"), "seconds"),
    "history-nan": (lambda s: s["history"].update(test_loss=[float("nan")]), "NaN"),
    "recipe-wrong-type": (lambda s: s["recipe"].update(batch_size="64"), "batch_size"),
    "recipe-unknown-loader": (lambda s: s["recipe"].update(loader="gpu"), "loader"),
    "recipe-unknown-key": (lambda s: s["recipe"].update(warp=9), "warp"),
    "recipe-fewer-epochs-than-history": (lambda s: s["recipe"].update(epochs=0), "epochs"),
}


@pytest.mark.quick
@pytest.mark.parametrize("edit", list(DAMAGED))
def test_a_hand_edited_checkpoint_is_refused_naming_what_does_not_fit(tmp_path, trained, edit):
    state = copy.deepcopy(trained)
    change, named = DAMAGED[edit]
    change(state)
    err = assert_refused(saved(tmp_path, state))
    assert named in str(err)


# Parts a checkpoint of another release or device may hold: each read and loaded as it is.
def _other_devices(state: dict) -> None:
    state["rng"].update(loader=torch.zeros(16, dtype=torch.uint8),  # a CUDA generator's size
                        cuda=torch.zeros(16, dtype=torch.uint8), mps=torch.zeros(44,
                                                                                 dtype=torch.uint8))


PORTABLE = {
    "other-devices-rng": _other_devices,
    "an-older-recipe": lambda s: [s["recipe"].pop(k) for k in ("dropout_plan", "compile")],
    "an-optimizer-key-this-torch-does-not-write": lambda s: _group(s).update(a_later_option=3),
    "no-private-scheduler-keys": lambda s: [s["scheduler"].pop(k) for k in list(s["scheduler"])
                                            if k.startswith("_")],
}


@pytest.mark.parametrize("edit", list(PORTABLE))
def test_a_checkpoint_of_another_release_or_device_is_read(tmp_path, trained, edit):
    state = copy.deepcopy(trained)
    PORTABLE[edit](state)
    loaded = checkpoints.read_checkpoint(saved(tmp_path, state))
    assert loaded["recipe"]["dropout_plan"] == utils.RECIPE["dropout_plan"]
    assert "a_later_option" not in loaded["optimizer"]["param_groups"][0]
    assert set(trained["scheduler"]) == set(loaded["scheduler"])  # a fresh StepLR's keys
