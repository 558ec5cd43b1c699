"""benchmarks/seeds.py --report: the README's results table, from results/*.json alone."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def seeds(repo_root):
    spec = importlib.util.spec_from_file_location("seeds", repo_root / "benchmarks" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(folder, name, seed, final, best):
    metrics = {"final_test_acc": final, "best_test_acc": best, "model": {"dropout_plan": "x"},
               "commit": "abc1234"}
    (folder / f"{name}_seed{seed}.json").write_text(json.dumps(metrics))


def test_names_follow_loader_and_dropout_plan(seeds):
    assert seeds.run_name("fast", "table") == "fast"
    assert seeds.run_name("torchvision", "table") == "torchvision"
    assert seeds.run_name("fast", "every") == "fast-dropout-every"


def test_side_by_side_table(seeds, tmp_path):
    write(tmp_path, "fast", 1, 99.5, 99.6)
    write(tmp_path, "fast", 2, 99.4, 99.5)
    write(tmp_path, "torchvision", 1, 99.6, 99.6)
    write(tmp_path, "fast-dropout-every", 3, 99.45, 99.5)
    text = seeds.report(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["seed"][:4] == ["fast final", "fast best", "torchvision final",
                                "torchvision best"]
    assert rows["1"][:4] == ["99.50", "99.60", "99.60", "99.60"]
    assert rows["2"][2:4] == ["", ""]  # torchvision has no seed 2
    assert rows["**mean**"][:2] == ["99.450", "99.550"]
    assert rows["**sd**"][0] == "0.071" and rows["**sd**"][2] == "-"  # one seed: no sd
    assert rows["**min**"][0] == "99.40"
    assert rows["3"][4:] == ["99.45", "99.50"]


def test_report_runs_nothing(repo_root, tmp_path):
    write(tmp_path, "fast", 7, 99.5, 99.6)
    done = subprocess.run([sys.executable, "benchmarks/seeds.py", "--report", "--out",
                           str(tmp_path), "--seeds", "8"], cwd=repo_root, capture_output=True,
                          text=True, check=True)
    assert "| 7 | 99.50 | 99.60 |" in done.stdout
    assert not (tmp_path / "fast_seed8.json").exists()
