"""The benchmark scripts end in a line, never a traceback: on a bad count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import ablation, common, seeds, speed, step

ROOT = Path(__file__).resolve().parent.parent
USAGE = "must be an integer from 1 to 2,147,483,647, got"


# ---------------------------------------------------------------------------------------------
# Counts are checked by argparse: a one-line usage error, exit 2.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("main", "argv"), [
    (seeds.parse_args, ["--jobs", "0"]), (seeds.parse_args, ["--jobs", "-1"]),
    (seeds.parse_args, ["--threads", "0"]), (ablation.parse_args, ["--jobs", "0"]),
    (ablation.parse_args, ["--threads", "0"]), (speed.main, ["--steps", "0", "--warmup", "0"]),
    (speed.main, ["--batch-size", "0"]), (step.main, ["--batch-size", "0"]),
    (step.main, ["--steps", "0"]), (step.main, ["--rounds", "0"]),
])
def test_a_count_below_one_is_a_usage_error(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: ")
    flag = next(a for a in argv if a.startswith("--") and a != "--warmup")
    value = argv[argv.index(flag) + 1]
    assert err[-1].endswith(f"error: argument {flag}: {USAGE} {value}")


def test_speed_accepts_no_warmup_but_refuses_a_negative_one(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--warmup", "-1"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --warmup: must be an integer from 0 to 2,147,483,647, got -1")
    assert common.non_negative_int("0") == 0


def test_a_count_that_is_not_an_integer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        seeds.parse_args(["--jobs", "two"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --jobs: must be an integer, got 'two'")


def test_seeds_script_refuses_jobs_0_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/seeds.py", "--jobs", "0", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"seeds.py: error: argument --jobs: {USAGE} 0"
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []
