"""Docs that cannot drift: every `ganymede*` command in README.md and docs/*.md is checked against its --help.

A command is a line of a ```sh block, or an inline code span that starts with
one of the installed commands (setup.py's entry points). Its subcommands must
exist (`… --help` exits 0) and every option it uses must appear in that help.
The exit-code tables of README.md and docs/operations.md must say what the
code's table says.
"""
import glob
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

from ganymede.runs import EXIT_CODES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
PROGRAMS = set(re.findall(r'"(ganymede[\w-]*)=', open(os.path.join(REPO, "setup.py")).read()))


def sh_lines(text):
    """Lines of ```sh blocks, continuations joined, comments dropped."""
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def inline_commands(text):
    for span in re.findall(r"`([^`\n]+)`", text):
        if span.split(" ")[0] in PROGRAMS:
            yield span


def command_of(line):
    """(program, [words]) of a doc line that runs one of ours, else None."""
    try:
        words = shlex.split(line.replace("\\|", " "))
    except ValueError:
        words = line.split()
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("sudo", "-u", "stats", "$")):
        words = words[1:]
    if words and words[0] in PROGRAMS:
        return words[0], words[1:]
    return None


def doc_commands():
    found = []
    for path in DOCS:
        text = open(path).read()
        for line in list(sh_lines(text)) + list(inline_commands(text)):
            parsed = command_of(line)
            if parsed:
                found.append((os.path.relpath(path, REPO), line, *parsed))
    return found


@lru_cache(maxsize=None)
def help_text(program, path):
    result = subprocess.run([os.path.join(BIN, program), *path, "--help"], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, LUIGI_CONFIG_PATH=os.devnull))
    return result.returncode, result.stdout


def test_the_docs_hold_commands_of_every_kind():
    programs = {program for _, _, program, _ in doc_commands()}
    assert {"ganymede", "ganymede-hourly-backup", "ganymede-agent", "ganymede-worker"} <= programs


@pytest.mark.parametrize("doc, line, program, words", doc_commands(),
                         ids=lambda value: value if isinstance(value, str) and len(value) < 60 else None)
def test_each_doc_command_matches_its_help(doc, line, program, words):
    path = []
    for word in words:
        if not re.match(r"^[a-z][a-z0-9-]*$", word) or program != "ganymede":
            break
        path.append(word)
    code, text = help_text(program, tuple(path))
    assert code == 0, f"{doc}: `{line}`: `{program} {' '.join(path)}` is not a command"
    for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", " ".join(words)):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
            f"{doc}: `{line}`: {program} {' '.join(path)} has no option {option}"


def table_rows(path):
    """(code, meaning) rows of the doc's exit-code table (the table right after a `| code | meaning` header)."""
    text = open(os.path.join(REPO, path)).read()
    table = re.search(r"^\| code \| meaning \|.*?\n\|[-| ]+\|\n((?:\|.*\|\n)+)", text, re.M)
    assert table, f"{path} has no exit-code table"
    return [(int(cells[0]), cells[1]) for cells in
            ([c.strip() for c in row.strip().strip("|").split("|")] for row in table.group(1).splitlines())]


@pytest.mark.parametrize("path", ["README.md", "docs/operations.md"])
def test_exit_code_tables_say_what_the_code_says(path):
    assert table_rows(path) == list(EXIT_CODES)
