"""What one collection writes: the Markdown tables (one per data set and pair), the summary CSV, the figure,
and the file names they all take from one stem (:func:`output_paths`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from common.errors import UserError
from distiller.results.published import FINISHED, MISSING, SOURCES, SUMMARY_COLUMNS
from distiller.results.settings import NOT_PUBLISHED_SETTINGS

UNKNOWN_DATASET = ""  # runs whose config names no data set form a group of their own


def data_set_name(dataset: Any, folder: Any) -> str:
    """A data set as headings and messages name it: ``imagefolder (<folder>)`` where the folder is the data."""
    name = dataset if isinstance(dataset, str) else UNKNOWN_DATASET
    return f"{name} ({folder})" if isinstance(folder, str) and folder else name


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return MISSING
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def _number(x: float, fmt: str) -> str:
    return MISSING if pd.isna(x) else format(x, fmt)


def _pair_title(teacher: str, student: str, dataset: str = UNKNOWN_DATASET) -> str:
    pair = student if teacher == "-" else f"{teacher} → {student}"
    return f"{pair} ({dataset})" if dataset else pair


def short_folder_names(folders: Iterable[str]) -> dict[str, str]:
    """Each folder by its shortest trailing path that no other of ``folders`` ends with (``/x/ok`` -> ``ok``;
    ``/x/A/data``, ``/x/B/data`` -> ``A/data``, ``B/data``): short headings that still tell folders apart."""
    parts = {folder: Path(folder).parts for folder in set(folders)}
    names = {}
    for folder, mine in parts.items():
        others = [theirs for other, theirs in parts.items() if other != folder]
        length = next((n for n in range(1, len(mine)) if all(theirs[-n:] != mine[-n:] for theirs in others)),
                      len(mine))
        names[folder] = str(Path(*mine[-length:]))
    return names


def data_set_titles(frame: pd.DataFrame, unknown: str = UNKNOWN_DATASET) -> pd.Series:
    """Per row of ``frame`` (runs or summary), its data set as headings name it: ``imagefolder (<folder>)`` with
    the folder shortened (:func:`short_folder_names`); ``unknown`` where the run recorded no data set."""
    folders = frame["data_folder"].where(frame["data_folder"].notna(), "")
    short = short_folder_names(f for f in folders if f)
    return pd.Series([data_set_name(d if isinstance(d, str) and d else unknown, short.get(f, ""))
                      for d, f in zip(frame["dataset"], folders)], index=frame.index)


def _datasets_line(runs: pd.DataFrame) -> str:
    counts = data_set_titles(runs, "not recorded").value_counts().sort_index()
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
             "each source compared under its own protocol, beside runs on the data set it was measured on "
             "(cifar100; imagenet; imagefolder for Tiny-ImageNet). *settings*: "
             f"{NOT_PUBLISHED_SETTINGS} where our runs departed from the published number's settings.", ""]
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
    columns.append(("settings", list(table["settings"])))
    shown = pd.DataFrame(dict(enumerate(cells for _, cells in columns)), index=table.index)
    header = [name for name, _ in columns]
    sections = shown.groupby([data_set_titles(table), table["teacher"], table["student"]], sort=False, dropna=False)
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

    pairs = table.groupby([data_set_titles(table), table["teacher"], table["student"]], sort=False, dropna=False)
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


OUTPUT_SUFFIXES = (".md", ".csv", ".png")  # the suffixes of what --out names, stripped once from it


@dataclass(frozen=True)
class Outputs:
    """The files one collection writes, all named from one stem."""

    stem: Path
    markdown: Path
    summary: Path
    runs: Path  # the tidy per-run table
    figure: Path


def checked_outputs(given: str) -> Outputs:
    """The files of :func:`output_paths` for ``--out`` (``given``), refused before anything is read or written
    where they cannot be written: empty, an existing folder, under a file, or a name they take that is a folder."""
    if not given.strip():
        raise UserError("--out is empty: give the path the files are named from, e.g. --out results/results")
    files = output_paths(Path(given))
    if Path(given).is_dir():
        raise UserError(f"--out {given} is a folder: give the path the files are named from inside it, e.g. "
                        f"--out {Path(given) / 'results'} (writes results.md, results.csv, ... there)")
    above = next((p for p in files.stem.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"--out {given} cannot be written: {above} is a file, not a folder; choose another --out")
    taken = next((p for p in (files.markdown, files.summary, files.runs, files.figure) if p.is_dir()), None)
    if taken is not None:
        raise UserError(f"--out {given} would write {taken}, which is a folder; choose another --out")
    return files


def output_paths(out: Path) -> Outputs:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>_runs.csv``, ``<stem>.png``, the stem being ``out`` less one of
    :data:`OUTPUT_SUFFIXES` (``results/t.md`` and ``results/t`` write the same files; ``results/v1.2`` keeps
    its ``.2``)."""
    stem = out.with_suffix("") if out.suffix in OUTPUT_SUFFIXES else out
    return Outputs(stem=stem, markdown=stem.with_name(f"{stem.name}.md"), summary=stem.with_name(f"{stem.name}.csv"),
                   runs=stem.with_name(f"{stem.name}_runs.csv"), figure=stem.with_name(f"{stem.name}.png"))
