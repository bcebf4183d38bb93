"""The layout the architecture keeps (docs/extending.md): small modules, one stem per file, no path hacks.

These are the measured limits the reshaping of ``distiller/`` was held to; a module that grows past them is
split by role, not let grow. Read from the files themselves, so a new module is covered with no change here.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("distiller", "models", "datasets", "common")
MODULE_LIMIT = 350  # lines of a module of the packages
SCRIPT_LIMIT = 400  # lines of a command file in scripts/
LONGER_ALLOWED = {"distiller/functional.py"}  # the pinned pure functions, one place by design
TOP_LEVEL_LIMIT = 12  # Python modules directly in distiller/


def _python_files(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_of_the_packages_outgrows_the_limit() -> None:
    long = {p.relative_to(REPO).as_posix(): _lines(p) for folder in PACKAGES for p in _python_files(folder)}
    over = {path: n for path, n in long.items() if n > MODULE_LIMIT and path not in LONGER_ALLOWED}
    assert not over, f"split these by role (limit {MODULE_LIMIT} lines): {over}"


def test_no_script_outgrows_the_limit() -> None:
    over = {p.name: _lines(p) for p in _python_files("scripts") if _lines(p) > SCRIPT_LIMIT}
    assert not over, f"move the work into the package, keep the command file thin (limit {SCRIPT_LIMIT}): {over}"


def test_the_distillation_core_stays_small_at_the_top() -> None:
    top = [p.name for p in (REPO / "distiller").glob("*.py")]
    assert len(top) <= TOP_LEVEL_LIMIT, sorted(top)


def test_no_two_files_of_distiller_share_a_stem() -> None:
    stems = Counter(p.stem for p in _python_files("distiller") if p.stem != "__init__")
    assert not [stem for stem, n in stems.items() if n > 1], sorted(s for s, n in stems.items() if n > 1)


def test_no_path_edits_and_no_conftest_imports() -> None:
    """Scripts import the package (installed editable), tests their plain helpers module; only the stand-in for
    ``python script.py`` in tests/helpers.py puts a script's folder first on the path, as Python does."""
    edits = [p.relative_to(REPO).as_posix() for folder in (*PACKAGES, "scripts", "tests")
             for p in _python_files(folder)
             if re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", p.read_text(encoding="utf-8"))]
    assert edits == ["tests/helpers.py"]
    importing = [p.name for p in _python_files("tests")
                 if re.search(r"^\s*(from conftest import|import conftest)", p.read_text(encoding="utf-8"), re.M)]
    assert not importing


def test_the_objective_reads_no_signatures() -> None:
    """A method declares what it does to logits; the objective does not sniff ``forward``'s keywords."""
    assert "inspect.signature" not in (REPO / "distiller" / "objective.py").read_text(encoding="utf-8")


def _layout_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Layout")
    return readme[start:readme.index("```", readme.index("```", start) + 3)]


def test_the_readme_layout_names_every_module() -> None:
    """Every module of the packages and every script is named in the README's layout, except the files a
    registry collects one by one (a method, a model family: ``@METHODS.register`` / ``@MODELS.register``) and
    the GPU check's steps, which the layout names as a group."""
    block = _layout_block()
    grouped = re.compile(r"@(METHODS|MODELS)\.register\(")
    unnamed = [p.relative_to(REPO).as_posix() for folder in (*PACKAGES, "scripts") for p in _python_files(folder)
               if p.name != "__init__.py" and "gpu_check" not in p.parts
               and not grouped.search(p.read_text(encoding="utf-8")) and p.name not in block]
    assert not unnamed, f"name these in README.md's Layout: {unnamed}"
