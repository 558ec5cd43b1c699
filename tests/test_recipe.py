"""One source for the recipe's keys: utils.RECIPE. The command line and Run derive from it."""

from __future__ import annotations

import pytest
import torch

import train
import utils


def test_every_recipe_key_is_a_train_py_flag_with_the_recipes_default():
    args = train.build_parser().parse_args([])
    recipe = train.recipe_from(args)
    assert recipe == utils.RECIPE


def test_flags_reach_the_recipe():
    args = train.build_parser().parse_args(
        ["--lr", "0.05", "--dropout-plan", "every", "--limit-train", "100", "--epochs", "3",
         "--deterministic"])
    recipe = train.recipe_from(args)
    assert (recipe["lr"], recipe["dropout_plan"], recipe["limit_train"], recipe["epochs"],
            recipe["deterministic"]) == (0.05, "every", 100, 3, True)


def test_run_refuses_a_key_the_recipe_does_not_know(mnist_dir):
    with pytest.raises(ValueError, match="unknown recipe keys: epoch"):
        utils.Run({"epoch": 3}, torch.device("cpu"), mnist_dir)


def test_build_model_follows_the_recipe():
    cpu = torch.device("cpu")
    fast = utils.build_model({**utils.RECIPE, "dropout_plan": "every"}, cpu)
    original = utils.build_model({**utils.RECIPE, "loader": "torchvision"}, cpu)
    assert sum(isinstance(m, torch.nn.Dropout) for m in original.modules()) == 2
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    assert sum(type(m).__name__ == "ReLUDropout" for m in fast.modules()) == 5
