"""Review s27Q: the documentation tells a new user the truth about the CLI and workflows."""

from __future__ import annotations

import argparse

import pytest

from medseg.cli import _parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help_text(command):
    """`medseg CMD --help` explains every option (check's --layout showed only its choices)."""
    silent = [action.option_strings or [action.dest] for action in _subcommands()[command]._actions
              if not (action.help or "").strip()]
    assert not silent, f"medseg {command} --help: no help text for {silent}"
