"""The notebook in a real kernel (nbclient), as a learner meets an interruption: the training cell
is interrupted in its second epoch; the cells below it still run, draw, and write nothing into
images/; the training cell run again goes on after epoch 1; only the complete run saves figures;
a third run loads the finished run; another recipe is refused.

The notebook's own cells run, in order, with one cell of the test's after the settings cell: a
3-epoch recipe on a few hundred images, and a checkpoint and an images folder (a copy of the
committed one) in a temporary folder. The kernel runs in smoke mode, so that if that cell ever
failed to apply, nothing of a full run would be touched."""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.util import ensure_async
from nbconvert.preprocessors import CoalesceStreamsPreprocessor
from runs import epochs_logged as epochs_logged_in
from runs import shown

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "Session_6_Solution.ipynb"
EPOCHS = 3

# After saving epoch 1, the next optimizer step (epoch 2's first) waits to be interrupted, so
# the interrupt lands mid-epoch, as the stop button's would, at a point the test knows.
WAIT_IN_EPOCH_2 = """
import time

import utils

_save_checkpoint = save_checkpoint


def _save_then_wait(path, model, optimizer, scheduler, train_loader, recipe, history, **kw):
    _save_checkpoint(path, model, optimizer, scheduler, train_loader, recipe, history, **kw)
    if len(history) == 1:
        def wait(*args, **kwargs):
            print("test: waiting in epoch 2", flush=True)
            time.sleep(300)
        optimizer.step = wait
        globals()["save_checkpoint"] = _save_checkpoint


save_checkpoint = _save_then_wait
"""


def settings_cell(tmp: Path) -> str:
    return (f"recipe.update(epochs={EPOCHS}, limit_train=256, limit_test=200, batch_size=64, "
            f"test_batch_size=200)\n"
            f"CHECKPOINT, RETRAIN, IMAGES = {str(tmp / 'run.pt')!r}, False, "
            f"{str(tmp / 'images')!r}\n")


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def epochs_logged(cell: nbformat.NotebookNode) -> list[int]:
    return epochs_logged_in(text_of(cell))


def errors(cell: nbformat.NotebookNode) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


class Notebook:
    """The notebook's code cells in one kernel. `run` executes a cell (or code) and returns what
    it showed; the client's notebook records every cell run, in order (nbclient writes each
    executed cell back at its index there)."""

    def __init__(self, client: NotebookClient, notebook: nbformat.NotebookNode) -> None:
        self.client = client
        self.cells = [c for c in notebook.cells if c.cell_type == "code"]

    def cell(self, code: str) -> nbformat.NotebookNode:
        (cell,) = [c for c in self.cells if code in c.source]
        return cell

    def _next(self, cell: nbformat.NotebookNode | str) -> tuple[nbformat.NotebookNode, int]:
        source = cell if isinstance(cell, str) else cell.source
        ran = nbformat.v4.new_code_cell(source)
        self.client.nb.cells.append(ran)
        return ran, len(self.client.nb.cells) - 1

    async def run(self, cell: nbformat.NotebookNode | str, expect_error: bool = False
                  ) -> nbformat.NotebookNode:
        ran, index = self._next(cell)
        await self.client.async_execute_cell(ran, index)
        assert bool(errors(ran)) == expect_error, errors(ran) or text_of(ran)
        return ran

    async def interrupt_when(self, cell: nbformat.NotebookNode, marker: str
                             ) -> nbformat.NotebookNode:
        """Run `cell`, interrupt the kernel once `marker` is in its output, return what ran."""
        cell, index = self._next(cell)
        running = asyncio.ensure_future(self.client.async_execute_cell(cell, index))
        for _ in range(600):
            if marker in text_of(cell) or running.done():
                break
            await asyncio.sleep(0.2)
        assert marker in text_of(cell), text_of(cell)
        await ensure_async(self.client.km.interrupt_kernel())  # the stop button
        await running
        return cell


async def interrupted_then_resumed(tmp: Path) -> dict[str, object]:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    ran = nbformat.v4.new_notebook(metadata=notebook.metadata)
    client = NotebookClient(ran, timeout=600, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    seen: dict[str, object] = {}
    async with client.async_setup_kernel():
        book = Notebook(client, notebook)
        training = book.cell("for epoch in")
        after = [book.cell("plot_history("), book.cell("plot_mistakes(")]
        for cell in book.cells[:book.cells.index(training)]:
            await book.run(cell)
            if "CHECKPOINT =" in cell.source:  # the settings cell: the test's own follow
                await book.run(settings_cell(tmp))
                await book.run(WAIT_IN_EPOCH_2)

        seen["interrupted"] = await book.interrupt_when(training, "test: waiting in epoch 2")
        seen["after interrupted"] = [await book.run(c) for c in after]
        seen["images after interrupted"] = snapshot(tmp / "images")

        seen["resumed"] = await book.run(training)
        seen["history"] = text_of(await book.run('print([row["epoch"] for row in history])'))
        seen["after complete"] = [await book.run(c) for c in after]
        seen["images after complete"] = snapshot(tmp / "images")

        seen["loaded"] = await book.run(training)
        await book.run("recipe['lr'] = 0.02")
        seen["other recipe"] = await book.run(training, expect_error=True)
    return seen


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("notebook")
    shutil.copytree(ROOT / "images", tmp / "images")
    committed = snapshot(tmp / "images")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("S6_SMOKE", "1")  # see the module's docstring
        env.setenv("OMP_NUM_THREADS", "1")
        seen = asyncio.run(interrupted_then_resumed(tmp))
    return {**seen, "images committed": committed, "checkpoint": str(tmp / "run.pt"),
            "images": str(tmp / "images")}


def test_the_interrupted_training_cell_says_which_epoch_is_saved(seen):
    cell = seen["interrupted"]
    assert errors(cell) == ["KeyboardInterrupt: "]
    lines = shown(text_of(cell)).splitlines()
    assert lines[0] == f"a new run: {EPOCHS} epochs, each saved in {seen['checkpoint']}"
    assert epochs_logged(cell) == [1]
    assert lines[-1] == (f"interrupted: epoch 1 of {EPOCHS} is saved in {seen['checkpoint']}; "
                         f"run this cell again to go on from there")


def test_the_cells_below_still_run_and_say_the_run_is_incomplete(seen):
    plots, analysis = seen["after interrupted"]  # run() checked: no NameError
    assert f"the run is incomplete (1 of {EPOCHS} epochs)" in text_of(plots)
    assert any("image/png" in o.get("data", {}) for o in plots.outputs)  # drawn all the same
    assert any("image/png" in o.get("data", {}) for o in analysis.outputs)


def test_an_interrupted_run_leaves_images_as_it_was(seen):
    assert seen["images after interrupted"] == seen["images committed"]


def test_run_again_the_training_cell_goes_on_after_the_saved_epoch(seen):
    cell = seen["resumed"]
    lines = shown(text_of(cell)).splitlines()
    assert lines[0] == f"resuming {seen['checkpoint']} after epoch 1 of {EPOCHS}"
    assert epochs_logged(cell) == [2, 3]  # epoch 1 is not trained again
    assert seen["history"] == "[1, 2, 3]\n"


def test_the_training_log_is_saved_as_one_line_per_epoch(seen):
    """As the README's nbconvert command saves it: no stderr block, no bar left over."""
    cell = copy.deepcopy(seen["resumed"])
    CoalesceStreamsPreprocessor().preprocess_cell(cell, {}, 0)
    assert [(o.output_type, o.get("name")) for o in cell.outputs] == [("stream", "stdout")]
    lines = cell.outputs[0].text.splitlines()
    assert len(lines) == 1 + 2 + 1  # resuming, epochs 2 and 3, the final accuracy
    assert all(re.match(r"epoch +\d+: train loss", line) for line in lines[1:3])
    assert lines[-1].startswith("final test accuracy:") and "at epoch 3" in lines[-1]
    assert "\r" not in cell.outputs[0].text and "it/s" not in cell.outputs[0].text


def test_only_the_complete_run_writes_images(seen):
    before, after = seen["images committed"], seen["images after complete"]
    assert set(after) == set(before)
    for name in ("samples.png", "loss.png", "accuracy.png", "misclassified.png",
                 "confusion_matrix.png"):
        assert after[name][1] > before[name][1], f"{name} was not saved"
    for name in ("ablation.png", "parameters.png"):  # benchmarks/ablation.py --report's
        assert after[name] == before[name], f"{name} was touched"
    assert after["loss.png"][0] != before["loss.png"][0]  # this run's curves, not the committed
    plots = seen["after complete"][0]
    assert "incomplete" not in text_of(plots)


def test_a_finished_run_is_loaded_not_trained_again(seen):
    cell = seen["loaded"]
    lines = shown(text_of(cell)).splitlines()
    assert lines[0].startswith(f"loaded the finished run in {seen['checkpoint']} (3 epochs)")
    assert epochs_logged(cell) == []
    assert "at epoch 3" in lines[-1]


def test_a_checkpoint_of_another_recipe_is_refused_with_what_to_do(seen):
    (error,) = errors(seen["other recipe"])
    assert error.startswith("ValueError:") and "another recipe" in error
    assert "lr 0.01 (the notebook's: 0.02)" in error and "RETRAIN = True" in error
