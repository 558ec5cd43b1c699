"""The documented command for re-executing the notebook (docs/notebook.md) keeps one finished
bar per progress bar, not every refresh of it (which would make the notebook hundreds of KB
heavier); and the committed notebook, as a reader on GitHub sees it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
BARS = """\
import time
from tqdm import tqdm
for _ in tqdm(range(40), desc="epoch  1 train", mininterval=0):
    time.sleep(0.03)
print("epoch  1: done")
"""


def readme_command() -> list[str]:
    """The nbconvert command in docs/notebook.md's "Re-executing it in place" section, as
    arguments."""
    doc = (ROOT / "docs" / "notebook.md").read_text()
    section = doc.split("## Re-executing it in place", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "docs/notebook.md's re-executing section lacks the command"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment settings, e.g.
        words.pop(0)  # OMP_NUM_THREADS=1: they change the run's threads, not its outputs
    return words


def execute(notebook: Path, command: list[str]) -> list[dict]:
    """Run `command` on a copy of the notebook; the outputs of its one cell."""
    assert command[:2] == ["jupyter", "nbconvert"] and command[-1] == "Session_6_Solution.ipynb"
    args = [sys.executable, "-m", "jupyter", *command[1:-1], str(notebook)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return nbformat.read(notebook, as_version=4).cells[0].outputs


@pytest.fixture
def bars_notebook(tmp_path) -> Path:
    path = tmp_path / "bars.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(BARS)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def test_readme_command_keeps_one_finished_bar_and_the_summary_line(bars_notebook):
    command = readme_command()
    assert "--execute" in command and "--inplace" in command
    plain = [a for a in command if "CoalesceStreams" not in a]
    assert len(execute(bars_notebook, plain)) > 2  # without it: a fragment per refresh
    outputs = execute(bars_notebook, command)
    # stderr's last flush (the bar's closing newline) may come after the print
    assert len(outputs) <= 3
    bar = "".join(o.text for o in outputs if o.name == "stderr")
    assert bar.count("epoch  1 train") == 1 and "40/40" in bar
    assert [o.text for o in outputs if o.name == "stdout"] == ["epoch  1: done\n"]


# ---------------------------------------------------------------------------------------------
# The committed notebook, as a reader on GitHub sees it.
# ---------------------------------------------------------------------------------------------
NOTEBOOK = ROOT / "Session_6_Solution.ipynb"
MAX_BYTES = 300_000  # GitHub renders it quickly, and a clone stays light


def cell_running(nb: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and code in c.source]
    return cell


def test_committed_notebook_is_executed_light_and_shows_every_result():
    assert NOTEBOOK.stat().st_size < MAX_BYTES
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]

    ablation = nb.cells[-1]  # the benchmark's figures, as it saved them
    assert ablation.cell_type == "markdown"
    shown = re.findall(r"!\[[^\]]+\]\((images/[^)]+\.png)\)", ablation.source)
    assert shown == ["images/ablation.png", "images/parameters.png"]
    assert all((ROOT / path).is_file() for path in shown)


def test_committed_training_log_is_one_line_per_epoch_with_no_stderr_block():
    """A whole new run, as the README's command saves it: the bars cleared themselves, so one
    stdout block holds the start line, one line per epoch and the final accuracy."""
    training = cell_running(nbformat.read(NOTEBOOK, as_version=4), "for epoch in")
    assert [(o.output_type, o.get("name")) for o in training.outputs] == [("stream", "stdout")]
    lines = training.outputs[0].text.splitlines()
    assert lines[0] == "a new run: 20 epochs, each saved in checkpoints/notebook.pt"
    assert [re.match(r"epoch +(\d+): train loss", line).group(1) for line in lines[1:-1]] == [
        str(e) for e in range(1, 21)]
    assert lines[-1].startswith("final test accuracy:") and lines[-1].endswith("at epoch 20")


def test_committed_notebook_shows_the_layer_table_rendered():
    from model import Net, format_layer_table, layer_table

    nb = nbformat.read(NOTEBOOK, as_version=4)
    network = cell_running(nb, "layer_table(Net())")
    assert "nbval-check-output" in network.metadata.get("tags", [])  # nbval compares it
    table = format_layer_table(layer_table(Net()))
    assert "**19,200**" in table  # the total, in the table's last row
    assert [o.get("data", {}).get("text/markdown") for o in network.outputs] == [table]
    assert not [c for c in nb.cells if c.cell_type == "code" and "NBVAL_" in c.source]


def test_the_note_beside_torchsummary_adds_up_as_the_model_does():
    """torchsummary gives conv1's conv and its BatchNorm a row each; the table, one row."""
    from torch import nn

    from model import Net, layer_table

    nb = nbformat.read(NOTEBOOK, as_version=4)
    summary = cell_running(nb, "summary(Net()")
    note = nb.cells[nb.cells.index(summary) - 1]
    assert note.cell_type == "markdown"
    conv1 = Net().features.conv1
    weights = sum(p.numel() for m in conv1 if isinstance(m, nn.Conv2d) for p in m.parameters())
    norm = sum(p.numel() for m in conv1 if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert weights + norm == layer_table(Net())[0].params
    text = " ".join(note.source.split())
    assert (f"conv1's {weights} weights" in text and f"BatchNorm's {norm}" in text
            and f"the table's {weights + norm}" in text)
