"""Turn run directories into the paper tables: our mean ± std over seeds next to the published numbers.

    python scripts/collect_results.py runs/                       # everything under runs/
    python scripts/collect_results.py runs/student 'runs/teacher/*/seed*' --table crd_table1
    python scripts/collect_results.py runs/ --out results/dkd --table dkd_same_arch --table dkd_cross_arch
    python scripts/collect_results.py runs/student --out results/new --sources post_dkd --table lskd_same_arch

Reads any set of run directories (a multirun folder, a glob, single runs) into one tidy table, one
row per run, and groups it per data set (never averaged across): student runs by (teacher, student,
method), plain cross-entropy runs (``train_teacher.py``) by architecture; the runs of one group must
share one recipe (epochs, lr, schedule), else it is refused in one line. Both evaluation protocols
are reported: top-1 of the last epoch (the CRD tables) and of the best epoch (the DKD tables), mean
± sample std over finished seeds and the number of runs. Each published source is placed beside the
protocol it used, with the difference ours - published. A pair's ``teacher`` and ``student`` rows
are the plain cross-entropy runs of those architectures, when they are among the inputs. Runs that
are not finished (still training, stopped, failed) are counted and listed, never silently dropped; a
directory that cannot be read (a sweep job that died on a typo) is skipped with a warning naming it.

The post-DKD methods (DIST, LS, CTKD, MLKD, DOT, WTTM/TTM, NKD; source ``post_dkd``) were published
under different recipes, so each of their published numbers carries its recipe: epochs, views per
step, augmentation, and best or last epoch (MLKD: 480 or 960 epochs, 2 views with RandAugment +
Cutout, best epoch). Runs with ``distill.logit_standardize=true`` or ``optim=dot`` are grouped as
their own method (``kd_ls``, ``kd_dot``, ...), like the ``kd_ls`` / ``experiment=new_methods_table_dot``
presets name them. The methods of 2023-2026 (source ``methods_2025``) likewise: SKD's and WKD's numbers
say what their recipe changed and which 'paper' preset re-runs it; a number quoted by a secondary source
says so (it backs no paper preset).

Writes ``<out>.md`` (Markdown, also printed), ``<out>.csv`` (the summary, one row per table cell),
``<out>_runs.csv`` (the tidy per-run table: ``pandas.read_csv`` it for your own analysis) and
``<out>.png`` (per pair: our accuracy vs published, per method).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from common.errors import UserError
from common.lookup import dotted_get

PAPER_TABLES = Path(__file__).resolve().parent / "paper_tables"


@dataclass(frozen=True)
class Source:
    """One file of published numbers and the evaluation protocol behind them."""

    key: str
    file: str
    label: str
    protocol: str  # "last" | "best": the protocol its numbers are compared under
    recipes: bool = False  # the file's rows differ in recipe: show each number's recipe beside it


SOURCES: dict[str, Source] = {
    # the ImageNet and Tiny-ImageNet tables (per-row protocol; not in the shared notes): --sources imagenet
    "imagenet": Source("imagenet", "imagenet_tables.csv", "ImageNet papers", "best"),
    "crd": Source("crd", "crd_paper_repdistiller_readme.csv", "CRD paper", "last"),
    "dkd": Source("dkd", "dkd_paper.csv", "DKD paper", "best"),
    "mdistiller": Source("mdistiller", "mdistiller_readme.csv", "mdistiller README", "best"),
    # per-row protocol in the file (best, or unstated where the authors' code tracks the best epoch)
    "post_dkd": Source("post_dkd", "post_dkd_methods.csv", "post-DKD papers", "best", recipes=True),
    # the methods of 2023-2026 (METHODS_2025_*.md): the authors' trainers keep the best epoch
    "methods_2025": Source("methods_2025", "methods_2025.csv", "2023-26 papers", "best", recipes=True),
}
DEFAULT_SOURCES = ("crd", "dkd", "post_dkd")

# The papers' method names -> our config names (configs/distill/<name>.yaml). Explicit on purpose:
# a new spelling in a data file must be added here, not guessed.
PAPER_METHOD_NAMES: dict[str, str] = {
    "teacher": "teacher", "student": "student",
    "KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
    "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd", "CRD+KD": "crd_kd",
    "OFD": "ofd", "ReviewKD": "reviewkd", "DKD": "dkd", "KDSVD": "kdsvd",
    "KD+DOT": "kd_dot",  # KD trained with the DOT optimizer (experiment=new_methods_table_dot)
    "DIST": "dist", "KD+LS": "kd_ls", "DKD+LS": "dkd_ls", "CTKD": "ctkd", "CTKD+LS": "ctkd_ls", "MLKD": "mlkd",
    "MLKD+LS": "mlkd_ls", "TTM": "ttm", "WTTM": "wttm", "WTTM+CRD": "wttm+crd", "NKD": "nkd",
    # the methods of 2023-2026 (EA-FCFD and EA-MLD+LS have no config here: FCFD and EA on MLKD are not implemented)
    "RLD": "rld", "LumiNet": "luminet", "SKD": "skd", "ABKD": "abkd", "EA-KD (on KD)": "eakd", "EA-DKD": "eakd_dkd",
    "EA-FCFD": "eakd_fcfd", "EA-MLD+LS": "eakd_mlkd_ls", "NormKD": "normkd", "NormKD+DKD": "normkd_dkd",
    "WKD-L": "wkd_l", "WKD-F": "wkd_f", "WKD-L+WKD-F": "wkd_l+wkd_f", "SD-KD": "sdd_kd", "SD-DKD": "sdd_dkd",
    "SD-NKD": "sdd_nkd", "CAT-KD": "cat_kd",
}

# Row order inside a pair: baselines, then the CRD paper's column order, then the DKD paper's additions.
METHOD_ORDER = ["teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                "fsp", "nst", "crd", "crd_kd", "ofd", "reviewkd", "dkd", "kdsvd", "kd_dot",
                "dist", "kd_ls", "dkd_ls", "ctkd", "ctkd_ls", "mlkd", "mlkd_ls", "ttm", "wttm", "wttm+crd", "nkd",
                "rld", "luminet", "skd", "abkd", "eakd", "eakd_dkd", "eakd_fcfd", "eakd_mlkd_ls", "normkd",
                "normkd_dkd", "wkd_l", "wkd_f", "wkd_l+wkd_f", "sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd"]
BASELINES = ("teacher", "student")  # rows filled from plain cross-entropy runs of one architecture

# Short names for the published tables (--table), next to the ids used in the CSV files.
TABLE_ALIASES = {
    "crd_table1": "crd_table1_same_arch", "crd_table2": "crd_table2_cross_arch",
    "dkd_same": "dkd_same_arch", "dkd_cross": "dkd_cross_arch",
}

FINISHED = "finished"
CELL = ["teacher", "student", "method"]
MISSING = "–"
SUMMARY_COLUMNS = ["dataset", "teacher", "student", "method", "runs", "last_top1_mean", "last_top1_std",
                   "best_top1_mean", "best_top1_std", "not_finished", "hours_per_run", "seeds", "our_recipe"]


# ---- published recipes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How a published number was trained and read off (METHODS_NEW.md, per method)."""

    epochs: int
    views: int  # augmented views of each image per step (each one a forward of both networks)
    augmentation: str
    protocol: str  # "best" | "last" | "unstated" (epoch the number was read at)
    note: str = ""  # what else departs from the standard recipe, and whether the source is secondary

    def tag(self) -> str:
        views = f"{self.views} view" + ("s" if self.views > 1 else "")
        read = {"best": "best epoch", "last": "last epoch"}.get(self.protocol, "best or last unstated")
        return f"{self.epochs} ep, {views} ({self.augmentation}), {read}" + (f"; {self.note}" if self.note else "")


STANDARD_AUGMENTATION = "crop + flip"
# MLKD's released recipe (MLKD+LS too): a weak and a strong view, 480 epochs (960 for resnet32x4 ->
# ShuffleV1/V2 from its commit 77b91ec), lr 0.025 (0.01 mobile), decays still at 150/180/210, best epoch.
TWO_VIEW_METHODS = {"MLKD", "MLKD+LS", "EA-MLD+LS"}
TWO_VIEW_AUGMENTATION = "RandAugment + Cutout"
LONG_SCHEDULE_PAIRS = {("resnet32x4", "ShuffleV1"): 960, ("resnet32x4", "ShuffleV2"): 960}
# where one cell is in several tables of a file, the method's own authors' number is shown
OWN_TABLES = {"DIST": "dist_readme", "CTKD": "ctkd_readme"}
# The methods of 2023-2026 whose published recipe departs from the standard one besides epochs and views,
# and the 'paper' preset that re-runs it (METHODS_2025_LOGIT.md sections 3 and 7). A number whose source is
# SECONDARY (quoted by a third party, unchecked against the paper) backs no 'paper' preset.
RECIPE_DEPARTURES = {
    "SKD": "lr 0.1, the authors' own teachers (experiment=methods_2025_skd_paper)",
    "WKD-L": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_paper)",
    "WKD-F": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_paper)",
    "WKD-L+WKD-F": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_lf_paper)",
    "EA-FCFD": "FCFD's recipe (not implemented here)",
}
SECONDARY = "SECONDARY"
SECONDARY_NOTE = "secondary source, unverified: backs no paper preset"


def published_recipe(method: str, teacher: str, student: str, protocol: str, secondary: bool = False) -> Recipe:
    """The recipe behind one published number: ``method`` in the paper's spelling, ``protocol`` the file's text;
    ``secondary``: the number comes from a secondary source (said in the tag)."""
    read = next((p for p in ("best", "last") if protocol.strip().lower().startswith(p)), "unstated")
    note = "; ".join(x for x in (RECIPE_DEPARTURES.get(method, ""), SECONDARY_NOTE if secondary else "") if x)
    if method in TWO_VIEW_METHODS:
        return Recipe(LONG_SCHEDULE_PAIRS.get((teacher, student), 480), 2, TWO_VIEW_AUGMENTATION, read, note)
    return Recipe(240, 1, STANDARD_AUGMENTATION, read, note)


# ---- published numbers -----------------------------------------------------------------------------
PUBLISHED_COLUMNS = ["source", "table", *CELL, "top1", "epochs", "views", "augmentation", "protocol", "recipe",
                     "preferred", "secondary"]


def load_published(sources: Sequence[str] = tuple(SOURCES), folder: Path = PAPER_TABLES) -> pd.DataFrame:
    """Published top-1, one row per (source, table, teacher, student, method) in file order, our method names,
    each with its recipe (``epochs``, ``views``, ``augmentation``, ``protocol``, and all four as ``recipe``)."""
    frames = []
    for key in sources:
        if key not in SOURCES:
            raise UserError(f"unknown source '{key}'; choose from {', '.join(SOURCES)}")
        source = SOURCES[key]
        frame = pd.read_csv(folder / source.file, dtype={"top1": float})
        if "table" not in frame:  # a file of one table (methods_2025.csv): the source names it
            frame["table"] = key
        secondary = (frame["source"].astype(str).str.strip().str.startswith(SECONDARY) if "source" in frame
                     else pd.Series(False, index=frame.index))
        for column in ("table", "teacher", "student", "method"):
            frame[column] = frame[column].str.strip()
        unknown = frame.loc[~frame["method"].isin(list(PAPER_METHOD_NAMES)), "method"]
        if len(unknown):
            raise UserError(f"{source.file}: method '{unknown.iloc[0]}' has no mapping to our config names; "
                            f"add it to PAPER_METHOD_NAMES in scripts/collect_results.py")
        protocols = frame["protocol"].astype(str) if "protocol" in frame else [source.protocol] * len(frame)
        recipes = [published_recipe(m, t, s, p, bool(x)) for m, t, s, p, x in
                   zip(frame["method"], frame["teacher"], frame["student"], protocols, secondary)]
        frames.append(frame.assign(
            source=key, epochs=[r.epochs for r in recipes], views=[r.views for r in recipes],
            augmentation=[r.augmentation for r in recipes], protocol=[r.protocol for r in recipes],
            recipe=[r.tag() for r in recipes],
            preferred=[OWN_TABLES.get(m) == t for m, t in zip(frame["method"], frame["table"])],
            secondary=secondary.astype(bool),
            method=frame["method"].map(PAPER_METHOD_NAMES)))
    if not frames:
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PUBLISHED_COLUMNS]


def table_cells(published: pd.DataFrame, tables: Sequence[str]) -> pd.DataFrame:
    """The (teacher, student, method) cells of the named published tables, in the papers' order."""
    known = set(published["table"])
    cells = []
    for name in tables:
        table_id = TABLE_ALIASES.get(name, name)
        if table_id not in known:
            raise UserError(f"unknown table '{name}'; choose from {', '.join(sorted(known | set(TABLE_ALIASES)))}")
        cells.append(published.loc[published["table"] == table_id, CELL])
    return pd.concat(cells).drop_duplicates(ignore_index=True)


# ---- run directories -------------------------------------------------------------------------------
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


class UnreadableRun(ValueError):
    """A run directory the collector cannot read (a job that failed on a typo, a damaged file): skipped."""


def _load_yaml(path: Path) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged file makes the run "unreadable", reported below
        return None


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
    """Identity from the run's config (``config.yaml``, else Hydra's ``.hydra/config.yaml``), results
    from ``metrics.json``. Raises :class:`UnreadableRun` naming what is wrong (then it is skipped)."""
    config = None
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config = _load_yaml(candidate)
            if config is not None:
                break
    if config is not None and not isinstance(config, dict):
        raise UnreadableRun(f"its config is a {type(config).__name__}, not a mapping")
    config = config or {}
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
        recipe=recipe_of_run(config))


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
    """The tidy table: one row per run directory."""
    columns = [f.name for f in fields(Run)]
    frame = pd.DataFrame([asdict(r) for r in runs], columns=columns)
    frame["run_dir"] = frame["run_dir"].astype(str)
    return frame.astype({"seed": "Int64", "epochs_planned": "Int64", "epochs_done": int, "hours": float,
                         "final_top1": float, "best_top1": float, "final_top5": float, "best_top5": float})


# ---- aggregation -----------------------------------------------------------------------------------
def _seed_list(seeds: pd.Series) -> str:
    return " ".join(str(int(s)) for s in sorted(seeds.dropna()))


# mean and sample std (ddof 1: NaN for a single run) over the finished runs of a group
STATS = {
    "runs": ("final_top1", "count"), "last_top1_mean": ("final_top1", "mean"),
    "last_top1_std": ("final_top1", "std"), "best_runs": ("best_top1", "count"),
    "best_top1_mean": ("best_top1", "mean"), "best_top1_std": ("best_top1", "std"),
    "hours_per_run": ("hours", lambda h: h[h > 0].mean()), "seeds": ("seed", _seed_list),
    "our_recipe": ("recipe", lambda r: r.dropna().iloc[0] if r.notna().any() else ""),  # one per cell: check_recipes
}
UNKNOWN_DATASET = ""  # runs whose config names no data set form a group of their own


def check_recipes(runs: pd.DataFrame) -> None:
    """Refuse, in one line, a cell whose finished runs were trained with different recipes (never averaged)."""
    finished = runs[runs["status"] == FINISHED]
    keys = ["dataset", "kind", "teacher", "student", "method"]
    for (dataset, kind, teacher, student, method), group in finished.groupby(keys, dropna=False, sort=True):
        recipes = group.groupby(group["recipe"].fillna("unrecorded"), sort=True)["run_dir"]
        if recipes.ngroups < 2:
            continue
        cell = f"plain training of {student}" if kind == "teacher" else f"{method} on {teacher} → {student}"
        where = f" on {dataset}" if isinstance(dataset, str) and dataset else ""
        found = "; ".join(f"{recipe} ({len(dirs)} run{'s' * (len(dirs) > 1)}, e.g. {sorted(dirs)[0]})"
                          for recipe, dirs in recipes)
        raise UserError(f"the runs of {cell}{where} differ in recipe and cannot be averaged: {found}; collect one "
                        f"recipe at a time (name its run directories or a glob)")


def _ours(runs: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """Per group: statistics of the finished runs and the number of runs not finished."""
    finished = runs["status"] == FINISHED
    not_finished = runs[~finished].groupby(by, dropna=False).size().rename("not_finished")
    return pd.concat([runs[finished].groupby(by, dropna=False).agg(**STATS), not_finished], axis=1)


def _method_rank(methods: pd.Series) -> pd.Series:
    return methods.map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))


def layout(runs: pd.DataFrame, published: pd.DataFrame, tables: Sequence[str] = ()) -> pd.DataFrame:
    """The table's cells in order: per pair, the baselines, then methods in :data:`METHOD_ORDER`.

    With ``tables``: the published tables' pairs and cells (also those not run yet), plus our other
    methods on those pairs. Without: every pair among the runs, and plain cross-entropy runs of
    architectures in no pair as rows of their own.
    """
    ours = runs.loc[runs["kind"] == "student", CELL].drop_duplicates()
    alone = pd.DataFrame(columns=CELL)
    if tables:
        cells = table_cells(published, tables)
        pairs = cells[["teacher", "student"]].drop_duplicates()
        cells = pd.concat([cells, ours.merge(pairs)]).drop_duplicates()
    else:
        pairs = ours[["teacher", "student"]].drop_duplicates().sort_values(["teacher", "student"])
        cells = pd.concat([pairs.merge(pd.DataFrame({"method": list(BASELINES)}), how="cross"), ours])
        paired = set(pairs["teacher"]) | set(pairs["student"])
        archs = sorted(set(runs.loc[runs["kind"] == "teacher", "student"]) - paired)
        alone = pd.DataFrame({"teacher": "-", "student": archs, "method": "student"}, columns=CELL)
    order = {pair: i for i, pair in enumerate(zip(pairs["teacher"], pairs["student"]))}
    cells = cells.assign(pair_rank=[order[p] for p in zip(cells["teacher"], cells["student"])],
                         method_rank=_method_rank(cells["method"]))
    cells = cells.sort_values(["pair_rank", "method_rank", "method"], kind="stable")[CELL]
    return pd.concat([cells, alone], ignore_index=True)


def summarize(runs: pd.DataFrame, published: pd.DataFrame, sources: Sequence[str],
              tables: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (teacher, student, method): ours under both protocols and each source's number."""
    cells = layout(runs, published, tables)
    baseline = cells["method"].isin(BASELINES)
    cells["arch"] = cells["teacher"].where(cells["method"] == "teacher", cells["student"])
    by_cell = cells[~baseline].join(_ours(runs[runs["kind"] == "student"], CELL), on=CELL)
    by_arch = cells[baseline].join(_ours(runs[runs["kind"] == "teacher"], "student"), on="arch")
    table = pd.concat([by_cell, by_arch]).sort_index().drop(columns="arch")
    table[["runs", "best_runs", "not_finished"]] = table[["runs", "best_runs", "not_finished"]].fillna(0).astype(int)
    table["seeds"] = [s if isinstance(s, str) else "" for s in table["seeds"]]  # no runs: no seeds
    table["our_recipe"] = [r if isinstance(r, str) else "" for r in table["our_recipe"]]
    # one number per cell and source: the method authors' own table where a cell is in several, else the last
    chosen = published.sort_values("preferred", kind="stable").drop_duplicates(["source", *CELL], keep="last")
    for key in sources:
        source = SOURCES[key]
        theirs = chosen.loc[chosen["source"] == key].set_index(CELL)
        joined = table.join(theirs[["top1", "protocol", "recipe"]], on=CELL)
        table[f"{key}_published"] = joined["top1"]
        table[f"{key}_recipe"] = joined["recipe"].fillna("")
        # each number is compared under its own protocol; "unstated" ones against our best epoch (their
        # code tracks the best), and a source without a number here keeps the source's protocol
        protocol = joined["protocol"].where(joined["protocol"].isin(["best", "last"]), "best")
        table[f"{key}_protocol"] = protocol.where(joined["top1"].notna(), source.protocol)
        ours = table["last_top1_mean"].where(table[f"{key}_protocol"] == "last", table["best_top1_mean"])
        table[f"{key}_diff"] = ours - table[f"{key}_published"]
    return table.reset_index(drop=True)


def summarize_by_dataset(runs: pd.DataFrame, published: pd.DataFrame, sources: Sequence[str],
                         tables: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`summarize` for each data set's runs apart (never averaged together), with a ``dataset`` column."""
    parts = [summarize(group, published, sources, tables).assign(dataset=dataset)
             for dataset, group in runs.groupby(runs["dataset"].fillna(UNKNOWN_DATASET), sort=True)]
    return pd.concat(parts, ignore_index=True)


# ---- the rows as objects (for callers and tests) ---------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Our numbers under one protocol: runs, mean and sample std (None for fewer than 2 runs)."""

    n: int
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class Row:
    """One cell of the summary table."""

    teacher: str
    student: str
    method: str
    last: Stat
    best: Stat
    unfinished: int
    hours_per_run: float | None
    published: dict[str, float | None]
    seeds: list[int]
    recipes: dict[str, str] = field(default_factory=dict)  # source -> the published number's recipe
    dataset: str = UNKNOWN_DATASET  # the data set of our runs in this cell
    our_recipe: str = ""  # how our runs of this cell were trained (one recipe per cell)


def _value(x: Any) -> Any:
    return None if pd.isna(x) else x


def rows_of(table: pd.DataFrame, sources: Sequence[str]) -> list[Row]:
    """The summary table as :class:`Row` objects (missing numbers as None)."""
    return [Row(teacher=r.teacher, student=r.student, method=r.method,
                last=Stat(r.runs, _value(r.last_top1_mean), _value(r.last_top1_std)),
                best=Stat(r.best_runs, _value(r.best_top1_mean), _value(r.best_top1_std)),
                unfinished=r.not_finished, hours_per_run=_value(r.hours_per_run),
                published={key: _value(getattr(r, f"{key}_published")) for key in sources},
                seeds=[int(s) for s in r.seeds.split()],
                recipes={key: getattr(r, f"{key}_recipe") for key in sources if getattr(r, f"{key}_recipe")},
                dataset=r.dataset, our_recipe=r.our_recipe)
            for r in table.itertuples(index=False)]


# ---- output ----------------------------------------------------------------------------------------
def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return MISSING
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def _number(x: float, fmt: str) -> str:
    return MISSING if pd.isna(x) else format(x, fmt)


def _pair_title(teacher: str, student: str, dataset: str = UNKNOWN_DATASET) -> str:
    pair = student if teacher == "-" else f"{teacher} → {student}"
    return f"{pair} ({dataset})" if dataset else pair


def _datasets_line(runs: pd.DataFrame) -> str:
    counts = runs["dataset"].fillna("not recorded").value_counts().sort_index()
    if len(counts) == 1:
        return f"Data set: {counts.index[0]}."
    return ("Data sets (each summarised apart): "
            + ", ".join(f"{name} ({n} run{'s' * (n > 1)})" for name, n in counts.items()) + ".")


def render_markdown(table: pd.DataFrame, runs: pd.DataFrame, sources: Sequence[str], title: str = "Results") -> str:
    """Markdown: one table per teacher-student pair, then the runs that are not finished."""
    n_finished = int((runs["status"] == FINISHED).sum())
    lines = [f"# {title}", "",
             f"{len(runs)} run directories: {n_finished} finished, {len(runs) - n_finished} not finished; "
             f"{runs['hours'].sum():.2f} training hours recorded in them. {_datasets_line(runs)}",
             "Ours: mean ± sample std over seeds (n = runs). *last* = top-1 after the last epoch (the CRD "
             "tables' protocol), *best* = best epoch's top-1 (the DKD tables' protocol). Δ = ours − published, "
             "each source compared under its own protocol.", ""]
    # header -> cells; a list of pairs, since two sources of one protocol share the header "Δ (best)"
    columns = [("method", table["method"]), ("n", table["runs"].astype(str)),
               ("last-epoch top-1", [_mean_std(m, s) for m, s in zip(table["last_top1_mean"], table["last_top1_std"])]),
               ("best-epoch top-1", [_mean_std(m, s) for m, s in zip(table["best_top1_mean"], table["best_top1_std"])])]
    for key in sources:
        source = SOURCES[key]
        columns += [(source.label, [_number(x, ".2f") for x in table[f"{key}_published"]]),
                    (f"Δ ({source.protocol})", [_number(x, "+.2f") for x in table[f"{key}_diff"]])]
        if source.recipes:  # numbers of one file trained under different recipes: say which, per number
            columns.append((f"{source.label}: recipe", list(table[f"{key}_recipe"])))
    columns.append(("not finished", [str(n) if n else "" for n in table["not_finished"]]))
    columns.append(("our recipe", list(table["our_recipe"])))
    shown = pd.DataFrame(dict(enumerate(cells for _, cells in columns)), index=table.index)
    header = [name for name, _ in columns]
    sections = shown.groupby([table["dataset"], table["teacher"], table["student"]], sort=False, dropna=False)
    for (dataset, teacher, student), group in sections:
        lines += [f"## {_pair_title(teacher, student, dataset)}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in group.itertuples(index=False)]
        lines.append("")
    open_runs = runs[runs["status"] != FINISHED].sort_values("run_dir")
    if len(open_runs):
        lines += ["## Runs not finished", "",
                  "Still training, stopped or failed; relaunching the same sweep resumes or re-runs them.", "",
                  "| run directory | status | epochs done | error |", "|---|---|---|---|"]
        for run in open_runs.itertuples(index=False):
            planned = f" / {run.epochs_planned}" if pd.notna(run.epochs_planned) and run.epochs_planned else ""
            error = "" if pd.isna(run.error) else str(run.error).replace("|", "/")
            lines.append(f"| {run.run_dir} | {run.status} | {run.epochs_done}{planned} | {error} |")
        lines.append("")
    return "\n".join(lines)


def write_summary_csv(table: pd.DataFrame, sources: Sequence[str], path: Path) -> None:
    """Machine-readable summary, one row per (teacher, student, method)."""
    columns = SUMMARY_COLUMNS + [f"{key}_{part}" for key in sources
                                 for part in ("published", "protocol", "diff", "recipe")]
    table[columns].to_csv(path, index=False, float_format="%.4f")


def plot(table: pd.DataFrame, sources: Sequence[str], path: Path) -> None:
    """Per data set and pair, per method: ours (last and best epoch, mean ± std) and each source's published number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = table.groupby(["dataset", "teacher", "student"], sort=False, dropna=False)
    cols = min(3, max(1, pairs.ngroups))
    nrows = math.ceil(pairs.ngroups / cols) if pairs.ngroups else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    markers = {"crd": "x", "dkd": "+", "mdistiller": "1"}
    for ax, ((dataset, teacher, student), group) in zip(axes.flat, pairs):
        group = group.reset_index(drop=True)
        for offset, protocol, style in ((-0.12, "last", "o"), (0.12, "best", "s")):
            pts = group[group[f"{protocol}_top1_mean"].notna()]
            if len(pts):
                ax.errorbar(pts.index + offset, pts[f"{protocol}_top1_mean"],
                            yerr=pts[f"{protocol}_top1_std"].fillna(0.0), fmt=style, ms=4, capsize=2,
                            fillstyle="full" if protocol == "last" else "none", label=f"ours ({protocol} epoch)")
        for key in sources:
            pts = group[f"{key}_published"].dropna()
            if len(pts):
                ax.plot(pts.index, pts, linestyle="none", ms=8, marker=markers.get(key, "*"),
                        color="black" if key == "crd" else "tab:red",
                        label=f"{SOURCES[key].label} ({SOURCES[key].protocol})")
        ax.set_title(_pair_title(teacher, student, dataset), fontsize=10)
        ax.set_xticks(list(group.index))
        ax.set_xticklabels(group["method"], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[pairs.ngroups:]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_csv_path(out: Path) -> Path:
    """Where the tidy per-run table goes: ``<out>_runs.csv``."""
    return out.with_name(out.name + "_runs.csv")


def collect(inputs: Sequence[str], out: Path, sources: Sequence[str] = DEFAULT_SOURCES,
            tables: Sequence[str] = (), figure: bool = True, title: str = "Results") -> tuple[list[Row], list[Run]]:
    """Read the runs, write ``out``.md/.csv/.png and ``out``_runs.csv; return the rows and runs.

    A run directory that cannot be read is skipped with a warning naming it. No readable run, or a
    cell whose runs differ in recipe, is a :class:`UserError` raised before anything is written.
    """
    published = load_published(sources)
    runs, skipped = read_runs(find_run_dirs(inputs))
    for path, why in skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    if not runs:
        raise UserError(f"no {'readable ' if skipped else ''}run directories under {' '.join(inputs)}: nothing "
                        f"was written (earlier results at {out} are kept); give run directories, multirun "
                        f"folders or globs")
    frame = runs_frame(runs)
    check_recipes(frame)
    table = summarize_by_dataset(frame, published, sources, tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render_markdown(table, frame, sources, title) + "\n")
    write_summary_csv(table, sources, out.with_suffix(".csv"))
    frame.to_csv(runs_csv_path(out), index=False)
    if figure and len(table):
        plot(table, sources, out.with_suffix(".png"))
    return rows_of(table, sources), runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="run directories, multirun folders or glob patterns")
    parser.add_argument("--out", default="results/results",
                        help="output path without suffix: writes OUT.md, OUT.csv, OUT_runs.csv, OUT.png "
                             "(default results/results)")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help=f"published sources to show, comma-separated, from {', '.join(SOURCES)} "
                             f"(default {','.join(DEFAULT_SOURCES)})")
    parser.add_argument("--table", action="append", default=[],
                        help="lay out the cells of a published table (crd_table1, crd_table2, dkd_same_arch, "
                             "dkd_cross_arch, ...), including cells not run yet; repeatable")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG")
    parser.add_argument("--title", default="Results")
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    out = Path(args.out)
    try:
        collect(args.inputs, out, sources, args.table, not args.no_figure, args.title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out.with_suffix(".md").read_text())
    written = [out.with_suffix(".md"), out.with_suffix(".csv"), runs_csv_path(out)]
    written += [] if args.no_figure else [out.with_suffix(".png")]
    print("wrote " + ", ".join(str(p) for p in written if p.exists()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
