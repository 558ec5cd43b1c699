"""One source for the recipe's keys: support.recipe.RECIPE (the learner reads it through
utils). The command line and build_run derive from it."""

from __future__ import annotations

import argparse

import pytest
import runs
import torch
from runs import cols

import train
import train as cli
import utils
from model import Net
from support import checkpoints
from support.recipe import RULES, net_options


def test_every_recipe_key_is_a_train_py_flag_with_the_recipes_default():
    args = train.build_parser().parse_args([])
    assert set(utils.RECIPE) <= set(vars(args))
    assert train.recipe_from(args) == utils.RECIPE


def test_every_recipe_key_is_checked_when_a_checkpoint_is_loaded():
    assert set(RULES) == set(utils.RECIPE)
    for key, rule in RULES.items():
        assert rule.holds(utils.RECIPE[key]), key


def test_flags_reach_the_recipe():
    args = train.build_parser().parse_args(
        ["--lr", "0.05", "--dropout-plan", "every", "--limit-train", "100", "--epochs", "3",
         "--deterministic", "--no-batch-norm", "--transitions", "bare"])
    recipe = train.recipe_from(args)
    assert (recipe["lr"], recipe["dropout_plan"], recipe["limit_train"], recipe["epochs"],
            recipe["deterministic"], recipe["batch_norm"], recipe["transitions"]) == (
        0.05, "every", 100, 3, True, False, "bare")


def test_a_checkpoint_of_an_ablation_variant_loads_and_resumes(tmp_path, mnist_dir):
    recipe = {"batch_norm": False, "transitions": "bare", "epochs": 1, "limit_train": 128,
              "limit_test": 100, "batch_size": 64, "test_batch_size": 100}
    run = cli.build_run(recipe, torch.device("cpu"), mnist_dir)
    cli.fit(run, progress=False, log=False)
    cli.save_run(run, tmp_path / "variant.pt")
    checkpoint = checkpoints.read_checkpoint(tmp_path / "variant.pt")
    assert checkpoint["recipe"]["batch_norm"] is False
    resumed = cli.build_run({**checkpoint["recipe"], "epochs": 2}, torch.device("cpu"), mnist_dir)
    runs.restore_run(resumed, checkpoint)
    cli.fit(resumed, progress=False, log=False)
    assert cols(resumed.history)["epoch"] == [1, 2]


def test_run_refuses_a_key_the_recipe_does_not_know(mnist_dir):
    with pytest.raises(ValueError, match="unknown recipe keys: epoch"):
        cli.build_run({"epoch": 3}, torch.device("cpu"), mnist_dir)


def built(recipe: dict) -> torch.nn.Module:
    """The recipe's model as the notebook builds it: Net, then the recipe's fast path."""
    return utils.prepare_model(Net(**net_options(recipe)), recipe, torch.device("cpu"))


def test_prepare_model_follows_the_recipe():
    fast = built({**utils.RECIPE, "dropout_plan": "every"})
    original = built({**utils.RECIPE, "loader": "torchvision"})
    assert sum(isinstance(m, torch.nn.Dropout) for m in original.modules()) == 2
    assert not any(type(m).__name__ == "ReLUDropout" for m in original.modules())
    assert all(type(m).__name__ == "ReLUDropout" for m in fast.modules()
               if isinstance(m, torch.nn.Dropout))
    assert sum(type(m).__name__ == "ReLUDropout" for m in fast.modules()) == 5
    # fused or not, one set of weights under one set of keys
    plain = built({**utils.RECIPE, "dropout_plan": "every", "loader": "torchvision"})
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_an_architecture_option_is_refused_only_for_a_model_that_does_not_take_it():
    parse = train.build_parser().parse_args
    with pytest.raises(train.UsageError, match="--width applies to the s6 and tiny models only, "
                                               "not to --model compact: drop it"):
        train.recipe_from(parse(["--model", "compact", "--width", "0.5"]))
    assert train.recipe_from(parse(["--model", "tiny", "--width", "0.5"]))["width"] == 0.5


def test_argparse_types_refuse_out_of_range_values():
    for key, text in (("batch_size", str(2**31)), ("seed", str(-(2**63) - 1))):
        with pytest.raises(argparse.ArgumentTypeError):
            RULES[key].parse(text)
    assert RULES["seed"].parse(str(2**64 - 1)) == 2**64 - 1
