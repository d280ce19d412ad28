"""The code blocks of README.md as a user reads them: python snippets, and the shell commands of sh blocks
(continuation lines joined, comments dropped), each with the line it starts on. tests/test_readme.py runs them.

No Markdown test runner on PyPI both runs python fences and checks shell commands against placeholders supplied
by fixtures, so this small collector does the reading; the checks are in test_readme.py."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass(frozen=True)
class Command:
    where: str  # README.md:LINE
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def blocks(path: Path) -> list[Block]:
    found, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if match and language is None:
            language, start, lines = match.group(1) or "text", number, []
        elif line.startswith("```") and language is not None:
            found.append(Block(path, start, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    return found


def commands(block: Block) -> list[Command]:
    """Each command of an sh block; `a && b` gives two."""
    found, pending, first = [], "", None
    for offset, line in enumerate(block.text.splitlines(), start=1):
        if not pending and not line.strip():
            continue
        first = first if pending else block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            found.append(Command(f"{block.path.name}:{first}", tuple(words[:cut])))
            words = words[cut + 1:]
    return found
