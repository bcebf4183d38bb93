"""Run directories read into one tidy table, one row per run: what ran (teacher, student, method, data set,
recipe), how far it got and its top-1 at the last and best epoch, and the settings it trained with (compared
across the runs of a cell before they are averaged). A directory that cannot be read is named and skipped,
never a traceback over the whole tree."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from common.errors import UserError
from common.lookup import dotted_get
from datasets import DATASETS
from distiller.jobs.run_dir import run_identity
from distiller.results.settings import unpublished_settings

# Keys that change nothing a run trains, so the runs of one cell may differ in them and still be averaged: the
# seed, these, and those a resumed run may change (run_dir.VOLATILE_KEYS: paths, device, threads, logging,
# progress bars, checkpointing frequency, evaluation's batch and precision). Here: the config's name for the
# method (the cell's label says what ran), saving the teacher, loading the data (decoding workers, download,
# checksums), memory layout, the non-finite check, DDP's unused-parameter search, the exact teacher cache and
# the teacher's expected top-1. dataset.root is volatile too: where the folder *is* the data set (an image
# folder), it is part of the cell instead (:func:`data_folder`).
NOT_TRAINING_KEYS = ("seed", "distill.name", "method_label", "save_teacher", "dataset.workers", "dataset.download",
                     "dataset.verify_checksums", "trainer.channels_last", "trainer.nonfinite_check",
                     "trainer.find_unused_parameters", "teacher.cache", "teacher.published_top1")


@dataclass
class Run:
    """What the collector reads from one run directory: one row of the tidy table."""

    run_dir: Path
    kind: str  # "student" (distillation) | "teacher" (plain cross-entropy training of one architecture)
    teacher: str | None
    student: str  # the trained architecture
    method: str  # distill.name (+ combined methods); "ce" for plain training
    seed: int | None
    dataset: str | None
    status: str  # finished | running | failed | no metrics
    final_top1: float | None = None
    best_top1: float | None = None
    final_top5: float | None = None
    best_top5: float | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    hours: float = 0.0  # wall time of the epochs so far (sum of the engine's per-epoch time_s)
    error: str | None = None  # the engine's message for a failed run
    recipe: str | None = None  # how it was trained: epochs, lr and its schedule (:func:`recipe_of_run`)
    unpublished: str | None = None  # why its settings are not its cell's published ones (results.settings)
    data_folder: str | None = None  # the folder that is its data set (an image folder's root), as recorded
    # what decides what it trained (:func:`training_settings`); not a column of the tidy table
    settings: dict[str, Any] = field(default_factory=dict, repr=False)
    teacher_sha256: str | None = field(default=None, repr=False)  # the teacher file a student learnt from


class UnreadableRun(ValueError):
    """A run directory the collector cannot read (a job that failed on a typo, a damaged file): skipped."""


def _load_yaml(run_dir: Path, name: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(run_dir / name), resolve=False)
    except Exception as err:  # noqa: BLE001 - a damaged file makes the run unreadable, named
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise UnreadableRun(f"{name} is unreadable ({why})") from None  # one line: the warning's


def read_config(path: Path) -> dict[str, Any]:
    """The config a run recorded: the engine's ``config.yaml``; for a run that never wrote its metrics (a job
    that died before the engine started), Hydra's ``.hydra/config.yaml``. A run with metrics but without its
    ``config.yaml`` is half-written or damaged: unreadable (its identity would be guessed from Hydra's copy,
    whose interpolations are not resolved)."""
    if (path / "config.yaml").is_file():
        config = _load_yaml(path, "config.yaml")
    elif (path / "metrics.json").is_file():
        raise UnreadableRun("it has metrics.json but no config.yaml (a half-written or damaged run)")
    elif (path / ".hydra" / "config.yaml").is_file():
        config = _load_yaml(path, ".hydra/config.yaml")
    else:
        config = {}
    if config is not None and not isinstance(config, dict):
        raise UnreadableRun(f"its config is a {type(config).__name__}, not a mapping")
    return config or {}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted key -> leaf value (a list is a leaf)."""
    if not isinstance(node, dict) or not node:
        return {prefix[:-1]: node} if prefix else {}
    return {key: leaf for name, child in node.items() for key, leaf in _flatten(child, f"{prefix}{name}.").items()}


# lists whose order trains nothing differently: the lr drops after each milestone, in whatever order they are written
UNORDERED_KEYS = ("schedule.milestones",)


def training_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What decides what a run trained, as dotted key -> value: its config less the keys that change nothing
    trained (:data:`NOT_TRAINING_KEYS`, the seed among them), the lists of :data:`UNORDERED_KEYS` sorted. Runs
    averaged into one cell must agree on all."""
    settings = {key: value for key, value in _flatten(run_identity(config)).items() if key not in NOT_TRAINING_KEYS}
    for key in UNORDERED_KEYS:
        if isinstance(settings.get(key), list):
            settings[key] = sorted(settings[key])
    return settings


def shown_setting(settings: dict[str, Any], key: str) -> str:
    """One of a run's :func:`training_settings` as a message shows it (``unset`` where the run lacks it)."""
    if key not in settings:
        return "unset"
    value = settings[key]
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else _short(value)


def data_folder(config: dict[str, Any]) -> str | None:
    """The folder a run's data set *is* (the root of an image folder: another folder is another data set),
    normalised as recorded; None for a data set the root only locates (CIFAR-100 wherever its files lie)."""
    name, root = dotted_get(config, "dataset.name"), dotted_get(config, "dataset.root")
    if root is None or name not in DATASETS or not DATASETS.metadata(name).get("teachers_per_root"):
        return None
    return os.path.normpath(os.path.expanduser(str(root)))


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run (its metrics or its config)."""
    return (path / "metrics.json").is_file() or (path / "config.yaml").is_file() \
        or (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(inputs: Iterable[str]) -> list[Path]:
    """Run directories named by, or found below, the inputs (paths or glob patterns)."""
    found: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise UserError(f"no files match '{item}'")
        for match in matches:
            root = Path(match)
            if not root.exists():
                raise UserError(f"'{root}' does not exist; give run directories, multirun folders or globs")
            if is_run_dir(root):
                found.append(root)
                continue
            for dirpath, dirnames, _ in os.walk(root):
                # hidden folders (.hydra, .submitit) and runs moved aside by trainer.force are not runs
                dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "replaced-", "tensorboard")))
                here = Path(dirpath)
                if here != root and is_run_dir(here):
                    found.append(here)
                    dirnames[:] = []
    return list(dict.fromkeys(p.resolve() for p in found))




def variant_label(method: str, config: dict[str, Any]) -> str:
    """The method's label with the switches that make it another published method: ``kd`` run with
    ``distill.logit_standardize=true`` is ``kd_ls`` (the LS paper's KD+LS), with ``optim=dot`` ``kd_dot``."""
    name, *combined = method.split("+")
    if dotted_get(config, "distill.logit_standardize") is True and not name.endswith("_ls"):
        name += "_ls"
    if dotted_get(config, "optim.name") == "dot" and not name.endswith("_dot"):
        name += "_dot"
    return "+".join([name, *combined])


def _numeric(value: Any, what: str, kind: type = float) -> Any:
    """``value`` as a ``kind`` (None stays None); anything else makes the run unreadable, named."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise UnreadableRun(f"{what}={value!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def recipe_of_run(config: dict[str, Any]) -> str | None:
    """The training recipe a run's config records, e.g. ``240 ep, lr 0.05, step x0.1 at 150/180/210``.

    Runs of one cell with different recipes must not be averaged (:func:`check_recipes`). None when
    the config records none of epochs, lr and schedule.
    """
    epochs, lr = dotted_get(config, "trainer.epochs"), dotted_get(config, "optim.lr")
    milestones, decay = dotted_get(config, "schedule.milestones"), dotted_get(config, "schedule.gamma")
    schedule = [_short(dotted_get(config, "schedule.name") or ""), "" if decay is None else f"x{_short(decay)}",
                f"at {'/'.join(str(m) for m in milestones)}" if isinstance(milestones, list) and milestones else ""]
    parts = ["" if epochs is None else f"{epochs} ep",
             "" if lr is None or "${" in str(lr) else f"lr {_short(lr)}",  # Hydra's copy keeps ${...} unresolved
             " ".join(x for x in schedule if x)]
    return ", ".join(x for x in parts if x) or None


def read_run(path: Path) -> Run:
    """Identity from the run's config (:func:`read_config`), results from ``metrics.json``. Raises
    :class:`UnreadableRun` naming what is wrong (then it is skipped)."""
    metrics: dict[str, Any] = {}
    metrics_file = path / "metrics.json"
    status = "no metrics"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as err:
            raise UnreadableRun(f"metrics.json is unreadable ({err})") from None
        if not isinstance(metrics, dict):
            raise UnreadableRun("metrics.json is not a JSON object")
        status = str(metrics.get("status", "running"))
    config = read_config(path)
    if dotted_get(config, "teacher.name") is not None or metrics.get("kind") == "student":
        kind = "student"
        teacher = dotted_get(config, "teacher.name") or metrics.get("teacher")
        student = dotted_get(config, "student.name") or metrics.get("student")
        # the objective's label as in the run directory: distill.name, "+<key>" per combined method
        method = dotted_get(config, "method_label")
        if not isinstance(method, str) or "${" in method:  # Hydra's copy keeps it unresolved
            method = metrics.get("method")
        if method is None:
            combine = dotted_get(config, "combine") or {}
            method = "+".join([str(dotted_get(config, "distill.name")), *sorted(str(k) for k in combine)])
        method = variant_label(str(method), config)
    else:
        kind, teacher, method = "teacher", None, "ce"
        student = dotted_get(config, "model.name") or metrics.get("arch")
    if student is None:
        raise UnreadableRun("neither its config nor its metrics.json names the trained architecture")
    seed = dotted_get(config, "seed")
    seed = _numeric(metrics.get("seed") if seed is None else seed, "seed", int)
    planned = dotted_get(config, "trainer.epochs")
    history = metrics.get("epochs") or []
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise UnreadableRun("metrics.json's 'epochs' is not a list of per-epoch records")
    top5 = [_numeric(e["test_top5"], "test_top5") for e in history if e.get("test_top5") is not None]
    return Run(
        run_dir=path, kind=kind, teacher=None if teacher is None else str(teacher), student=str(student),
        method=str(method), seed=seed,
        dataset=dotted_get(config, "dataset.name") or metrics.get("dataset"), status=status,
        final_top1=_numeric(metrics.get("final_top1"), "final_top1"),
        best_top1=_numeric(metrics.get("best_top1"), "best_top1"),
        final_top5=_numeric(metrics.get("final_top5"), "final_top5"), best_top5=max(top5) if top5 else None,
        epochs_done=len(history), epochs_planned=planned if isinstance(planned, int) else None,
        hours=sum(_numeric(e.get("time_s") or 0.0, "time_s") for e in history) / 3600.0, error=metrics.get("error"),
        recipe=recipe_of_run(config),
        unpublished=unpublished_settings(str(method), teacher, str(student), config) if kind == "student" else None,
        data_folder=data_folder(config), settings=training_settings(config),
        teacher_sha256=metrics.get("teacher_sha256") if isinstance(metrics.get("teacher_sha256"), str) else None)


def read_runs(paths: Iterable[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The readable runs, and (directory, why) for each one skipped."""
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(read_run(path))
        except UnreadableRun as err:
            skipped.append((path, str(err)))
    return runs, skipped


def runs_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """The tidy table: one row per run directory (its settings stay on the :class:`Run`)."""
    columns = [f.name for f in fields(Run) if f.name not in ("settings", "teacher_sha256")]
    frame = pd.DataFrame([{k: v for k, v in asdict(r).items() if k in columns} for r in runs], columns=columns)
    frame["run_dir"] = frame["run_dir"].astype(str)
    return frame.astype({"seed": "Int64", "epochs_planned": "Int64", "epochs_done": int, "hours": float,
                         "final_top1": float, "best_top1": float, "final_top5": float, "best_top5": float})
