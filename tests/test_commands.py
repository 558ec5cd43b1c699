"""The commands users type, as they type them: bare `pytest` from the repository root (what
IDEs, pre-commit hooks and most contributors run), the notebook's smoke run as `pytest --nbval`,
and the install files' promises."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

PYTEST = Path(sys.executable).with_name("pytest")  # the venv's own, not `python -m pytest`


@functools.cache
def collect(repo_root: Path, *args: str) -> tuple[str, ...]:
    """The test ids `pytest ARGS --collect-only` lists from the repository root, in one process
    (pyproject's `-n auto` would start workers that each collect the suite again)."""
    done = subprocess.run([str(PYTEST), *args, "--collect-only", "-q", "-n", "0",
                           "-p", "no:cacheprovider"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return tuple(line for line in done.stdout.splitlines() if "::" in line)


@pytest.mark.parametrize("args", [(), ("tests/test_model.py",)], ids=["all", "one-module"])
def test_bare_pytest_collects_the_suite(repo_root, args):
    ids = collect(repo_root, *args)
    assert any(i.startswith("tests/test_model.py::") for i in ids)
    if not args:  # pyproject's testpaths: the tests and the notebook
        assert any(i.startswith("tests/test_cli.py::") for i in ids)
        assert any(i.startswith("Session_6_Solution.ipynb::") for i in ids)
    else:
        assert all(i.startswith("tests/test_model.py::") for i in ids)


def test_bare_pytest_m_quick_selects_only_the_quick_tier(repo_root):
    quick = set(collect(repo_root, "-m", "quick"))
    assert quick and quick < set(collect(repo_root))
    assert not any(i.startswith("Session_6_Solution.ipynb::") for i in quick)


def test_pytest_nbval_collects_the_notebooks_cells(repo_root):
    ids = collect(repo_root, "--nbval", "Session_6_Solution.ipynb")
    assert len(ids) > 5 and all(re.match(r"Session_6_Solution\.ipynb::Cell \d+", i) for i in ids)


def requirements(path: Path) -> dict[str, str]:
    """{name: version spec} of a requirements file's own lines (not its -r includes)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            found[name.lower().replace("_", "-")] = spec
    return found


def test_requirements_are_floors_so_a_working_torch_is_kept(repo_root):
    needs = requirements(repo_root / "requirements.txt")
    assert {"torch", "torchvision", "torchsummary", "tqdm", "matplotlib"} <= set(needs)
    assert all(spec.startswith(">=") for spec in needs.values()), needs


def test_constraints_pin_every_requirement_exactly(repo_root):
    pinned = requirements(repo_root / "constraints.txt")
    wanted = {**requirements(repo_root / "requirements.txt"),
              **requirements(repo_root / "requirements-test.txt")}
    assert all(spec.startswith("==") for spec in pinned.values())
    assert set(wanted) <= set(pinned), sorted(set(wanted) - set(pinned))


# The runs over about 30 s on one core: real torch.compile, the benchmarks' own runs, a Ctrl-C
# then a resume of a full named recipe, the torchvision loader's workers, bars on a terminal.
SLOW = ["tests/test_compile.py::test_compile_trains_resumes_with_and_without_it_and_evaluates",
        "tests/test_speedrun.py::test_the_benchmark_",
        "tests/test_speedrun.py::test_the_exploration",
        "tests/test_speedrun.py::test_ctrl_c_", "tests/test_tiny.py::test_the_benchmark_",
        "tests/test_tiny.py::test_ctrl_c_", "tests/test_ablation.py::test_script_runs_a_variant",
        "tests/test_training.py::test_short_training_on_real_mnist_beats_95_percent[torchvision]",
        "tests/test_suggested_commands.py::test_a_hint_names_the_interpreter",
        "tests/test_cli.py::test_sigint_then_resume",
        "tests/test_cli.py::test_a_terminal_gets_bars"]


def test_the_slow_marker_names_the_longest_runs(repo_root):
    slow = collect(repo_root, "-m", "slow")
    assert all(any(i.startswith(prefix) for i in slow) for prefix in SLOW), slow
    assert len(slow) == 14, slow  # benchmark tests: 3 of the speedrun's, 2 of the tiny one's
    assert set(slow).isdisjoint(collect(repo_root, "-m", "not slow"))
