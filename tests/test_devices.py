"""The CUDA and MPS paths, pinned on the CPU: what a GPU run would do differently, and a
checkpoint that moves between devices."""

from __future__ import annotations

import json
import sys
import types

import pytest
import runs
import torch
from runs import cols, settings_cell
from torch import nn

import train as cli
import utils
from model import Net
from support import checkpoints, devices

CPU = torch.device("cpu")
TINY = {"limit_train": 256, "limit_test": 200, "batch_size": 64, "test_batch_size": 200}


def tiny_run(mnist_dir, epochs: int = 1, loader: str = "fast") -> cli.Run:
    return cli.build_run({**TINY, "loader": loader, "epochs": epochs}, CPU, mnist_dir)


# ---------------------------------------------------------------------------------------------
# A checkpoint saved on one device resumes on another.
# ---------------------------------------------------------------------------------------------
# Generator states of other devices: CUDA's Philox state is 16 bytes, MPS's 44.
FOREIGN = {"cuda": 16, "mps": 44}


@pytest.mark.parametrize("saved_on", ["cuda", "mps"])
def test_checkpoint_from_another_device_resumes_with_a_warning(tmp_path, mnist_dir, capsys,
                                                               saved_on):
    run = tiny_run(mnist_dir)
    cli.fit(run, progress=False, log=False)
    state = runs.run_state(run)
    size = FOREIGN[saved_on]
    state["rng"]["loader"] = torch.arange(size, dtype=torch.uint8)  # the fast loader's, there
    state["rng"][saved_on] = torch.arange(size, dtype=torch.uint8)
    path = tmp_path / "gpu.pt"
    checkpoints.write_checkpoint(state, path)

    resumed = tiny_run(mnist_dir)
    runs.restore_run(resumed, checkpoints.read_checkpoint(path))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert f"saved on {saved_on} and resumes on cpu" in warnings[0]
    assert "shuffling and augmentation" in warnings[0] and "dropout masks" in warnings[0]
    resumed.recipe["epochs"] = 2
    cli.fit(resumed, progress=False, log=False)  # and the run goes on
    assert cols(resumed.history)["epoch"] == [1, 2]


def test_checkpoint_from_the_same_device_resumes_without_a_warning(tmp_path, mnist_dir,
                                                                   capsys):
    run = tiny_run(mnist_dir)
    cli.fit(run, progress=False, log=False)
    cli.save_run(run, tmp_path / "cpu.pt")
    runs.restore_run(tiny_run(mnist_dir), checkpoints.read_checkpoint(tmp_path / "cpu.pt"))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_the_training_devices_generator_is_saved(mnist_dir, monkeypatch, kind):
    """On CUDA and MPS the dropout masks come from the device's own generator: keep it."""
    state = torch.arange(FOREIGN[kind], dtype=torch.uint8)
    backend = torch.cuda if kind == "cuda" else torch.mps
    monkeypatch.setattr(backend, "get_rng_state", lambda *args, **kwargs: state)
    run = tiny_run(mnist_dir)
    # utils.save_checkpoint's random states, for a model on that device
    assert torch.equal(checkpoints.rng_states(run.train_loader, torch.device(kind))[kind], state)


def test_the_mps_generator_is_restored_on_mps(mnist_dir, monkeypatch):
    restored = []
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    run = tiny_run(mnist_dir)
    rng = checkpoints.rng_states(run.train_loader, CPU)
    rng["mps"] = torch.arange(44, dtype=torch.uint8)
    # what utils.load_checkpoint does for a model on MPS
    checkpoints.restore_rng(rng, run.train_loader, torch.device("mps"))
    assert len(restored) == 1 and torch.equal(restored[0], rng["mps"])


# ---------------------------------------------------------------------------------------------
# The training loop reads the device back only every `refresh_every` batches.
# ---------------------------------------------------------------------------------------------
class Counter:
    def __init__(self) -> None:
        self.reads = 0
        self.created = 0


def count_syncs(monkeypatch) -> Counter:
    """Count host reads of tensors and tensors made from host values (a host-to-device copy
    on a GPU), wherever they happen."""
    counter = Counter()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, **kwargs):
            counter.reads += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        original = getattr(torch, name)

        def create(*args, _original=original, **kwargs):
            counter.created += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, create)
    return counter


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(n)]


def syncs_of_an_epoch(monkeypatch, n_batches: int) -> Counter:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = batches(n_batches)
    with monkeypatch.context() as patch:
        counter = count_syncs(patch)
        utils.train(model, CPU, loader, optimizer, 1, progress=False)  # reads every 25
    return counter


def test_train_reads_the_device_every_refresh_every_batches(monkeypatch):
    short, long = syncs_of_an_epoch(monkeypatch, 50), syncs_of_an_epoch(monkeypatch, 100)
    # 50 more steps = 2 more refreshes, each reading its 3 sums, and nothing per step.
    assert long.reads - short.reads == 2 * 3
    assert long.created == short.created


def test_batches_are_copied_asynchronously_only_to_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: calls.append(kw) or self)
    x = torch.zeros(2)
    for kind in ("cuda", "mps", "cpu"):
        devices.to_device(x, torch.device(kind))
    assert [c["non_blocking"] for c in calls] == [True, False, False]


# ---------------------------------------------------------------------------------------------
# What the fast path switches on, per device; determinism; compile.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,channels_last,keeps_memory", [
    ("cpu", True, True), ("cuda", False, False), ("mps", False, False)])
def test_channels_last_and_the_allocator_setting_only_on_the_cpu(kind, channels_last,
                                                                 keeps_memory):
    fast = devices.fast_path({**utils.RECIPE, "loader": "fast"}, torch.device(kind))
    assert fast.fused_dropout
    assert (fast.memory_format == torch.channels_last) == channels_last
    assert fast.keep_freed_memory == keeps_memory
    original = devices.fast_path({**utils.RECIPE, "loader": "torchvision"}, torch.device(kind))
    assert original.memory_format == torch.contiguous_format and not original.fused_dropout


@pytest.fixture
def switches():
    """PyTorch's process-wide switches, put back after the test."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
             cudnn.benchmark, cudnn.allow_tf32)
    yield cudnn
    torch.use_deterministic_algorithms(saved[0])
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = saved[1:]


def test_deterministic_recipe_sets_pytorchs_switches(mnist_dir, switches):
    cli.build_run({**TINY, "deterministic": True}, CPU, mnist_dir)
    assert torch.are_deterministic_algorithms_enabled()
    assert switches.deterministic and not switches.benchmark and not switches.allow_tf32


def test_a_run_without_determinism_leaves_the_users_switches_alone(mnist_dir, switches,
                                                                  monkeypatch):
    kept = []
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: kept.append(True))
    switches.benchmark, switches.allow_tf32 = True, False  # a user's own choice
    cli.build_run(TINY, CPU, mnist_dir)
    assert kept == [True]  # the fast path's allocator: train.py's run sets it
    assert (switches.benchmark, switches.allow_tf32) == (True, False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_notebooks_prepare_model_changes_nothing_outside_the_model(monkeypatch, switches):
    """The learner's kernel keeps its settings: no mallopt, no determinism, even if asked."""
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: pytest.fail("mallopt called"))
    utils.prepare_model(Net(), {"deterministic": True}, CPU)
    assert not torch.are_deterministic_algorithms_enabled() and not switches.deterministic


def test_compile_is_refused_on_mps():
    with pytest.raises(ValueError, match="not supported on MPS"):
        devices.compiled(nn.Linear(2, 2), torch.device("mps"))


# ---------------------------------------------------------------------------------------------
# The notebook asks Colab for a GPU, and says so when it did not get one.
# ---------------------------------------------------------------------------------------------
def test_notebook_metadata_asks_colab_for_a_gpu(repo_root):
    metadata = json.loads((repo_root / "Session_6_Solution.ipynb").read_text())["metadata"]
    assert metadata["accelerator"] == "GPU"
    assert metadata["colab"]["gpuType"]


def test_in_colab_on_a_cpu_the_notebook_says_how_to_get_a_gpu(monkeypatch, capsys):
    settings_cell(monkeypatch, "1")
    assert "Change runtime type" not in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    settings_cell(monkeypatch, "1")
    text = capsys.readouterr().out
    assert text.startswith("device: cpu")
    assert "Runtime > Change runtime type > T4 GPU" in text


needs_accelerator_api = pytest.mark.skipif(not hasattr(torch, "accelerator"),
                                           reason="torch.accelerator is torch 2.6+")


@pytest.mark.quick
@needs_accelerator_api
@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_auto_picks_the_accelerator_torch_names(monkeypatch, kind):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device(kind))
    assert devices.get_device("auto") == torch.device(kind)


@pytest.mark.quick
@needs_accelerator_api
def test_auto_is_the_cpu_where_torch_names_no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert devices.get_device("auto") == torch.device("cpu")


@pytest.mark.quick
@pytest.mark.parametrize(("cuda", "mps", "expected"),
                         [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_without_torch_accelerator_asks_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.delattr(torch, "accelerator", raising=False)  # as in torch before 2.6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert devices.get_device("auto") == torch.device(expected)
