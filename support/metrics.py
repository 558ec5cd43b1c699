"""The --metrics file: a run's recipe, history and facts as JSON, and how to know one.

The benchmarks (benchmarks/ablation.py, seeds.py) and the README's tables read these files;
`is_metrics_file` tells one from any other file, so that --metrics replaces an earlier run's
without --force but never a checkpoint, a data file or anything else.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from model import count_parameters
from support import outputs
from support.bookkeeping import history_columns
from support.recipe import net_options

KEYS = ("recipe", "history", "final_test_acc")  # what every metrics file has
MAX_BYTES = 10 * 2**20  # far above any run's history; a larger file is not one


def git_commit() -> str | None:
    """The code a result came from (with -dirty if the tree had changes), when run from git.
    train.py reads it as a run starts, so that a commit made while the run trains (20 minutes
    on a CPU) is not the one its metrics file names."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run_facts(device: torch.device, model: torch.nn.Module, recipe: dict,
              commit: str | None) -> dict:
    import torchvision

    return {"model": {"channels": list(model.channels), **net_options(recipe)},
            # the fast loader's pixels are the original's (PIL's arithmetic), so a results
            # file says which pixels its accuracy was measured on
            "augmentation_pixels": "pil-exact",
            "commit": commit,
            "parameters": count_parameters(model), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def write_metrics(path: str, recipe: dict, history: list[dict], model: torch.nn.Module,
                  device: torch.device, commit: str | None) -> None:
    """The run's recipe, facts and history (as columns), written atomically
    (outputs.atomic_write); `commit` is git_commit() as the run started."""
    columns = history_columns(history)
    out = {"recipe": recipe, **run_facts(device, model, recipe, commit),
           "history": columns, "final_test_acc": columns["test_acc"][-1],
           "best_test_acc": max(columns["test_acc"])}
    text = json.dumps(out, indent=2) + "\n"
    outputs.atomic_write(path, lambda f: f.write(text.encode()))


def is_metrics_file(path: Path) -> bool:
    """A JSON object with the keys write_metrics writes."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return False
        found = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and set(KEYS) <= set(found)
