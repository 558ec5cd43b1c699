"""The value types of train.py's flags: each recipe flag built from its field's Rule.

argparse calls each type with the text the user gave; an ArgumentTypeError becomes argparse's
own one-line usage error (exit 2), naming the flag, so a bad value stops the run before any
work rather than as a traceback later.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from support.recipe import DEFAULTS, NAMED, RULES, Rule

THREADS = Rule("CPU threads for torch", low=1, high=1024)  # each thread costs memory


def flag(key: str) -> str:
    """The command-line flag of a recipe key: batch_size is --batch-size."""
    return "--" + key.replace("_", "-")


def value_type(rule: Rule) -> Callable[[str], Any]:
    """`rule.parse`, named as argparse names a value it cannot convert ("invalid integer
    value: '2.5'", not the function's name)."""
    def parse(text: str) -> Any:
        return rule.parse(text)

    parse.__name__ = "integer" if rule.kind is int else "number"
    return parse


def path_text(text: str) -> str:
    """An empty path would mean the current folder, or no flag at all: refused."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_recipe_flags(parser: argparse.ArgumentParser, groups: dict[str, Any]) -> None:
    """One flag per recipe key, in its Rule's group, with its Rule's type, limits and help,
    and the defaults of every named recipe that changes it. Each defaults to None, so a flag
    the user gave can be told from a default (a resume or an evaluation honours or refuses
    it)."""
    for key, rule in RULES.items():
        default = shown(DEFAULTS[key])
        named = "".join(f"; {name}: {shown(recipe[key])}" for name, recipe in NAMED.items()
                        if key in recipe and key != "model")
        help_text = f"{rule.help} (default: {default}{named})"
        options: dict[str, Any] = {"help": help_text}
        if rule.kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif rule.choices:
            options["choices"] = list(rule.choices)
        else:
            options["type"] = value_type(rule)
        groups[rule.group].add_argument(flag(key), **options)


def shown(value: Any) -> str:
    """A value as --help shows it: on/off, all (None), 0.1 rather than 0.1000."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "all" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
