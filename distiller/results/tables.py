"""Our runs beside the published numbers: grouped per data set and cell (never averaged across recipes),
mean +- std over seeds for both protocols, the difference to each source, written as Markdown, CSV and a
figure (:func:`collect`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from common.errors import UserError
from distiller.results.published import (
    BASELINES,
    CELL,
    DEFAULT_SOURCES,
    FINISHED,
    METHOD_ORDER,
    SOURCES,
    load_published,
    table_cells,
)
from distiller.results.runs import Run, find_run_dirs, read_runs, runs_frame, shown_setting
from distiller.results.settings import NOT_PUBLISHED_SETTINGS
from distiller.results.writers import (
    UNKNOWN_DATASET,
    checked_outputs,
    data_set_name,
    plot,
    render_markdown,
    write_summary_csv,
)


def _seed_list(seeds: pd.Series) -> str:
    return " ".join(str(int(s)) for s in sorted(seeds.dropna()))


# mean and sample std (ddof 1: NaN for a single run) over the finished runs of a group
STATS = {
    "runs": ("final_top1", "count"), "last_top1_mean": ("final_top1", "mean"),
    "last_top1_std": ("final_top1", "std"), "best_runs": ("best_top1", "count"),
    "best_top1_mean": ("best_top1", "mean"), "best_top1_std": ("best_top1", "std"),
    "hours_per_run": ("hours", lambda h: h[h > 0].mean()), "seeds": ("seed", _seed_list),
    "our_recipe": ("recipe", lambda r: r.dropna().iloc[0] if r.notna().any() else ""),  # one per cell: check_cells
    # the flag of a cell any of whose finished runs departs from the published settings (results.settings)
    "settings": ("unpublished", lambda u: f"{NOT_PUBLISHED_SETTINGS}: " + "; ".join(sorted(set(u.dropna())))
                 if u.notna().any() else ""),
}


# what :func:`~distiller.results.runs.recipe_of_run` shows: runs that differ only in these differ "in recipe"
RECIPE_KEYS = ("trainer.epochs", "optim.lr", "schedule.name", "schedule.milestones", "schedule.gamma")


def _cell_of(run: Run) -> str:
    """A cell as messages name it: ``kd on resnet32x4 → resnet8x4 on cifar100``."""
    pair = f"{run.method} on {run.teacher} → {run.student}" if run.kind == "student" else \
        f"plain training of {run.student}"
    where = data_set_name(run.dataset, run.data_folder)
    return f"{pair} on {where}" if where else pair


def _check_settings(cell: list[Run]) -> None:
    """Refuse runs of one cell that differ in anything that changes what is trained (their seed aside)."""
    keys = sorted(set().union(*(run.settings for run in cell)))
    differing = [key for key in keys if len({shown_setting(run.settings, key) for run in cell}) > 1]
    if not differing:
        return
    in_recipe = set(differing) <= set(RECIPE_KEYS)  # then each group is named by its recipe, as the table shows it
    groups: dict[str, list[str]] = {}
    for run in cell:
        label = (run.recipe or "unrecorded") if in_recipe else \
            ", ".join(f"{key} {shown_setting(run.settings, key)}" for key in differing)
        groups.setdefault(label, []).append(str(run.run_dir))
    found = "; ".join(f"{label} ({len(dirs)} run{'s' * (len(dirs) > 1)}, e.g. {sorted(dirs)[0]})"
                      for label, dirs in sorted(groups.items()))
    raise UserError(f"the runs of {_cell_of(cell[0])} differ in {'recipe' if in_recipe else ', '.join(differing)} "
                    f"and cannot be averaged: {found}; collect one {'recipe' if in_recipe else 'setting'} at a time "
                    f"(name its run directories or a glob)")


def _check_seeds(cell: list[Run]) -> None:
    """Refuse runs of one cell that repeat a seed: they are not independent runs, so no sample of seeds."""
    by_seed: dict[int, list[str]] = {}
    for run in cell:
        if run.seed is not None:
            by_seed.setdefault(run.seed, []).append(str(run.run_dir))
    repeated = ", ".join(f"seed {seed} ({', '.join(sorted(dirs))})" for seed, dirs in sorted(by_seed.items())
                         if len(dirs) > 1)
    if repeated:
        raise UserError(f"the runs of {_cell_of(cell[0])} repeat {repeated} and cannot be averaged: runs of one seed "
                        f"are not independent; collect one run per seed (name its run directories or a glob)")


def _check_teacher_files(cell: list[Run]) -> None:
    """Refuse students of one cell distilled from different teacher files (a teacher retrained in its place
    between them): their mean would average two teachers (runs that recorded no file are not compared)."""
    files: dict[str, list[str]] = {}
    for run in cell:
        if run.teacher_sha256:
            files.setdefault(run.teacher_sha256, []).append(str(run.run_dir))
    if len(files) > 1:
        found = "; ".join(f"teacher sha256 {sha[:12]}... ({len(dirs)} run{'s' * (len(dirs) > 1)}, e.g. "
                          f"{sorted(dirs)[0]})" for sha, dirs in sorted(files.items()))
        raise UserError(f"the runs of {_cell_of(cell[0])} were distilled from different teacher files and cannot "
                        f"be averaged: {found}; collect the runs of one teacher at a time (name its run directories "
                        f"or a glob)")


def check_cells(runs: Sequence[Run]) -> None:
    """Refuse, in one line, a cell whose finished runs cannot be averaged: runs that differ in a setting other
    than those that change nothing trained (:data:`~distiller.results.runs.NOT_TRAINING_KEYS`), that learnt
    from different teacher files, or that repeat a seed. A cell: data set (and image folder), kind, teacher,
    student, method."""
    cells: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        if run.status == FINISHED:
            key = (run.dataset, run.data_folder, run.kind, run.teacher, run.student, run.method)
            cells.setdefault(tuple("" if part is None else str(part) for part in key), []).append(run)
    for key in sorted(cells):
        _check_settings(cells[key])
        _check_teacher_files(cells[key])
        _check_seeds(cells[key])


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
              tables: Sequence[str] = (), dataset: str = UNKNOWN_DATASET) -> pd.DataFrame:
    """One row per (teacher, student, method): ours under both protocols and each source's number.

    With ``dataset``, only numbers measured on that data set stand beside ours (a synthetic run has no
    published number); runs that recorded no data set are compared with every number, as before.
    """
    cells = layout(runs, published, tables)
    baseline = cells["method"].isin(BASELINES)
    cells["arch"] = cells["teacher"].where(cells["method"] == "teacher", cells["student"])
    by_cell = cells[~baseline].join(_ours(runs[runs["kind"] == "student"], CELL), on=CELL)
    by_arch = cells[baseline].join(_ours(runs[runs["kind"] == "teacher"], "student"), on="arch")
    table = pd.concat([by_cell, by_arch]).sort_index().drop(columns="arch")
    table[["runs", "best_runs", "not_finished"]] = table[["runs", "best_runs", "not_finished"]].fillna(0).astype(int)
    table["seeds"] = [s if isinstance(s, str) else "" for s in table["seeds"]]  # no runs: no seeds
    table["our_recipe"] = [r if isinstance(r, str) else "" for r in table["our_recipe"]]
    table["settings"] = [r if isinstance(r, str) else "" for r in table["settings"]]
    # one number per cell and source: the method authors' own table where a cell is in several, else the last
    comparable = published if dataset == UNKNOWN_DATASET else published[published["dataset"] == dataset]
    chosen = comparable.sort_values("preferred", kind="stable").drop_duplicates(["source", *CELL], keep="last")
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
    """:func:`summarize` for each data set's runs apart (never averaged together; each image folder is a data
    set of its own), with ``dataset`` and ``data_folder`` columns."""
    data_sets = [runs["dataset"].fillna(UNKNOWN_DATASET), runs["data_folder"].fillna("")]
    parts = [summarize(group, published, sources, tables, dataset).assign(dataset=dataset, data_folder=folder)
             for (dataset, folder), group in runs.groupby(data_sets, sort=True)]
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
    data_folder: str = ""  # its folder, where the folder is the data set (an image folder's root, as recorded)
    our_recipe: str = ""  # how our runs of this cell were trained (one recipe per cell)
    settings: str = ""  # NOT_PUBLISHED_SETTINGS and why, when our runs departed from the published settings


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
                dataset=r.dataset, data_folder=r.data_folder, our_recipe=r.our_recipe, settings=r.settings)
            for r in table.itertuples(index=False)]


def collect(inputs: Sequence[str], out: Path | str, sources: Sequence[str] = DEFAULT_SOURCES,
            tables: Sequence[str] = (), figure: bool = True, title: str = "Results") -> tuple[list[Row], list[Run]]:
    """Read the runs, write the files of :func:`output_paths` (``out``.md/.csv/.png and ``out``_runs.csv);
    return the rows and runs.

    A run directory that cannot be read is skipped with a warning naming it. No readable run, or a cell
    whose runs cannot be averaged (:func:`check_cells`), is a :class:`UserError` raised before anything is
    written.
    """
    files = checked_outputs(str(out))
    published = load_published(sources)
    if tables:
        table_cells(published, tables)  # a table name that is wrong stops here, before any run is read
    runs, skipped = read_runs(find_run_dirs(inputs))
    if not runs:
        why = f" ({len(skipped)} skipped; {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        kept = f" (the earlier results at {files.stem} are kept)" if files.markdown.exists() else ""
        raise UserError(f"no {'readable ' if skipped else ''}run directories under {' '.join(inputs)}{why}: nothing "
                        f"was written{kept}; give run directories, multirun folders or globs")
    for path, why in skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    check_cells(runs)
    frame = runs_frame(runs)
    table = summarize_by_dataset(frame, published, sources, tables)
    files.stem.parent.mkdir(parents=True, exist_ok=True)
    files.markdown.write_text(render_markdown(table, frame, sources, title) + "\n")
    write_summary_csv(table, sources, files.summary)
    frame.to_csv(files.runs, index=False)
    if figure and len(table):
        plot(table, sources, files.figure)
    return rows_of(table, sources), runs
