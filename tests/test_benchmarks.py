"""The benchmark scripts end in a line, never a traceback: on a bad count, on a result file they
cannot use, and on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest

from benchmarks import ablation, common, compact, seeds, speed, speedrun, step, tiny

ROOT = Path(__file__).resolve().parent.parent
USAGE = "must be an integer from 1 to 2,147,483,647, got"


pytestmark = pytest.mark.usefixtures("close_figures")  # conftest.py's, for every test here


def metrics(final: float = 99.5) -> dict:
    """A result file as train.py --metrics writes it, as far as the reports read it."""
    history = {"epoch": [1, 2], "test_acc": [98.0, final], "train_acc": [97.0, 97.0],
               "seconds": [1.0, 1.0]}
    return {"parameters": 19_200, "final_test_acc": final, "best_test_acc": final,
            "model": {"channels": [8]}, "commit": "abc1234", "history": history}


GOOD = json.dumps(metrics())
# (what the file holds, why a report cannot use it)
UNUSABLE = {
    "empty": ("", "empty file (a write that failed?)"),
    "truncated": (GOOD[:40], "not valid JSON (truncated?)"),
    "binary": (b"\xff\xfe\x00", "not valid JSON (not even text)"),
    "a list": ("[99.5]", "not a JSON object"),
    "nan": (GOOD.replace('"final_test_acc": 99.5', '"final_test_acc": NaN'),
            "'final_test_acc' is NaN, not a finite number"),
    "infinity": (GOOD.replace('"parameters": 19200', '"parameters": Infinity'),
                 "'parameters' is Infinity, not a finite number"),
    "a string": (GOOD.replace('"final_test_acc": 99.5', '"final_test_acc": "99.5"'),
                 "'final_test_acc' is not a number (\"99.5\")"),
    "a bool": (GOOD.replace('"parameters": 19200', '"parameters": true'),
               "'parameters' is not a number (true)"),
    "missing key": (json.dumps({k: v for k, v in metrics().items() if k != "final_test_acc"}),
                    "no 'final_test_acc'"),
    "no history": (json.dumps({k: v for k, v in metrics().items() if k != "history"}),
                   "no 'history'"),
    "short column": (GOOD.replace('"test_acc": [98.0, 99.5]', '"test_acc": [98.0]'),
                     "history columns differ in length (epoch 2, test_acc 1, train_acc 2, "
                     "seconds 2)"),
    "empty history": (json.dumps(metrics() | {"history": {"epoch": [], "test_acc": [],
                                                          "train_acc": []}}), "empty history"),
    "nan in history": (GOOD.replace('"train_acc": [97.0, 97.0]', '"train_acc": [97.0, NaN]'),
                       "history 'train_acc' is NaN, not a finite number"),
}


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ---------------------------------------------------------------------------------------------
# What a usable result file is.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(UNUSABLE))
def test_an_unusable_result_says_why(tmp_path, case):
    content, why = UNUSABLE[case]
    with pytest.raises(common.Unusable) as err:
        common.read_result(write(tmp_path / "x_seed1.json", content), ablation.NEEDS)
    assert str(err.value) == why


def test_a_complete_result_is_read_as_is(tmp_path):
    assert common.read_result(write(tmp_path / "x_seed1.json", GOOD), ablation.NEEDS) == metrics()


def test_a_result_that_cannot_be_read_says_so(tmp_path):
    (tmp_path / "x_seed1.json").mkdir()
    with pytest.raises(common.Unusable, match=r"cannot be read \(Is a directory\)"):
        common.read_result(tmp_path / "x_seed1.json", seeds.NEEDS)


def test_seeds_needs_no_history(tmp_path):
    path = write(tmp_path / "fast_seed1.json", UNUSABLE["no history"][0])
    assert common.read_result(path, seeds.NEEDS)["final_test_acc"] == 99.5


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line]


# ---------------------------------------------------------------------------------------------
# The reports skip what they cannot use, naming it in one line, and go on with the rest.
# ---------------------------------------------------------------------------------------------
def test_ablation_report_skips_unusable_files_with_one_warning_each(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "ablation"
    write(out / "recipe_seed1.json", GOOD)
    write(out / "recipe_seed2.json", UNUSABLE["truncated"][0])
    write(out / "no-dropout_seed1.json", UNUSABLE["nan"][0])
    write(out / "crop-only_seed3.json", UNUSABLE["missing key"][0])
    rows = {r.variant: r for r in ablation.summarise(ablation.load_results(out))}
    assert rows["recipe"].seeds == [1] and rows["recipe"].mean_test == 99.5
    assert rows["no-dropout"].seeds == [] and rows["crop-only"].seeds == []
    assert warnings(capsys.readouterr().err) == [  # in VARIANTS order
        "warning: skipped results/ablation/recipe_seed2.json: not valid JSON (truncated?)",
        "warning: skipped results/ablation/no-dropout_seed1.json: 'final_test_acc' is NaN, "
        "not a finite number",
        "warning: skipped results/ablation/crop-only_seed3.json: no 'final_test_acc'"]
    table = ablation.report(out, tmp_path / "a.png", tmp_path / "p.png")
    assert "| recipe | nothing: the recipe as is | 19,200 | 1 | 99.50 |" in table


def test_seeds_report_skips_unusable_files_with_one_warning_each(tmp_path, capsys):
    write(tmp_path / "fast_seed1.json", GOOD)
    write(tmp_path / "fast_seed2.json", UNUSABLE["empty"][0])
    write(tmp_path / "torchvision_seed1.json", UNUSABLE["infinity"][0].replace(
        '"best_test_acc": 99.5', '"best_test_acc": Infinity'))
    text = seeds.report(tmp_path)
    assert "fast: 1 seeds ([1])" in text and "torchvision" not in text
    err = warnings(capsys.readouterr().err)
    assert len(err) == 2 and all(line.startswith("warning: skipped ") for line in err)
    assert err[0].endswith("fast_seed2.json: empty file (a write that failed?)")
    assert err[1].endswith("torchvision_seed1.json: 'best_test_acc' is Infinity, not a finite "
                           "number")


def test_seeds_script_report_on_a_bad_file_ends_without_a_traceback(tmp_path):
    write(tmp_path / "fast_seed1.json", GOOD)
    write(tmp_path / "fast_seed2.json", UNUSABLE["truncated"][0])
    done = subprocess.run([sys.executable, "benchmarks/seeds.py", "--report", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"warning: skipped {tmp_path / 'fast_seed2.json'}: not valid JSON " \
                          "(truncated?)\n"
    assert "| 1 | 99.50 | 99.50 |" in done.stdout


# ---------------------------------------------------------------------------------------------
# A run counts as done only when its file is usable.
# ---------------------------------------------------------------------------------------------
def test_ablation_runs_again_what_a_failed_write_left_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    write(out / "recipe_seed1.json", GOOD)
    write(out / "no-dropout_seed1.json", "")
    write(out / "recipe_seed2.json", UNUSABLE["truncated"][0])
    args = ablation.parse_args(["--variants", "recipe", "no-dropout", "--seeds", "1", "2",
                                "--out", str(out)])
    assert ablation.to_run(args) == [("no-dropout", 1), ("recipe", 2), ("no-dropout", 2)]
    assert capsys.readouterr().out.splitlines() == [
        "recipe seed 1: skipped, results exist",
        "no-dropout seed 1: out/no-dropout_seed1.json is unusable (empty file (a write that "
        "failed?)); running it again",
        "recipe seed 2: out/recipe_seed2.json is unusable (not valid JSON (truncated?)); "
        "running it again"]


def test_seeds_runs_again_what_a_failed_write_left_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "fast_seed1.json", GOOD)
    write(tmp_path / "fast_seed2.json", "")
    started = []
    monkeypatch.setattr(common, "run_batch",
                        lambda todo, jobs, threads: started.extend(todo) or [0] * len(todo))
    assert seeds.main(["--seeds", "1", "2", "3", "--out", str(tmp_path)]) == 0
    assert [job.label for job in started] == ["seed 2", "seed 3"]
    assert "--seed" in started[0].command and "2" in started[0].command
    out = capsys.readouterr().out
    assert ("seed 2: fast_seed2.json is unusable (empty file (a write that failed?)); running "
            "it again") in out.splitlines()


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


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line saying what finished, exit 130.
# ---------------------------------------------------------------------------------------------
TINY = ["--", "--epochs", "1", "--limit-train", "256", "--limit-test", "200", "--device", "cpu"]


def start(script: str, *args: str) -> subprocess.Popen:
    """The script in a process group of its own, with Ctrl-C's default handling even when this
    test runs in the background (where SIGINT is inherited as ignored)."""
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_train_child(pid: int, limit: float = 120) -> None:
    """Until the script has started train.py (exec'd: its command line names train.py)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                if (f"\nPPid:\t{pid}\n" in status.read_text()
                        and b"train.py" in (status.parent / "cmdline").read_bytes()):
                    return
            except OSError:  # the process ended meanwhile
                continue
        time.sleep(0.2)
    raise AssertionError("train.py never started")


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@needs_proc
def test_ctrl_c_on_seeds_ends_in_one_line_and_starts_nothing_more(tmp_path):
    write(tmp_path / "fast_seed1.json", GOOD)  # done before: skipped, so not in the count
    proc = start("benchmarks/seeds.py", "--seeds", "1", "2", "3", "--threads", "1", "--out",
                 str(tmp_path), *TINY)
    wait_for_train_child(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C at a terminal: the script and its runs
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == ("interrupted (Ctrl-C) after 0 of 2 runs finished; the same command again "
                   "runs the other 2 (finished runs are skipped)\n")
    assert out == ""
    assert not (tmp_path / "fast_seed2.json").exists()
    assert not (tmp_path / "fast_seed3.log").exists()  # the interrupt kept it from starting


@needs_proc
def test_sigint_to_ablation_alone_stops_its_run_too(tmp_path):
    out = tmp_path / "ablation"
    proc = start("benchmarks/ablation.py", "--variants", "no-dropout", "recipe", "--seeds", "7",
                 "--threads", "1", "--out", str(out), "--figure", str(tmp_path / "a.png"), *TINY)
    wait_for_train_child(proc.pid)
    proc.send_signal(signal.SIGINT)  # `kill -INT`: its train.py gets none but what it forwards
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == ("interrupted (Ctrl-C) after 0 of 2 runs finished; the same command again "
                   "runs the other 2 (finished runs are skipped)\n")
    assert stdout == ""
    assert (out / "no-dropout_seed7.log").exists() and not (out / "recipe_seed7.log").exists()
    assert not (out / "no-dropout_seed7.json").exists() and not (tmp_path / "a.png").exists()


# ---------------------------------------------------------------------------------------------
# --out: a folder, `~` expanded; a private one never draws over the committed figures.
# ---------------------------------------------------------------------------------------------
SCRIPTS_WITH_OUT = [ablation, seeds, compact, speedrun, tiny]


@pytest.mark.parametrize("script", SCRIPTS_WITH_OUT, ids=lambda m: m.__name__)
def test_out_naming_a_file_is_one_usage_line(tmp_path, capsys, script):
    (tmp_path / "FILE").write_text("mine\n")
    with pytest.raises(SystemExit) as code:
        script.main(["--report", "--out", str(tmp_path / "FILE")])
    assert code.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (tmp_path / "FILE").read_text() == "mine\n"


@pytest.mark.parametrize("script", SCRIPTS_WITH_OUT, ids=lambda m: m.__name__)
def test_a_report_from_a_misspelt_out_is_refused_before_any_figure(tmp_path, script):
    committed = {p: p.read_bytes() for p in (ROOT / "images").glob("*.png")}
    with pytest.raises(SystemExit) as refusal:
        script.main(["--report", "--out", str(tmp_path / "TYPO")])
    assert "no such folder of results" in str(refusal.value.code)
    assert not (tmp_path / "TYPO").exists()
    assert {p: p.read_bytes() for p in (ROOT / "images").glob("*.png")} == committed


def test_a_report_from_a_private_out_draws_its_figures_there(tmp_path, capsys):
    committed = {p: p.read_bytes() for p in (ROOT / "images").glob("*.png")}
    (tmp_path / "mine").mkdir()
    assert ablation.main(["--report", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "ablation.png").exists()
    assert (tmp_path / "mine" / "parameters.png").exists()
    assert {p: p.read_bytes() for p in (ROOT / "images").glob("*.png")} == committed


def test_out_at_home_written_as_tilde_goes_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.out_folder("~/runs") == tmp_path / "runs"
