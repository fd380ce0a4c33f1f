"""`batchd --help` and every command's `--help` say what each option and argument is for."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from batchd.cli.main import build_parser


def every_action(
    parser: argparse.ArgumentParser, path: str = "batchd"
) -> Iterator[tuple[str, argparse.Action]]:
    """(command path, action) for every option and argument, subcommands' included."""
    for action in parser._actions:  # argparse has no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            # Each command's line in the parent's help is an action of its own.
            for listed in action._choices_actions:
                yield path, listed
            for name, subparser in action.choices.items():
                yield from every_action(subparser, f"{path} {name}")
        else:
            yield path, action


def test_every_option_argument_and_command_has_help() -> None:
    actions = list(every_action(build_parser()))
    commands = {path for path, _ in actions}
    assert {"batchd", "batchd status", "batchd fake-api", "batchd demo"} <= commands
    assert len(actions) > 50  # the walk reaches every command's options
    without = [
        f"{path}: {'/'.join(action.option_strings) or action.metavar or action.dest}"
        for path, action in actions
        if not (action.help or "").strip()
    ]
    assert without == []
