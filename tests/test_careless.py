"""train.py as a careless user drives it: wrong paths, cut files, flags that clash
or would be ignored, Ctrl-C and full disks at awkward moments, folders that change under a
run. Each case ends in what works or in one line that says what to do, loses nothing already
saved, and leaves no lock or scratch file. docs/careless.md lists every case with its test.
Most run train.main in this process (a refusal comes before any work); a few train a few
batches."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from runs import after_save, main, refused, train

import train as cli
import utils
from support import checkpoints, command_line, locks, stopping
from support.bookkeeping import Tally

pytestmark = pytest.mark.usefixtures("signals_restored")
SMALL = ["--device", "cpu", "--quiet", "--limit-train", "128", "--limit-test", "128",
         "--batch-size", "64", "--test-batch-size", "128"]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, mnist_dir) -> bytes:
    """A finished StepLR run of 1 epoch (SMALL's recipe), as train.py saves it."""
    path = tmp_path_factory.mktemp("careless") / "a.pt"
    done = train(*SMALL, "--epochs", "1", "--save-model", str(path))
    assert done.returncode == 0, done.stderr
    return path.read_bytes()


@pytest.fixture
def here(tmp_path, mnist_dir, monkeypatch) -> Path:
    (tmp_path / "data").symlink_to(mnist_dir.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def a_pt(here, one_epoch) -> Path:
    (here / "a.pt").write_bytes(one_epoch)
    return here / "a.pt"


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Lock and scratch files in `folder`: a run that ended must leave none."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".lock", ".partial")))


@pytest.fixture
def immutable():
    """chattr +i on a folder (root ignores permission bits, not this); undone after."""
    made = []

    def freeze(folder: Path) -> None:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        made.append(folder)

    yield freeze
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ---------------------------------------------------------------------------------------------
# Paths to read: a folder, a missing file, a trailing '/', a cut file, an empty one, a text.
# ---------------------------------------------------------------------------------------------
def test_resume_of_a_folder_names_the_checkpoints_in_it(capsys, here, a_pt):
    line = refused(capsys, "--resume", ".", "--epochs", "2")
    assert line == ("train.py: error: --resume . is a folder, not a checkpoint: give the "
                    "checkpoint file itself, such as a.pt")
    assert "last.pt/last.pt" not in line


def test_evaluate_of_a_folder_is_a_usage_error(capsys, here):
    (here / "runs").mkdir()
    assert refused(capsys, "--evaluate", "runs") == (
        "train.py: error: --evaluate runs is a folder, not a checkpoint: give the checkpoint "
        "file itself")


def test_resume_of_a_missing_file_makes_no_folder(capsys, here):
    assert refused(capsys, "--resume", "typo/last.pt") == (
        "train.py: error: --resume typo/last.pt: no such file")
    assert not (here / "typo").exists()


def test_a_trailing_slash_after_a_checkpoint_says_to_drop_it(capsys, a_pt):
    assert refused(capsys, "--resume", "a.pt/", "--epochs", "2") == (
        "train.py: error: --resume a.pt/: a.pt is a file, not a folder: drop the trailing '/'")


@pytest.mark.parametrize("keep", [10, 100, 30_000, -10])
def test_evaluate_of_a_cut_checkpoint_says_it_is_cut_short(capsys, here, one_epoch, keep):
    Path("cut.pt").write_bytes(one_epoch[:keep])
    code, _, err = main(capsys, "--evaluate", "cut.pt", "--device", "cpu")
    assert code == 1
    assert error_line(err) == (
        "error: cut.pt: not a checkpoint of this model (cut short: it starts as a torch.save "
        "archive but does not end as one, as a copy or download that stopped early leaves it; "
        "copy it again, or use another checkpoint)")


def test_resume_of_a_cut_checkpoint_keeps_it_and_leaves_no_lock(capsys, here, one_epoch):
    Path("cut.pt").write_bytes(one_epoch[:30_000])
    code, _, err = main(capsys, "--resume", "cut.pt", "--epochs", "2", *SMALL[:2])
    assert code == 1 and "cut short" in error_line(err)
    assert Path("cut.pt").read_bytes() == one_epoch[:30_000]
    assert leftovers(here) == []


def test_evaluate_of_an_empty_file_says_it_is_empty(capsys, here):
    Path("empty.pt").touch()
    code, _, err = main(capsys, "--evaluate", "empty.pt", "--device", "cpu")
    assert code == 1
    assert error_line(err) == "error: empty.pt: not a checkpoint of this model (an empty file)"


def test_a_text_file_is_still_not_written_by_torch_save(capsys, here):
    Path("notes.pt").write_text("my notes\n")
    code, _, err = main(capsys, "--evaluate", "notes.pt", "--device", "cpu")
    assert code == 1 and "not a file written by torch.save" in error_line(err)


def test_evaluate_of_the_metrics_file_by_mistake_is_one_line(capsys, here):
    assert main(capsys, *SMALL, "--epochs", "1", "--no-save", "--metrics", "m.json")[0] == 0
    code, _, err = main(capsys, "--evaluate", "m.json", "--device", "cpu")
    assert code == 1 and error_line(err).startswith("error: m.json: not a checkpoint")


# ---------------------------------------------------------------------------------------------
# Flags that clash, or that a run would ignore.
# ---------------------------------------------------------------------------------------------
def test_no_save_with_save_model_is_refused(capsys, here):
    assert refused(capsys, *SMALL, "--no-save", "--save-model", "x.pt") == (
        "train.py: error: --no-save and --save-model exclude each other: drop --no-save to "
        "save in --save-model's file, or drop --save-model to write none")
    assert not Path("x.pt").exists()


def test_compact_refuses_step_size_and_gamma_it_would_ignore(capsys, here):
    assert refused(capsys, *SMALL, "--model", "compact", "--step-size", "3", "--gamma", "0.5",
                   "--no-save") == (
        "train.py: error: --step-size and --gamma apply to --schedule step only, and this "
        "run's schedule is onecycle (--model compact's): drop them, or add --schedule step")


def test_onecycle_refuses_gamma_it_would_ignore(capsys, here):
    assert refused(capsys, *SMALL, "--schedule", "onecycle", "--gamma", "0.5", "--no-save") == (
        "train.py: error: --gamma applies to --schedule step only, and this run's schedule is "
        "onecycle: drop it, or add --schedule step")


def test_a_onecycle_of_one_epoch_is_refused(capsys, here):
    assert refused(capsys, *SMALL, "--model", "compact", "--epochs", "1", "--no-save") == (
        "train.py: error: a OneCycle schedule (--model compact's) is stepped once per epoch and "
        "spends its last epoch at its floor, lr 8e-07 (peak / 250,000), so a 1-epoch run would "
        "not train: give --epochs 2 or more, or add --schedule step")


def test_a_dry_run_of_the_compact_model_is_still_accepted(capsys, here):
    code, out, _ = main(capsys, "--dry-run", "--model", "compact", "--device", "cpu", "--quiet")
    assert code == 0 and "no checkpoint (--dry-run)" in out


def test_lr_of_minus_one_asks_for_a_number_above_zero(capsys):
    code, _, err = main(capsys, "--lr", "-1")
    assert code == 2 and "argument --lr: must be a finite number > 0, got -1" in err
    assert ">= 0" not in err


def test_lr_of_minus_zero_is_refused(capsys):
    code, _, err = main(capsys, "--lr", "-0")
    assert code == 2 and "must be a finite number > 0, got -0" in err


@pytest.mark.parametrize("flag, value, words", [("--epochs", "2.5", "invalid integer value"),
                                                ("--lr", "1/10", "invalid number value")])
def test_a_malformed_number_is_named_by_what_it_should_be(capsys, flag, value, words):
    code, _, err = main(capsys, flag, value)
    assert code == 2 and f"argument {flag}: {words}: '{value}'" in err
    assert "_float" not in err and "_int" not in err


def test_evaluate_with_epochs_is_refused_as_ignored(capsys, a_pt):
    line = refused(capsys, "--evaluate", "a.pt", "--epochs", "5")
    assert "--epochs 5 (saved: 1)" in line


def test_evaluate_with_dry_run_is_refused(capsys, a_pt):
    assert "--dry-run checks a new run's set-up" in refused(capsys, "--evaluate", "a.pt",
                                                            "--dry-run")


def test_resume_with_dry_run_is_refused(capsys, a_pt):
    before = a_pt.read_bytes()
    assert "--dry-run checks a new run's set-up" in refused(capsys, "--resume", "a.pt",
                                                            "--dry-run")
    assert a_pt.read_bytes() == before


def test_threads_0_is_refused_before_any_work(capsys):
    code, _, err = main(capsys, "--threads", "0", "--no-save")
    assert code == 2 and "argument --threads: must be an integer from 1 to 1,024, got 0" in err


def test_resume_with_another_model_is_refused(capsys, a_pt):
    before = a_pt.read_bytes()
    line = refused(capsys, "--resume", "a.pt", "--epochs", "2", "--model", "compact")
    assert "--model compact (saved: s6)" in line
    assert a_pt.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Where a run saves: other names for the same file, new folders, files that are not its own.
# ---------------------------------------------------------------------------------------------
def test_resume_into_another_file_keeps_the_original(capsys, a_pt):
    before = a_pt.read_bytes()
    assert main(capsys, "--resume", "a.pt", "--epochs", "2", "--save-model", "b.pt",
                *SMALL[:3])[0] == 0
    assert a_pt.read_bytes() == before
    assert checkpoints.read_checkpoint("b.pt")["history"]["epoch"] == [1, 2]


def test_a_renamed_checkpoint_resumes_under_its_new_name(capsys, here, one_epoch):
    Path("renamed.pt").write_bytes(one_epoch)
    assert main(capsys, "--resume", "renamed.pt", "--epochs", "2", *SMALL[:3])[0] == 0
    assert checkpoints.read_checkpoint("renamed.pt")["history"]["epoch"] == [1, 2]
    assert sorted(p.name for p in here.iterdir()) == ["data", "renamed.pt"]


def test_resume_through_a_symlink_saves_to_its_target(capsys, a_pt):
    Path("link.pt").symlink_to("a.pt")
    assert main(capsys, "--resume", "link.pt", "--epochs", "2", *SMALL[:3])[0] == 0
    assert Path("link.pt").is_symlink()
    assert checkpoints.read_checkpoint(a_pt)["history"]["epoch"] == [1, 2]


def test_save_model_naming_the_resumed_file_needs_no_force(capsys, a_pt):
    assert main(capsys, "--resume", "a.pt", "--save-model", "a.pt", "--epochs", "2",
                *SMALL[:3])[0] == 0
    assert checkpoints.read_checkpoint(a_pt)["history"]["epoch"] == [1, 2]


def test_save_model_onto_a_metrics_file_is_refused_without_force(capsys, here):
    assert main(capsys, *SMALL, "--epochs", "1", "--no-save", "--metrics", "m.json")[0] == 0
    before = Path("m.json").read_bytes()
    assert refused(capsys, *SMALL, "--epochs", "1", "--save-model", "m.json") == (
        "train.py: error: m.json already exists and is not a checkpoint of this model: keep it "
        "with --save-model OTHER.pt, or replace it with --force")
    assert Path("m.json").read_bytes() == before


def test_save_model_in_new_nested_folders_makes_them(capsys, here):
    assert main(capsys, *SMALL, "--epochs", "1", "--save-model", "a/b/c/last.pt")[0] == 0
    assert os.listdir("a/b/c") == ["last.pt"]


def test_a_refused_run_leaves_no_folder_it_made(capsys, here):
    refused(capsys, *SMALL, "--save-model", "new/dir/x.pt", "--metrics", "new/dir/x.pt")
    assert not Path("new").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(capsys, here):
    Path(".last.pt.lock").write_text("999999\n")  # a SIGKILLed run's: its lock died with it
    assert main(capsys, *SMALL, "--epochs", "1", "--save-model", "last.pt")[0] == 0
    assert leftovers(here) == []


def test_a_leftover_of_a_killed_save_is_removed_and_said(capsys, here):
    Path(".last.pt.abc123.partial").write_bytes(b"half a checkpoint")
    code, out, _ = main(capsys, *SMALL, "--epochs", "1", "--save-model", "last.pt")
    assert code == 0 and "removed" in out and ".last.pt.abc123.partial" in out
    assert leftovers(here) == []


# ---------------------------------------------------------------------------------------------
# Folders that cannot be written, before or during a run.
# ---------------------------------------------------------------------------------------------
def test_resume_in_an_unwritable_folder_points_to_save_model(capsys, here, one_epoch,
                                                             immutable):
    (here / "ro").mkdir()
    (here / "ro" / "a.pt").write_bytes(one_epoch)
    immutable(here / "ro")
    line = refused(capsys, "--resume", "ro/a.pt", "--epochs", "2")
    assert line.endswith("continue it into another file with --save-model OTHER.pt"), line
    assert main(capsys, "--resume", "ro/a.pt", "--epochs", "2", "--save-model", "b.pt",
                *SMALL[:3])[0] == 0  # which works
    assert checkpoints.read_checkpoint("b.pt")["history"]["epoch"] == [1, 2]


def test_evaluate_in_an_unwritable_folder_works(capsys, here, one_epoch, immutable):
    (here / "ro").mkdir()
    (here / "ro" / "a.pt").write_bytes(one_epoch)
    immutable(here / "ro")
    code, out, _ = main(capsys, "--evaluate", "ro/a.pt", "--device", "cpu", "--limit-test",
                        "128")
    assert code == 0 and "accuracy" in out


def test_a_folder_made_unwritable_mid_run_is_one_line_and_frees_the_lock(
        capsys, here, monkeypatch, immutable):
    (here / "run").mkdir()
    real = stopping.written

    def freeze_after_epoch_1(what, write):
        real(what, write)
        if what.startswith("save epoch 1 "):
            immutable(here / "run")  # as a disk remounted read-only, or a quota reached

    monkeypatch.setattr(stopping, "written", freeze_after_epoch_1)
    code, _, err = main(capsys, *SMALL, "--epochs", "2", "--save-model", "run/last.pt")
    assert code == 1
    assert error_line(err) == (
        "error: could not save epoch 2 in run/last.pt: Operation not permitted; epoch 1 is "
        "saved in run/last.pt; continue with `python train.py --resume run/last.pt`")
    assert err.splitlines()[0] == (
        f"warning: could not delete the lock file {(here / 'run' / '.last.pt.lock').resolve()} "
        f"(Operation not permitted); it holds no lock now, and the next run on run/last.pt "
        f"takes it over")
    assert (here / "run" / ".last.pt.lock").read_text() == ""  # names no holder
    assert checkpoints.read_checkpoint("run/last.pt")["history"]["epoch"] == [1]


def test_a_lock_whose_file_cannot_be_deleted_is_still_released(tmp_path, monkeypatch):
    lock = locks.acquire(tmp_path / ".x.lock", wait=False)

    def refuse(self, missing_ok=False):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(Path, "unlink", refuse)
    assert lock.release() == "Operation not permitted"
    monkeypatch.undo()
    locks.acquire(tmp_path / ".x.lock", wait=False).release()  # free: taken at once


# ---------------------------------------------------------------------------------------------
# Ctrl-C and a full disk at awkward moments.
# ---------------------------------------------------------------------------------------------
def test_ctrl_c_before_the_first_save_leaves_nothing(capsys, here, monkeypatch):
    def interrupted(what, write):
        raise KeyboardInterrupt

    monkeypatch.setattr(stopping, "written", interrupted)
    code, _, err = main(capsys, *SMALL, "--epochs", "2", "--save-model", "last.pt")
    assert code == 130 and err.strip().endswith("no complete epoch was saved.")
    assert sorted(os.listdir(here)) == ["data"]


def test_a_full_disk_at_the_first_save_leaves_nothing(capsys, here, monkeypatch):
    after_save(monkeypatch, 0, OSError(errno.ENOSPC, "No space left on device"))
    code, _, err = main(capsys, *SMALL, "--epochs", "2", "--save-model", "last.pt")
    assert code == 1
    assert error_line(err) == ("error: could not save epoch 1 in last.pt: No space left on "
                               "device; no complete epoch was saved.")
    assert sorted(os.listdir(here)) == ["data"]


def test_ctrl_c_during_an_evaluation_says_it_writes_nothing(capsys, a_pt, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "test", interrupted)
    code, _, err = main(capsys, "--evaluate", "a.pt", "--device", "cpu")
    assert code == 130 and "an evaluation writes nothing." in err


def test_an_empty_loader_is_one_sentence_not_a_division_by_zero():
    tally = Tally(torch.device("cpu"), [])
    with pytest.raises(ValueError, match="^the loader is empty: it gave no batch"):
        tally.result()


# ---------------------------------------------------------------------------------------------
# Tiny data: fewer images than a batch, a batch larger than the data.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--limit-train", "1"], ["--batch-size", "100000"]])
def test_less_data_than_a_batch_trains_one_batch(capsys, here, flags):
    code, out, _ = main(capsys, *SMALL, *flags, "--epochs", "1", "--no-save")
    assert code == 0 and "final test accuracy" in out


# ---------------------------------------------------------------------------------------------
# A OneCycle run resumed with the values it already has is accepted; the help says the rule.
# ---------------------------------------------------------------------------------------------
def test_a_flag_given_with_the_value_it_holds_changes_nothing_on_resume(capsys, here,
                                                                       monkeypatch):
    # Its own peak --lr is "no change" to the checks, so the run must not act on it either:
    # resetting SGD's lr to the peak mid-cycle would train apart from the uninterrupted run.
    after_save(monkeypatch, 1, KeyboardInterrupt())
    flags = ["--model", "compact", *SMALL, "--epochs", "2", "--save-model", "k.pt"]
    assert main(capsys, *flags)[0] == 130
    monkeypatch.undo()
    monkeypatch.chdir(here)
    (here / "plain.pt").write_bytes((here / "k.pt").read_bytes())
    code, out, _ = main(capsys, "--resume", "k.pt", "--lr", "0.2", "--epochs", "2",
                        "--device", "cpu", "--quiet")
    assert code == 0 and "learning rate set to" not in out, out
    assert main(capsys, "--resume", "plain.pt", "--device", "cpu", "--quiet")[0] == 0
    given, plain = (checkpoints.read_checkpoint(here / n) for n in ("k.pt", "plain.pt"))
    for key, value in plain["model"].items():
        assert torch.equal(given["model"][key], value), key
    del given["history"]["seconds"], plain["history"]["seconds"]  # wall time differs anyway
    assert given["history"] == plain["history"]


def test_a_new_lr_on_resume_is_the_recipe_from_then_on_and_resumes_again(capsys, a_pt):
    # The resumed recipe is the saved one with the flags applied: the checkpoint records the
    # rate it now trains at, so the next resume finds its objects and recipe in agreement.
    code, out, _ = main(capsys, "--resume", "a.pt", "--epochs", "2", "--lr", "0.005",
                        "--device", "cpu", "--quiet")
    assert code == 0 and "learning rate set to 0.005 from epoch 2" in out, out
    assert checkpoints.read_checkpoint(a_pt)["recipe"]["lr"] == 0.005
    assert main(capsys, "--resume", "a.pt", "--epochs", "3", "--device", "cpu", "--quiet")[0] == 0
    assert checkpoints.read_checkpoint(a_pt)["history"]["lr"] == [0.01, 0.005, 0.005]


def test_the_help_states_the_onecycle_rules():
    text = " ".join(cli.build_parser().format_help().split())
    assert "its last epoch at lr / 250,000 (so it needs --epochs 2 or more" in text
    assert "(a OneCycle run: only --compile; docs/resume.md)" in text


def test_a_finished_run_trained_again_in_one_process_keeps_it(capsys, a_pt):
    before = a_pt.read_bytes()
    line = refused(capsys, *SMALL, "--epochs", "1", "--save-model", "a.pt")
    assert "train it further with `python train.py --resume a.pt --epochs 6`" in line
    assert a_pt.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Damaged training images: an evaluation reads the test files only; a training run says how to
# mend them. A recipe of the wrong kind is refused before torch sees it.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def damaged_training_images(tmp_path, mnist_dir, one_epoch) -> Path:
    """A data folder whose training images are cut short, its test files whole; a.pt beside."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).symlink_to((mnist_dir / "MNIST" / "raw" / name).resolve())
    whole = (mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "a.pt").write_bytes(one_epoch)
    return tmp_path


def test_evaluate_works_when_only_the_training_images_are_damaged(damaged_training_images,
                                                                 capsys):
    here = damaged_training_images
    code, out, err = main(capsys, "--evaluate", str(here / "a.pt"), "--data-dir",
                          str(here / "data"), "--device", "cpu", "--quiet")
    assert code == 0, err
    assert f"{here / 'a.pt'}: test loss" in out and "on 10,000 images" in out


def test_training_on_damaged_images_says_how_to_mend_them(damaged_training_images, capsys):
    here = damaged_training_images
    code, _, err = main(capsys, *SMALL, "--epochs", "1", "--no-save", "--data-dir",
                        str(here / "data"))
    assert code == 1
    line = error_line(err)
    assert "train-images-idx3-ubyte" in line
    assert "delete it and run again, which fetches it anew (or train.py --refetch)" in line
    assert "refetch=True" not in line


@pytest.mark.parametrize("recipe, words", [({"lr": "0.1"}, "recipe lr='0.1' is not"),
                                           ({"epochs": 0}, "recipe epochs=0 is not")])
def test_build_run_refuses_a_recipe_of_the_wrong_kind_before_torch_sees_it(mnist_dir, recipe,
                                                                           words):
    with pytest.raises(ValueError, match=words):
        cli.build_run(recipe, torch.device("cpu"), mnist_dir)


# ---------------------------------------------------------------------------------------------
# The lock's path: never followed, never written nor deleted unless it is a lock file of ours.
# ---------------------------------------------------------------------------------------------
def _a_symlink_to_a_precious_file(lock: Path) -> None:
    (lock.parent / "precious.pt").write_text("precious\n")
    lock.symlink_to("precious.pt")


LOCK_PATHS = {
    "a symlink": (_a_symlink_to_a_precious_file, "is a symlink"),
    "a folder": (lambda lock: lock.mkdir(), "is a folder"),
    "a FIFO": (lambda lock: os.mkfifo(lock), "is a FIFO"),
    "a user's file": (lambda lock: lock.write_text("my notes\n"), "is not a lock file"),
}


@pytest.mark.parametrize("kind", LOCK_PATHS, ids=list(LOCK_PATHS))
def test_a_lock_path_that_is_not_a_lock_file_is_refused_and_kept(tmp_path, kind):
    make, said = LOCK_PATHS[kind]
    lock = checkpoints.lock_file(tmp_path / "a.pt")
    make(lock)
    before = {p.name: (p.lstat().st_mode, p.read_text() if p.is_file() else None)
              for p in tmp_path.iterdir()}
    with pytest.raises(locks.Unusable) as refusal:
        with checkpoints.checkpoint_lock(tmp_path / "a.pt"):
            pytest.fail("a lock was taken")
    line = str(refusal.value)
    assert said in line and "\n" not in line and ("move it away" in line)
    after = {p.name: (p.lstat().st_mode, p.read_text() if p.is_file() else None)
             for p in tmp_path.iterdir()}
    assert after == before  # nothing followed, truncated or deleted
    failure = stopping.failure_message(refusal.value, stopping.Status())
    assert failure == line  # train.py prints it as its one error line


def test_a_stale_read_only_lock_of_ours_is_replaced_by_a_fresh_one(tmp_path):
    lock = checkpoints.lock_file(tmp_path / "a.pt")
    lock.write_text("999999\n")
    lock.chmod(0o444)
    with checkpoints.checkpoint_lock(tmp_path / "a.pt"):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_a_release_never_deletes_a_file_put_in_the_locks_place(tmp_path):
    path = tmp_path / ".x.lock"
    held = locks.acquire(path, wait=False)
    path.unlink()
    path.write_text("a user's file\n")
    assert held.release() is None
    assert path.read_text() == "a user's file\n"


# ---------------------------------------------------------------------------------------------
# One path rule: `~` expanded, then anything but a regular file (or a folder) refused.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--evaluate", "--resume", "--save-model", "--metrics"])
def test_a_fifo_for_a_checkpoint_or_metrics_is_refused_without_waiting_on_it(
        capsys, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("k.pt")
    assert refused(capsys, flag, "k.pt") == (
        f"train.py: error: {flag} k.pt is a FIFO, not a regular file: give the path of a file")


@pytest.mark.parametrize("flag", ["--evaluate", "--resume", "--save-model", "--metrics"])
def test_a_symlink_loop_for_a_checkpoint_or_metrics_is_refused_in_one_line(
        capsys, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    os.symlink("b.pt", "a.pt")
    os.symlink("a.pt", "b.pt")
    line = refused(capsys, flag, "a.pt")
    assert line.startswith(f"train.py: error: {flag} a.pt") and "symbolic links" in line, line
    assert os.path.islink("a.pt") and os.path.islink("b.pt")


def test_a_fifo_handed_to_read_checkpoint_is_refused_without_waiting_on_it(tmp_path):
    os.mkfifo(tmp_path / "k.pt")
    with pytest.raises(checkpoints.CheckpointError, match="a FIFO, not a regular file"):
        checkpoints.read_checkpoint(tmp_path / "k.pt")


def test_every_path_flag_at_home_written_as_tilde_is_expanded_once(capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert refused(capsys, "--evaluate=~/x.pt") == (
        f"train.py: error: --evaluate {tmp_path}/home/x.pt: no such file")
    assert refused(capsys, "--save-model=~/x.pt", "--metrics=~/x.pt") == (
        f"train.py: error: --save-model and --metrics name the same file {tmp_path}/home/x.pt: "
        f"give each its own path")
    args = cli.build_parser().parse_args(["--data-dir=~/d", "--resume=~/r.pt", "--metrics=~/m"])
    command_line.expand_paths(args)
    assert (args.data_dir, args.resume, args.metrics) == (
        f"{tmp_path}/home/d", f"{tmp_path}/home/r.pt", f"{tmp_path}/home/m")
    assert not (tmp_path / "~").exists()


def test_an_mnist_file_this_user_cannot_read_is_one_line(tmp_path, mnist_dir, monkeypatch,
                                                         capsys, signals_restored):
    """chmod 000 stops any user but root, and the tests run as root: the file's open() is
    refused as the OS refuses it to another user."""
    import shutil

    from support import mnist_files

    shutil.copytree(mnist_dir / "MNIST", tmp_path / "MNIST")
    locked = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"

    def refusing_open(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(mnist_files, "open", refusing_open, raising=False)
    try:
        code = cli.main(["--dry-run", "--no-save", "--quiet", "--data-dir", str(tmp_path)])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    assert code in (1, 2) and "Traceback" not in out + err
    assert err.strip().count("\n") == 0, err
    assert "t10k-labels-idx1-ubyte: cannot be read (Permission denied)" in err
