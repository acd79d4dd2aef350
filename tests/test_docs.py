"""The reference docs name every CLI option and every workflow key the code accepts."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from medseg.cli import _parser
from medseg.config import Workflow

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def _workflow_sections() -> dict[str, list[str]]:
    sections = typing.get_type_hints(Workflow)  # the config module's annotations are strings
    return {name: [key.name for key in dataclasses.fields(kind)]
            for name, kind in sections.items() if dataclasses.is_dataclass(kind)}


def _docs_section(text: str, heading: str) -> str:
    """The text under `## `heading`` up to the next level-2 heading."""
    match = re.search(rf"^## `{re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs has no section for {heading}"
    return match.group(1)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_cli_reference_names_every_option(command):
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    documented = "".join(re.findall(rf"^## `medseg {command}\b.*?(?=^## |\Z)", text, re.M | re.S))
    assert documented, f"docs/cli.md has no section for medseg {command}"
    options = {flag for action in _subcommands()[command]._actions
               for flag in action.option_strings if flag.startswith("--")}
    missing = sorted(flag for flag in options - {"--help"} if flag not in documented
                     and flag != "--debug")  # --debug is documented once for all commands
    assert not missing, f"docs/cli.md, medseg {command}: {missing}"


@pytest.mark.parametrize("section", sorted(_workflow_sections()))
def test_workflow_reference_names_every_key(section):
    documented = _docs_section((DOCS / "workflows.md").read_text(encoding="utf-8"), section)
    missing = [key for key in _workflow_sections()[section] if f"`{key}`" not in documented]
    assert not missing, f"docs/workflows.md, {section}: {missing}"


def _documented_defaults(section: str) -> dict[str, str]:
    """{key: default as written} from the rows of a section's table in workflows.md
    (`| `a`, `b` | `1`, `2` | meaning |`); a default written in words is left out."""
    documented = _docs_section((DOCS / "workflows.md").read_text(encoding="utf-8"), section)
    defaults = {}
    for row in re.findall(r"^\| (`.*?) \| (.*?) \|", documented, re.M):
        keys, values = re.findall(r"`([^`]+)`", row[0]), re.findall(r"`([^`]+)`", row[1])
        if values:
            assert len(keys) == len(values), f"docs/workflows.md, {section}: {row}"
            defaults.update(zip(keys, values, strict=True))
    return defaults


def _as_written(text: str):
    value = yaml.safe_load(text)
    try:  # YAML 1.1 reads 3e-5 (no dot) as text
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@pytest.mark.parametrize("section", sorted(_workflow_sections()))
def test_workflow_reference_gives_the_code_defaults(section):
    defaults = getattr(Workflow(), section)
    wrong = {key: (text, getattr(defaults, key))
             for key, text in _documented_defaults(section).items()
             if _as_written(text) != getattr(defaults, key)}
    assert not wrong, f"docs/workflows.md, {section} (documented, code): {wrong}"


def _readme_commands() -> list[str]:
    """The medseg command lines of README.md's code blocks (continuations joined,
    comments cut)."""
    text = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"(?:^medseg|-m medseg\.cli) (.*?)(?:\s+#.*)?$", line.strip())
            if match:
                lines.append(match.group(1))
    return lines


def test_readme_commands_parse():
    """Every command of the README's tour is one medseg's parser takes as written."""
    assert len(_readme_commands()) >= 10
    for command in _readme_commands():
        try:
            _parser().parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"README.md: `medseg {command}` is refused by medseg's parser")
