"""Storing a finished teacher into its folder: a small transaction that a rerun completes.

"Finished" means stored and indexed. The store copies the run's ``final.pt`` under a temporary
name, records its intent in a journal, keeps the previous file as ``.bak``, swaps the new one in,
updates the index and writes the run's receipt; a kill at any step leaves a journal from which a
rerun completes the store, and a student refuses a teacher file whose store is pending.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from common.errors import UserError
from common.files import atomic_copy, atomic_write, file_sha256, fsync_dir, replace_durably
from common.lookup import dotted_get
from datasets.base import teachers_data_root
from distiller.jobs.teachers import (
    INDEX_FORMAT,
    INDEX_NAME,
    JOURNAL_FORMAT,
    index_path,
    indexed_name,
    journal_path,
    locked_index,
    make_entry,
    read_index,
    recipe_of,
)
from models.external import command_line_choice

log = logging.getLogger("distiller")


# The store of a finished teacher run, in the order its steps happen (``on_step`` runs after each):
# the new file is copied under a temporary name (``copying`` is half-way), the intent is recorded in
# a journal beside it, the previous file moves to ``.bak``, the new one takes its name, the index
# and the run's receipt are written, the journal is removed. Killed anywhere, the folder holds the
# previous teacher (no journal yet) or a journal from which the store completes; a student refuses
# a file whose journal is pending; a rerun of the run completes the store.
STORE_STEPS = ("begin", "copying", "copied", "intent", "backed_up", "swapped", "indexed", "receipt", "done")
RECEIPT_NAME = "teacher.json"  # in the run directory: where its teacher was stored (written by the store)


def new_file(target: Path) -> Path:
    """Where a store copies the new file before it takes ``target``'s name."""
    return target.with_name(f"{target.name}.new")


def _backup_name(target: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, n = target.with_name(f"{target.name}.{stamp}.bak"), 1
    while backup.exists():  # two stores in one second must not share a .bak
        backup, n = target.with_name(f"{target.name}.{stamp}-{n}.bak"), n + 1
    return backup


def _clear_leftovers(folder: Path, target: Path) -> None:
    """Remove temporary files of stores killed before their journal existed (the lock is held)."""
    new_file(target).unlink(missing_ok=True)
    for pattern in (f".{glob.escape(target.name)}.*.tmp", f".{glob.escape(INDEX_NAME)}.*.tmp"):
        for leftover in folder.glob(pattern):  # atomic writes' temporary files (the new file's, the journal's)
            leftover.unlink(missing_ok=True)


def _apply(folder: Path, journal: Mapping[str, Any], step: Callable[[str], None]) -> Path:
    """Carry out a journalled store from wherever it stopped (each action is idempotent); the lock is held."""
    target, new = folder / journal["target"], folder / journal["new"]
    backup = folder / journal["backup"] if journal.get("backup") else None
    entry = journal["entry"]
    if new.exists():
        if backup is not None and target.exists() and not backup.exists():
            replace_durably(target, backup)
        step("backed_up")
        replace_durably(new, target)
    elif not target.is_file() or file_sha256(target) != entry["sha256"]:
        raise UserError(f"the interrupted store of {target} cannot be completed: its new file {new} is gone and "
                        f"{target} is not the file being stored; delete {journal_path(target)} and rerun the "
                        f"train_teacher.py command of the run {entry.get('run_dir')} (it stores its final.pt again)")
    step("swapped")

    def change(entries: dict[str, dict[str, Any]]) -> None:
        if backup is not None and journal.get("old_entry") is not None and backup.exists():
            entries[backup.name] = journal["old_entry"]  # the kept file stays verifiable
        entries[target.name] = dict(entry)

    entries = read_index(folder)
    change(entries)
    atomic_write({"format": INDEX_FORMAT, "teachers": dict(sorted(entries.items()))}, index_path(folder), "json")
    step("indexed")
    receipt = Path(journal["receipt"]) if journal.get("receipt") else None
    if receipt is not None and receipt.parent.is_dir():
        atomic_write({"teacher": str(target), "sha256": entry["sha256"], "index": str(index_path(folder)),
                      "previous": None if backup is None else str(backup), "date": entry["date"]}, receipt, "json")
    step("receipt")
    journal_path(target).unlink(missing_ok=True)
    fsync_dir(folder)
    step("done")
    return target


def _recover(folder: Path, target: Path) -> bool:
    """Complete an interrupted store into ``target`` and clear leftovers (the lock is held); whether one was pending."""
    journal_file = journal_path(target)
    pending = journal_file.exists()
    if pending:
        try:
            journal = json.loads(journal_file.read_text())
            if journal.get("format") != JOURNAL_FORMAT:
                raise ValueError(f"format {journal.get('format')}")
        except (OSError, ValueError) as err:
            raise UserError(f"the journal {journal_file} of an interrupted teacher store is unreadable ({err}); "
                            f"delete it, check {target} with `python scripts/teachers.py check {folder}`, and "
                            f"rerun the teacher run") from None
        _apply(folder, journal, lambda name: None)
        log.warning("completed the interrupted store of %s (from the run %s)", target, journal["entry"].get("run_dir"))
    _clear_leftovers(folder, target)
    return pending


def _store_locked(source: Path, folder: Path, arch: str, dataset: str, metrics: Mapping[str, Any],
                  config: Mapping[str, Any], run_dir: str | Path, step: Callable[[str], None],
                  receipt: bool = True, image_size: Sequence[int] | None = None) -> Path:
    """The store (the lock is held); ``receipt``: write the run's receipt (not for a further copy of a stored run);
    ``image_size``: the (height, width) the network was trained on, when known."""
    from distiller.engine.checkpoints import safe_load

    target = folder / f"{arch}.pt"
    step("begin")
    _recover(folder, target)  # an earlier store into the same file, interrupted, completes first
    header = safe_load(source, "trained network")
    new = new_file(target)
    atomic_copy(source, new, on_block=lambda n: step("copying") if n == 1 else None)
    step("copied")
    entries = read_index(folder)
    backup = _backup_name(target) if target.exists() else None
    journal = {"format": JOURNAL_FORMAT, "target": target.name, "new": new.name,
               "backup": None if backup is None else backup.name, "old_entry": entries.get(target.name),
               "entry": make_entry(new, arch, dataset, header.get("num_classes"), metrics, recipe_of(config),
                                   "train_teacher.py", str(run_dir), data_root=_data_root(dataset, config),
                                   image_size=image_size),
               "receipt": str(Path(run_dir) / RECEIPT_NAME) if receipt else None}
    atomic_write(journal, journal_path(target), "json")
    step("intent")
    if backup is not None:
        log.warning("keeping the previous %s as %s", target, backup)
    return _apply(folder, journal, step)


def _data_root(dataset: str, config: Mapping[str, Any]) -> str | None:
    """The resolved image folder a run's config trained on (None for a data set not kept per root)."""
    root = dotted_get(config, "dataset.root")
    return None if root is None else teachers_data_root(dataset, str(root))


def store_teacher(source: str | Path, folder: str | Path, arch: str, dataset: str, metrics: Mapping[str, Any],
                  config: Mapping[str, Any], run_dir: str | Path,
                  on_step: Callable[[str], None] | None = None, image_size: Sequence[int] | None = None) -> Path:
    """Store the trained network at ``source`` (its ``final.pt``) as ``<folder>/<arch>.pt`` and index it.

    ``image_size``: the (height, width) of the images it was trained on, recorded so that a student run on
    images of another size is warned (:func:`distiller.jobs.teachers.verify_teacher`).

    A previous file is kept as ``<arch>.pt.<date>.bak`` and its index entry moves with it. The store
    is journalled (:data:`STORE_STEPS`; ``on_step(name)`` runs after each, for tests) and ends by
    writing the run's receipt ``<run_dir>/teacher.json``: a run is finished when its receipt exists.
    """
    folder = Path(folder)
    with locked_index(folder):  # one store at a time per folder: the file and its entry change together
        target = _store_locked(Path(source), folder, arch, dataset, metrics, config, run_dir,
                               on_step or (lambda name: None), image_size=image_size)
    node = config.get("model") if isinstance(config.get("model"), Mapping) else {"name": arch}
    log.info("stored the trained model as %s (used by %s), indexed in %s", target, command_line_choice(node),
             index_path(folder))
    return target


def check_teacher_dir(folder: Path, arch: str) -> None:
    """Before training: ``teacher_dir`` is a folder this process can write (or create), with a readable index.

    So that a run never trains for hours and then fails to store its teacher.
    """
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies inside {existing}, which is a file"
        raise UserError(f"teacher_dir={folder} {where}, not a folder: pass teacher_dir=DIR naming a folder "
                        f"(created if missing), or save_teacher=false to keep the teacher only in the run directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"teacher_dir={folder}: {existing} is not writable: pass teacher_dir=DIR naming a folder "
                        f"you can write, or save_teacher=false")
    target = folder / f"{arch}.pt"
    if target.exists() and not target.is_file():
        raise UserError(f"{target} is a folder, so the trained {arch} cannot be stored there: move it away, or "
                        f"pass another teacher_dir=DIR")
    read_index(folder)  # an unreadable index is a one-line error now, not after training


def _receipt_folder(run_dir: Path) -> Path | None:
    """The folder the run's receipt says its teacher was stored in (None: no readable receipt)."""
    try:
        return Path(json.loads((run_dir / RECEIPT_NAME).read_text())["teacher"]).resolve().parent
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stored_in(run_dir: Path, folder: Path) -> bool:
    """Whether the run's receipt says its teacher was stored in ``folder``."""
    return _receipt_folder(run_dir) == folder.resolve()


def prepare_store(folder: str | Path, run_dir: str | Path, arch: str, dataset: str, config: Mapping[str, Any],
                  finished: bool) -> None:
    """Before a teacher run (``save_teacher``): check ``teacher_dir``; complete a ``finished`` run's store.

    "Finished" means trained, stored and indexed in ``teacher_dir``: a run whose store was interrupted
    (killed) has no receipt, so its rerun completes the journalled store, or stores its ``final.pt``
    (rebuilt from ``last.pt`` if the kill came before it was written). A run stored by a version that
    wrote no receipt is recognised by its file's sha256 in the index, and not stored again. A run stored
    in another folder (its rerun names another ``teacher_dir``) is stored in this one too, unless this
    folder's index already holds its file; its receipt keeps naming the first store.
    """
    folder, run_dir = Path(folder), Path(run_dir)
    check_teacher_dir(folder, arch)
    target = folder / f"{arch}.pt"
    if not finished or (_stored_in(run_dir, folder) and not journal_path(target).exists()):
        return
    from distiller.engine.checkpoints import safe_load, slim_from_last

    with locked_index(folder):
        if _recover(folder, target):
            print(f"completed the interrupted store of {target}")
        if _stored_in(run_dir, folder):  # stored (now, or before)
            return
        earlier = _receipt_folder(run_dir)
        last = safe_load(run_dir / "last.pt", "checkpoint")
        final = run_dir / "final.pt"
        if not final.is_file():  # killed between the last epoch and final.pt
            atomic_write(slim_from_last(last), final)
        sha = file_sha256(final)
        stored = indexed_name(folder, sha)
        if stored is not None:
            if earlier is None:  # stored before receipts existed
                atomic_write({"teacher": str(folder / stored), "sha256": sha, "index": str(index_path(folder)),
                              "previous": None, "date": None}, run_dir / RECEIPT_NAME, "json")
            return
        history = last["run"]["history"]
        _store_locked(final, folder, arch, dataset, history[-1] if history else {}, config, run_dir,
                      lambda name: None, receipt=earlier is None)
    print(f"stored the finished run's teacher as {target} " +
          ("(its earlier store was interrupted)" if earlier is None else
           f"(it was stored in {earlier} before; teacher_dir={folder} did not hold it)"))
