"""Every `phi3v ...` command shown in the README and the guides in docs/ parses with the real CLI parser.

(The guides' own tests check more of their commands with `documented_commands`; docs/train.md's overrides are
checked against the configs in test_configs; the README's offline lines run in test_readme.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from phi3v.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")))


def documented_commands(text: str) -> list[list[str]]:
    """The `phi3v` command lines of the markdown's shell blocks: continuations joined, comments and `&&` split."""
    commands = []
    fences = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    for block in (body for language, body in fences if language in ("", "bash", "sh")):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in line.split(" #")[0].split("&&"):
                if part.strip().startswith("phi3v "):
                    commands.append(shlex.split(part)[1:])
    return commands


@pytest.mark.parametrize("name", DOCS)
def test_documented_commands_parse(name):
    commands = documented_commands((ROOT / name).read_text())
    assert len(commands) >= (0 if name == "docs/architecture.md" else 2), f"{name} lost its phi3v commands"
    parser = build_parser()
    for command in commands:
        args, extra = parser.parse_known_args(command)
        # only train (config overrides) and predict (inputs after options) take extra words
        assert not extra or getattr(args, "takes_overrides", False), f"{name}: {shlex.join(command)}: {extra}"


def test_every_command_has_a_guide_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    for name in ("prepare", "train", "evaluate", "predict", "serve", "export", "demo"):
        assert name in commands.choices
        assert f"(docs/{name}.md)" in readme and (ROOT / "docs" / f"{name}.md").is_file(), name
    assert "(docs/architecture.md)" in readme
