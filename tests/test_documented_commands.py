"""Every training command the README and docs/ show passes what its entry point checks before a run starts.

The command lines are read from the ``bash`` blocks of ``README.md`` and ``docs/*.md``
(``train_student.py`` / ``train_teacher.py`` by ``.venv/bin/python``, ``python`` or ``torchrun``;
continuation lines joined) and go through the entry point's own preflight as typed: composition,
the schema, the objective, every value of a sweep. Running them is the other tests' business (the
demo, the pairs, the sweeps); this one catches a document that names a key, a group or a value the
configs no longer have, which is what a rename leaves behind.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO

from distiller.config.preflight import preflight

# optional VAR=value settings, then the interpreter or torchrun with its options, then the entry point
ENTRY = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:\.venv/bin/python|python3?|torchrun(?: --\S+)*) "
                   r"(train_student|train_teacher)\.py\b(.*)$")
DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
# the README's stand-in for a user's own network, replaced by the tests' own (its constructor takes width too)
STAND_INS = {"mypkg.nets.MyNet": "tests.external_nets.TinyNet"}


def documented_commands(document: str) -> list[tuple[str, str, list[str]]]:
    """(where, entry point, overrides) of each training command in the bash blocks of ``document``.

    ``a && b`` are two commands; ``$NAME`` is replaced by a ``NAME="..."`` line of the same block.
    """
    lines = (REPO / document).read_text().splitlines()
    found, inside, number, pending, variables = [], False, 0, "", {}
    for i, line in enumerate(lines, start=1):
        if line.startswith("```"):
            inside, variables = (line.strip() == "```bash" if not inside else False), {}
            continue
        if not inside:
            continue
        if not pending:
            number = i
        pending += line.rstrip("\\").strip() + " "
        if line.rstrip().endswith("\\"):
            continue
        text, pending = pending.split(" #")[0].strip(), ""
        assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', text)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        text = re.sub(r"\$([A-Z_]+)", lambda m, known=variables: known.get(m.group(1), m.group(0)), text)
        for command in text.split(" && "):
            match = ENTRY.match(command.strip())
            if match:
                found.append((f"{document}:{number}", match.group(1), shlex.split(match.group(2))))
    return found


COMMANDS = [command for document in DOCUMENTS for command in documented_commands(document)]


def test_the_readme_shows_commands_of_both_entry_points() -> None:
    assert {entry for where, entry, _ in COMMANDS if where.startswith("README")} == {"train_student", "train_teacher"}


@pytest.mark.parametrize("entry, args", [(e, a) for _, e, a in COMMANDS], ids=[where for where, _, _ in COMMANDS])
def test_a_documented_command_passes_the_entry_points_preflight(capsys, monkeypatch, tmp_path: Path, entry: str,
                                                                 args: list[str]) -> None:
    """As typed (paths with ``~`` too): the entry point's own preflight, a sweep at every value of each swept key."""
    monkeypatch.chdir(tmp_path)  # where the run directories would be
    try:
        preflight(entry, [_with_stand_in(arg) for arg in args])
    except SystemExit:
        pytest.fail(capsys.readouterr().err.strip())


def _with_stand_in(arg: str) -> str:
    key, _, value = arg.partition("=")
    return f"{key}={STAND_INS[value]}" if value in STAND_INS else arg
