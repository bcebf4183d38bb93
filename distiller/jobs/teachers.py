"""The teacher index: what each stored teacher is, checked before a student learns from it.

``train_teacher.py`` stores a finished teacher as ``<teacher_dir>/<arch>.pt`` and records it in
``<teacher_dir>/index.json``: architecture, data set (and, for an image folder, its resolved
``data_root``), sha256 of the file, the test accuracy measured when it was stored, the recipe
(epochs, lr, batch, seed, ...), the date and the run directory. ``train_student.py`` checks a
teacher file against the index of its folder before loading it: a file that changed since it was
indexed, or that was indexed as another architecture, is a one-line error saying how to fix it;
a file the index does not know (a downloaded pretrained teacher) loads as before, with a log
line. A student records the sha256 of its teacher file in its checkpoints and resumes only with
that file (:func:`resumed_teacher_change`). ``scripts/teachers.py`` lists the index and adds
downloaded files to it.

Why a sha256 and not the accuracy: re-evaluating a teacher costs a pass over the test set, while
hashing a 30 MB file costs a fraction of a second and catches any change, including a swapped
file of the same architecture.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from common.errors import UserError
from common.files import atomic_write, file_sha256
from common.lookup import dotted_get
from distiller.jobs.downloads import check_name_hash
from models.external import label_choice

log = logging.getLogger("distiller")

INDEX_NAME = "index.json"
INDEX_FORMAT = 1


# ---- the index file -------------------------------------------------------------------------------
def index_path(folder: str | Path) -> Path:
    return Path(folder) / INDEX_NAME


def read_index(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The entries of ``folder``'s index, by file name (empty when there is no index)."""
    path = index_path(folder)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["teachers"]
        if not isinstance(entries, dict):
            raise TypeError("'teachers' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"the teacher index {path} is unreadable ({err}); move it aside and re-index the teachers "
                        f"with `python scripts/teachers.py add FILE model=ARCH`") from None
    for name, entry in entries.items():  # an entry edited by hand: its facts would be advice to the user
        damage = _entry_damage(entry)
        if damage:
            raise UserError(f"the teacher index {path} has a damaged entry for {name} ({damage}); delete that entry "
                            f"and index the file again with `python scripts/teachers.py add {Path(folder) / name} "
                            f"model=ARCH dataset=NAME`")
    return entries


def _entry_damage(entry: Any) -> str | None:
    """What makes an index entry unusable (None: nothing): not a mapping, an architecture that is no name, a
    sha256 that is no hex digest."""
    if not isinstance(entry, dict):
        return "not a mapping"
    if not isinstance(entry.get("arch"), str) or not entry["arch"]:
        return f"arch {entry.get('arch')!r} is not a network's name"
    sha = entry.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return f"sha256 {sha!r} is not a sha256 digest"
    return None


@contextlib.contextmanager
def locked_index(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s index lock: teachers trained in parallel (a sweep) update one index in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{INDEX_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_index(folder: str | Path, change: Callable[[dict[str, dict[str, Any]]], None]) -> None:
    """Read the index, apply ``change`` to its entries in place, write it back atomically (under the lock)."""
    folder = Path(folder)
    with locked_index(folder):
        entries = read_index(folder)
        change(entries)
        atomic_write({"format": INDEX_FORMAT, "teachers": dict(sorted(entries.items()))}, index_path(folder), "json")


# the recipe's facts of the data (a generated set's sizes and seed): what ``add`` may be told and must not contradict
DATA_RECIPE_KEYS = {"train_size": "dataset.train_size", "test_size": "dataset.test_size", "data_seed": "dataset.seed"}


def recipe_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training recipe of a resolved run config (what a reader needs to judge or redo the teacher)."""
    keys = {"epochs": "trainer.epochs", "optimizer": "optim.name", "lr": "optim.lr", "momentum": "optim.momentum",
            "weight_decay": "optim.weight_decay", "batch_size": "dataset.batch_size",
            "milestones": "schedule.milestones", "lr_decay": "schedule.gamma", "seed": "seed",
            "precision": "trainer.precision", **DATA_RECIPE_KEYS}
    return {name: dotted_get(config, path) for name, path in keys.items() if dotted_get(config, path) is not None}


def make_entry(path: Path, arch: str, dataset: str | None, num_classes: int | None,
               metrics: Mapping[str, Any] | None, recipe: Mapping[str, Any] | None, source: str,
               run_dir: str | None = None, data_root: str | None = None,
               image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """One index entry for the file at ``path`` (hashed now). ``data_root``: the resolved root of a data set
    whose root *is* the data (an image folder, :func:`datasets.base.teachers_data_root`); recorded only there.
    ``image_size``: the (height, width) of the training images, when known."""
    metrics = metrics or {}
    facts = {"data_root": data_root} if data_root is not None else {}
    if image_size is not None:
        facts["image_size"] = [int(s) for s in image_size]
    return {
        "arch": arch, "dataset": dataset, "num_classes": num_classes, "sha256": file_sha256(path),
        "bytes": path.stat().st_size, "test_top1": metrics.get("test_top1"), "test_top5": metrics.get("test_top5"),
        "recipe": dict(recipe or {}), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source, "run_dir": run_dir, **facts,
    }


def indexed_name(folder: Path, sha: str) -> str | None:
    """The name of a file in ``folder`` that its index records with this sha256 and that is there (else None)."""
    return next((name for name, entry in read_index(folder).items()
                 if entry.get("sha256") == sha and (folder / name).is_file()), None)


# ---- a store under way or interrupted (the store itself: distiller/jobs/teacher_store.py) -----
JOURNAL_FORMAT = 1
JOURNAL_SUFFIX = ".storing.json"  # <arch>.pt.storing.json: a store's journal


def journal_path(target: Path) -> Path:
    """The journal of a store into ``target`` (present only while a store is under way or interrupted)."""
    return target.with_name(f"{target.name}{JOURNAL_SUFFIX}")


def pending_store(path: str | Path) -> dict[str, Any] | None:
    """The journal of an interrupted store into ``path`` (None when there is none; a store under way is awaited)."""
    path = Path(path)
    journal = journal_path(path)
    if not journal.exists():
        return None
    with locked_index(path.parent):  # a store in progress holds the lock: wait for it
        if not journal.exists():
            return None
        try:
            return json.loads(journal.read_text())
        except (OSError, ValueError):
            return {}


# ---- loading --------------------------------------------------------------------------------------
def verify_teacher(path: str | Path, arch: str, dataset: str | None = None,
                   data_root: str | None = None, data_facts: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Check ``path`` against its folder's index; returns its entry (None: not indexed, loaded unchecked).

    Raises a one-line :class:`UserError` when the file changed since it was indexed (sha256) or was
    indexed as another architecture; warns when it was trained on another data set, or (``data_root``:
    this run's resolved image folder) on another image folder, or (``data_facts``: this run's
    ``image_size`` [H, W] and ``data_seed``, the generated set's seed) on images of another size or
    another generated set, where its entry records them.
    """
    path = Path(path)
    entry = read_index(path.parent).get(path.name)
    if entry is None:
        check_name_hash(path)
        log.info("teacher %s has no entry in %s (a downloaded teacher?): loading it without a checksum check; "
                 "`python scripts/teachers.py add %s %s` records it", path, index_path(path.parent), path,
                 label_choice(arch, "model"))
        return None
    if entry.get("arch") is not None and str(entry["arch"]).lower() != arch.lower():
        raise UserError(f"teacher checkpoint {path} is indexed as a {entry['arch']} teacher, not {arch}: pass "
                        f"{label_choice(str(entry['arch']))}, or teacher.ckpt=PATH to a {arch} file")
    actual = file_sha256(path)
    if actual != entry.get("sha256"):
        model = label_choice(arch, "model")
        raise UserError(f"teacher checkpoint {path} changed since it was indexed (sha256 {actual[:12]}..., index "
                        f"{str(entry.get('sha256'))[:12]}...): retrain it with `python train_teacher.py {model}`, "
                        f"re-index it with `python scripts/teachers.py add {path} {model}` if the change is "
                        f"intended, or pass teacher.verify=false to load it unchecked")
    if dataset is not None and entry.get("dataset") not in (None, dataset):
        log.warning("teacher %s was trained on %s, this run uses %s", path, entry["dataset"], dataset)
    elif data_root is not None and entry.get("data_root") not in (None, data_root):
        log.warning("teacher %s was trained on the %s data at %s, this run uses %s", path, entry.get("dataset"),
                    entry["data_root"], data_root)
    _warn_other_data(path, entry, data_facts or {})
    log.info("teacher %s matches its index entry (%s, %s, test top-1 %s, stored %s)", path, entry.get("arch"),
             entry.get("dataset"), entry.get("test_top1"), entry.get("date"))
    return entry


def _warn_other_data(path: Path, entry: Mapping[str, Any], facts: Mapping[str, Any]) -> None:
    """Warn where the entry records an image size or generated set (``data_seed``) other than this run's."""
    size, trained_size = facts.get("image_size"), entry.get("image_size")
    if size is not None and trained_size is not None and list(trained_size) != list(size):
        log.warning("teacher %s was trained on %sx%s images, this run's are %sx%s: its predictions are for another "
                    "input size (dataset.image_size)", path, *trained_size, *size)
    seed, trained_seed = facts.get("data_seed"), (entry.get("recipe") or {}).get("data_seed")
    if seed is not None and trained_seed is not None and trained_seed != seed:
        log.warning("teacher %s was trained on the %s set generated with dataset.seed=%s, this run's has "
                    "dataset.seed=%s: other classes, so its predictions are for another data set", path,
                    entry.get("dataset"), trained_seed, seed)


def load_teacher_weights(model: Any, path: str | Path, arch: str, dataset: str | None = None,
                         verify: bool = True, train_overrides: Sequence[str] = (),
                         teacher_dir: str | Path | None = None, data_root: str | None = None,
                         data_facts: Mapping[str, Any] | None = None,
                         model_choice: str | None = None) -> dict[str, Any] | None:
    """Load a teacher file into ``model``, checked against the teacher index first (``verify``).

    Returns the index entry (None when the file is not indexed or ``verify`` is off). ``dataset``,
    ``data_root`` and ``data_facts``: this run's data, compared with the entry's (:func:`verify_teacher`).
    ``train_overrides`` (the run's data set and teacher folder) complete the command a missing file's message suggests;
    ``teacher_dir``: where that command stores the teacher (a missing file elsewhere is not where it goes);
    ``model_choice``: how that command chooses the network (default: from ``arch``, without constructor arguments).
    """
    from distiller.engine.checkpoints import check_file, load_weights

    path = Path(path)
    pending = pending_store(path)
    if pending is not None:  # never the previous teacher in silence: its replacement was being stored
        run = (pending.get("entry") or {}).get("run_dir") or "that trained it"
        raise UserError(f"the store of teacher {path} was interrupted: rerun the train_teacher.py command of the "
                        f"run {run} (it completes the store and trains nothing), or pass teacher.ckpt=PATH to "
                        f"another file")
    if path.is_dir():
        check_file(path, "teacher checkpoint")  # a directory: says so, and names the checkpoints in it
    if not path.is_file():
        command = " ".join(["python train_teacher.py", model_choice or label_choice(arch, "model"), *train_overrides])
        there = teacher_dir is None or path.absolute().parent == Path(teacher_dir).absolute()
        where = ("saved there" if there else
                 f"it stores the teacher in {teacher_dir}, where this command finds it once teacher.ckpt is dropped")
        raise UserError(f"teacher checkpoint not found: {path}. Train it with `{command}` ({where}), or pass "
                        f"teacher.ckpt=PATH to a pretrained {arch} file ({{'model': state_dict}})")
    entry = verify_teacher(path, arch, dataset, data_root, data_facts) if verify else None
    if not verify:
        log.warning("teacher.verify=false: %s is loaded without checking it against the teacher index", path)
    load_weights(model, path, arch, what="teacher checkpoint")
    return entry


def add_teacher(path: str | Path, arch: str, dataset: str | None = None, num_classes: int | None = None,
                metrics: Mapping[str, Any] | None = None, recipe: Mapping[str, Any] | None = None,
                source: str = "added", data_root: str | None = None,
                told_data: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """Index an existing teacher file in its folder's index; returns its entry and whether it is a new one.

    A file whose content the index already knows (this name's entry, or another file's: a copy) keeps
    that entry's facts (run directory, source, accuracies, recipe, date): they describe how the content
    was made, which a later ``add`` cannot know; only facts the entry lacks are filled in. Facts that
    contradict the entry's (another architecture, data set, class count or image folder, or, in
    ``told_data``, the data's sizes and seed the command line set: :data:`DATA_RECIPE_KEYS`) are a one-line
    error, as are ``told_data`` that contradict the file's own record (``recipe``); where neither records
    them, they are recorded. A file that changed since it was indexed gets a new entry (re-indexing it on
    purpose).
    """
    path = Path(path)
    check_name_hash(path)  # a damaged download is refused, never indexed (and so blessed)
    told_data = dict(told_data or {})
    _check_told_data(path, recipe or {}, told_data, "its own record says")
    fresh = make_entry(path, arch, dataset, num_classes, metrics, {**told_data, **(recipe or {})}, source,
                       data_root=data_root)
    result: dict[str, Any] = {}

    def change(entries: dict[str, dict[str, Any]]) -> None:
        own = entries.get(path.name)
        known = own if own is not None and own.get("sha256") == fresh["sha256"] else next(
            (e for name, e in entries.items() if e.get("sha256") == fresh["sha256"] and (path.parent / name).is_file()),
            None)
        if known is None:
            entries[path.name] = result["entry"] = fresh
            return
        _check_same_facts(path, known, fresh)
        _check_told_data(path, known.get("recipe") or {}, told_data, "its index entry says")
        kept = {**known, **{k: v for k, v in fresh.items() if known.get(k) is None and v is not None}}
        entries[path.name] = result["entry"] = kept
        result["kept"] = True

    update_index(path.parent, change)
    return result["entry"], not result.get("kept", False)


def _check_same_facts(path: Path, known: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """One line when ``fresh`` (what ``add`` was told) contradicts ``known`` (the entry of the same content)."""
    fold = lambda key, value: str(value).lower() if key == "arch" else value  # architectures: any case
    differ = [f"{key} {known[key]} (indexed) vs {fresh[key]}" for key in ("arch", "dataset", "num_classes", "data_root")
              if known.get(key) is not None and fresh.get(key) is not None
              and fold(key, known[key]) != fold(key, fresh[key])]
    if differ:
        made = f"source: {known.get('source')}" + (f", run {known['run_dir']}" if known.get("run_dir") else "")
        raise UserError(f"{path} is already indexed with this content ({made}), and its entry says otherwise: "
                        f"{'; '.join(differ)}. The entry is kept; drop the contradicting overrides, or, if the "
                        f"entry is wrong, delete it from {index_path(path.parent)} and add the file again")


def _check_told_data(path: Path, recipe: Mapping[str, Any], told: Mapping[str, Any], where: str) -> None:
    """One line when the data facts the command line set (``told``) contradict those of ``recipe``."""
    differ = [f"{DATA_RECIPE_KEYS[name]}={recipe[name]}, not {value}" for name, value in told.items()
              if recipe.get(name) is not None and recipe[name] != value]
    if differ:
        raise UserError(f"{path} was trained on other data than the command line says ({where} "
                        f"{'; '.join(differ)}): drop those overrides, or give the values it was trained with")


# ---- resuming a student ---------------------------------------------------------------------------
def resumed_teacher_change(checkpoint: Mapping[str, Any], path: str | Path, finished: bool = False) -> str | None:
    """Why a student run may not resume from ``checkpoint`` (its ``last.pt``) with the teacher file at ``path``,
    or, ``finished``, be reported as this command's result: the file's sha256 differs from the one the run
    recorded (one line, with the ways out); None when it is the same file, or when no check is possible
    (``last.pt`` from before teacher hashes were recorded; a missing file or an interrupted store, which
    loading the teacher then reports)."""
    path = Path(path)
    recorded = checkpoint.get("teacher_sha256")
    if recorded is None:
        log.info("last.pt records no sha256 of its teacher file (written before runs recorded it): %s is not "
                 "checked against the teacher this run started with", path)
        return None
    if not path.is_file() or pending_store(path) is not None:
        return None
    actual = file_sha256(path)
    if actual == recorded:
        return None
    kept = indexed_name(path.parent, recorded)
    how = "see its result" if finished else "resume"
    restore = (f"pass teacher.ckpt={path.parent / kept} to {how} with the file it started with (kept there)"
               if kept is not None else f"restore the file it started with (a retrained teacher keeps its "
                                        f"predecessor beside it as {path.name}.<date>.bak) and rerun")
    state = "finished run was trained with" if finished else "run started with"
    return (f"teacher checkpoint {path} is not the file this {state} (sha256 {actual[:12]}..., its "
            f"last.pt records {recorded[:12]}...): {restore}, or pass trainer.force=true to start the run over "
            f"with this teacher (the old files are moved aside, not deleted)")
