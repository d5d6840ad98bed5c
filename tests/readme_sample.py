"""README's "What the first run prints and where it goes": its sample console output and run-folder listing,
read from README.md, to compare with a real `launch.pretrain` run (tests/launch/test_pretrain.py).

A console line's shape is the line with every number (7.3166, 1.33e-03, 1.3k, 60) written N and every
absolute path written PATH: two runs of one experiment print lines of the same shapes."""
import os
import re

import repo

README = os.path.join(repo.ROOT, "README.md")
SECTION = "## What the first run prints and where it goes"

_NUMBER = re.compile(r"(?<!\w)\d+(?:\.\d+)?(?:e[+-]?\d+)?[kM]?(?!\w)")
_PATH = re.compile(r"(?<!\S)/[^\s;,]+")


def _blocks() -> list[list[str]]:
    """The fenced blocks of README's first-run section, as lists of lines."""
    text = open(README).read()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return [b.strip("\n").splitlines() for b in section.split("```")[1::2]]


def console_lines() -> list[str]:
    """README's sample output, without its "..." elisions."""
    return [line for line in _blocks()[0] if line != "..."]


def folder_entries() -> set[str]:
    """The names README's run-folder listing shows ("checkpoints/<step>/" -> "checkpoints")."""
    names = set()
    for line in _blocks()[1]:
        listed = re.split(r"\s{2,}", line, maxsplit=1)[0]
        names |= {n.split("/")[0] for n in listed.split(", ")}
    return names


def shape(line: str) -> str:
    return _NUMBER.sub("N", _PATH.sub("PATH", line))
