"""Turn run directories into the paper tables: our mean +- std over seeds next to the published numbers.

    python scripts/collect_results.py runs/                       # everything under runs/
    python scripts/collect_results.py runs/student 'runs/teacher/*/seed*' --table crd_table1
    python scripts/collect_results.py runs/ --out results/dkd --table dkd_same_arch --table dkd_cross_arch

Reads any set of run directories (a multirun folder, a glob, single runs), groups student runs by
(teacher, student, method) and plain cross-entropy runs (``train_teacher.py``) by architecture, and
reports both evaluation protocols: top-1 of the last epoch (the CRD tables) and of the best epoch (the
DKD tables), mean +- sample std over seeds and the number of runs. Each published source is placed
beside the protocol it used, with the difference ours - published. A pair's ``teacher`` and
``student`` rows are the plain cross-entropy runs of those architectures, when they are among the
inputs. Runs that are not finished (still training, stopped, failed) are counted and listed, never
silently dropped.

Writes ``<out>.md`` (Markdown, also printed), ``<out>.csv`` and ``<out>.png`` (per pair: our
accuracy vs published, per method).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

from common.errors import UserError  # noqa: E402

PAPER_TABLES = Path(__file__).resolve().parent / "paper_tables"


@dataclass(frozen=True)
class Source:
    """One file of published numbers and the evaluation protocol behind them."""

    key: str
    file: str
    label: str
    protocol: str  # "last" | "best"


SOURCES: dict[str, Source] = {
    "crd": Source("crd", "crd_paper_repdistiller_readme.csv", "CRD paper", "last"),
    "dkd": Source("dkd", "dkd_paper.csv", "DKD paper", "best"),
    "mdistiller": Source("mdistiller", "mdistiller_readme.csv", "mdistiller README", "best"),
}
DEFAULT_SOURCES = ("crd", "dkd")

# The papers' method names -> our config names (configs/distill/<name>.yaml). Explicit on purpose:
# a new spelling in a data file must be added here, not guessed.
PAPER_METHOD_NAMES: dict[str, str] = {
    "teacher": "teacher", "student": "student",
    "KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
    "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd", "CRD+KD": "crd_kd",
    "OFD": "ofd", "ReviewKD": "reviewkd", "DKD": "dkd", "KDSVD": "kdsvd",
    "KD+DOT": "kd_dot",  # KD trained with the DOT optimizer (mdistiller); not a method of ours
}

# Row order inside a pair: baselines, then the CRD paper's column order, then the DKD paper's additions.
METHOD_ORDER = ["teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                "fsp", "nst", "crd", "crd_kd", "ofd", "reviewkd", "dkd", "kdsvd", "kd_dot"]

# Short names for the published tables (--table), next to the ids used in the CSV files.
TABLE_ALIASES = {
    "crd_table1": "crd_table1_same_arch", "crd_table2": "crd_table2_cross_arch",
    "dkd_same": "dkd_same_arch", "dkd_cross": "dkd_cross_arch",
}

FINISHED = "finished"


# ---- published numbers -----------------------------------------------------------------------------
@dataclass
class Published:
    """Published top-1 per source and (teacher, student, method), and each table's cells in order."""

    values: dict[str, dict[tuple[str, str, str], float]] = field(default_factory=dict)
    tables: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)


def load_published(sources: Sequence[str] = tuple(SOURCES), folder: Path = PAPER_TABLES) -> Published:
    """Read the published-number CSVs, mapping the papers' method names to ours."""
    published = Published()
    for key in sources:
        if key not in SOURCES:
            raise UserError(f"unknown source '{key}'; choose from {', '.join(SOURCES)}")
        source = SOURCES[key]
        values = published.values.setdefault(key, {})
        with open(folder / source.file, newline="") as f:
            for row in csv.DictReader(f):
                paper_name = row["method"].strip()
                if paper_name not in PAPER_METHOD_NAMES:
                    raise UserError(f"{source.file}: method '{paper_name}' has no mapping to our config names; "
                                    f"add it to PAPER_METHOD_NAMES in scripts/collect_results.py")
                cell = (row["teacher"].strip(), row["student"].strip(), PAPER_METHOD_NAMES[paper_name])
                values[cell] = float(row["top1"])
                cells = published.tables.setdefault(row["table"].strip(), [])
                if cell not in cells:
                    cells.append(cell)
    return published


# ---- run directories -------------------------------------------------------------------------------
@dataclass
class Run:
    """What the collector needs from one run directory."""

    path: Path
    kind: str  # "student" (distillation) | "teacher" (plain cross-entropy training of one architecture)
    teacher: str | None
    student: str  # the trained architecture
    method: str  # distill.name (+ combined methods); "ce" for plain training
    seed: int | None
    status: str  # finished | running | failed | no metrics | unreadable
    final_top1: float | None = None
    best_top1: float | None = None
    epochs_done: int = 0
    epochs_planned: int | None = None
    hours: float = 0.0  # wall time of the epochs so far (sum of the engine's per-epoch time_s)
    error: str | None = None  # the engine's message for a failed run


def _load_yaml(path: Path) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged file makes the run "unreadable", reported below
        return None


def is_run_dir(path: Path) -> bool:
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
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_run(path: Path) -> Run:
    """Identity from the run's config (``config.yaml``, else Hydra's ``.hydra/config.yaml``), results
    from ``metrics.json``."""
    config = None
    for candidate in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config = _load_yaml(candidate)
            if config is not None:
                break
    metrics: dict[str, Any] | None = None
    metrics_file = path / "metrics.json"
    metrics_broken = False
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            metrics_broken = True
    config = config or {}
    if _get(config, "teacher.name") is not None or (metrics or {}).get("kind") == "student":
        kind = "student"
        teacher = _get(config, "teacher.name") or (metrics or {}).get("teacher")
        student = _get(config, "student.name") or (metrics or {}).get("student")
        # the objective's label as in the run directory: distill.name, "+<key>" per combined method
        method = _get(config, "method_label")
        if not isinstance(method, str) or "${" in method:  # Hydra's copy keeps it unresolved
            method = (metrics or {}).get("method")
        if method is None:
            combine = _get(config, "combine") or {}
            method = "+".join([str(_get(config, "distill.name")), *sorted(str(k) for k in combine)])
    else:
        kind = "teacher"
        teacher = None
        student = _get(config, "model.name") or (metrics or {}).get("arch")
        method = "ce"
    seed = _get(config, "seed")
    if seed is None and metrics:
        seed = metrics.get("seed")
    epochs_planned = _get(config, "trainer.epochs")
    run = Run(path=path, kind=kind, teacher=None if teacher is None else str(teacher),
              student=str(student), method=str(method), seed=None if seed is None else int(seed),
              status="unreadable" if metrics_broken else "no metrics",
              epochs_planned=epochs_planned if isinstance(epochs_planned, int) else None)
    if student is None:
        run.status = "unreadable"
    if metrics is not None:
        run.status = str(metrics.get("status", "running"))
        history = metrics.get("epochs") or []
        run.epochs_done = len(history)
        run.final_top1 = metrics.get("final_top1")
        run.best_top1 = metrics.get("best_top1")
        run.hours = sum(float(e.get("time_s") or 0.0) for e in history) / 3600.0
        run.error = metrics.get("error")
    return run


# ---- aggregation -----------------------------------------------------------------------------------
@dataclass
class Stat:
    n: int
    mean: float | None
    std: float | None  # sample std (n - 1); None for fewer than 2 runs


def summarize(values: Sequence[float]) -> Stat:
    values = [float(v) for v in values if v is not None]
    if not values:
        return Stat(0, None, None)
    return Stat(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Row:
    teacher: str
    student: str
    method: str
    last: Stat
    best: Stat
    unfinished: int
    hours_per_run: float | None
    published: dict[str, float | None]
    seeds: list[int]


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def build_rows(runs: Sequence[Run], published: Published, tables: Sequence[str] = ()) -> list[Row]:
    """One row per (teacher, student, method): ours under both protocols and each source's number."""
    finished: dict[tuple[str, str, str], list[Run]] = {}
    unfinished: dict[tuple[str, str, str], int] = {}
    vanilla: dict[str, list[Run]] = {}
    vanilla_unfinished: dict[str, int] = {}
    for run in runs:
        if run.kind == "teacher":
            if run.status == FINISHED:
                vanilla.setdefault(run.student, []).append(run)
            else:
                vanilla_unfinished[run.student] = vanilla_unfinished.get(run.student, 0) + 1
            continue
        key = (str(run.teacher), run.student, run.method)
        if run.status == FINISHED:
            finished.setdefault(key, []).append(run)
        else:
            unfinished[key] = unfinished.get(key, 0) + 1

    if tables:
        cells: list[tuple[str, str, str]] = []
        for name in tables:
            table_id = TABLE_ALIASES.get(name, name)
            if table_id not in published.tables:
                known = sorted(set(published.tables) | set(TABLE_ALIASES))
                raise UserError(f"unknown table '{name}'; choose from {', '.join(known)}")
            cells += [c for c in published.tables[table_id] if c not in cells]
        pairs = list(dict.fromkeys((t, s) for t, s, _ in cells))
        # our extra methods on the table's pairs come after the published ones
        extra = sorted((k for k in set(finished) | set(unfinished) if (k[0], k[1]) in pairs and k not in cells),
                       key=lambda k: (pairs.index((k[0], k[1])), _method_rank(k[2])))
        cells += extra
        order = {pair: i for i, pair in enumerate(pairs)}
        cells.sort(key=lambda c: (order[(c[0], c[1])], _method_rank(c[2])))
    else:
        pairs = list(dict.fromkeys((t, s) for t, s, _ in sorted(set(finished) | set(unfinished))))
        cells = []
        for teacher, student in pairs:
            cells += [(teacher, student, "teacher"), (teacher, student, "student")]
            methods = {m for t, s, m in set(finished) | set(unfinished) if (t, s) == (teacher, student)}
            cells += [(teacher, student, m) for m in sorted(methods, key=_method_rank)]
        # plain cross-entropy runs of architectures that are in no pair get rows of their own
        paired = {a for pair in pairs for a in pair}
        for arch in sorted(set(vanilla) | set(vanilla_unfinished)):
            if arch not in paired:
                cells.append(("-", arch, "student"))

    rows = []
    for teacher, student, method in cells:
        if method in ("teacher", "student"):
            arch = teacher if method == "teacher" else student
            group, open_runs = vanilla.get(arch, []), vanilla_unfinished.get(arch, 0)
        else:
            group = finished.get((teacher, student, method), [])
            open_runs = unfinished.get((teacher, student, method), 0)
        hours = [r.hours for r in group if r.hours > 0]
        rows.append(Row(
            teacher=teacher, student=student, method=method,
            last=summarize([r.final_top1 for r in group]), best=summarize([r.best_top1 for r in group]),
            unfinished=open_runs, hours_per_run=statistics.fmean(hours) if hours else None,
            published={key: values.get((teacher, student, method)) for key, values in published.values.items()},
            seeds=sorted(r.seed for r in group if r.seed is not None)))
    return rows


# ---- output ----------------------------------------------------------------------------------------
def _fmt(stat: Stat) -> str:
    if stat.mean is None:
        return "–"
    return f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f} ± {stat.std:.2f}"


def _ours(row: Row, protocol: str) -> float | None:
    return (row.last if protocol == "last" else row.best).mean


def _diff(row: Row, key: str) -> float | None:
    ours, theirs = _ours(row, SOURCES[key].protocol), row.published.get(key)
    return None if ours is None or theirs is None else ours - theirs


def render_markdown(rows: Sequence[Row], runs: Sequence[Run], sources: Sequence[str],
                    title: str = "Results") -> str:
    """Markdown: one table per teacher-student pair, then the runs that are not finished."""
    n_finished = sum(r.status == FINISHED for r in runs)
    hours = sum(r.hours for r in runs)
    lines = [f"# {title}", "",
             f"{len(runs)} run directories: {n_finished} finished, {len(runs) - n_finished} not finished; "
             f"{hours:.2f} training hours recorded in them.",
             "Ours: mean ± sample std over seeds (n = runs). *last* = top-1 after the last epoch (the CRD "
             "tables' protocol), *best* = best epoch's top-1 (the DKD tables' protocol). Δ = ours − published, "
             "each source compared under its own protocol.", ""]
    header = ["method", "n", "last-epoch top-1", "best-epoch top-1"]
    for key in sources:
        src = SOURCES[key]
        header += [src.label, f"Δ ({src.protocol})"]
    header.append("not finished")
    for pair in dict.fromkeys((r.teacher, r.student) for r in rows):
        teacher, student = pair
        lines += [f"## {student}" if teacher == "-" else f"## {teacher} → {student}", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in rows if (r.teacher, r.student) == pair):
            cells = [row.method, str(row.last.n), _fmt(row.last), _fmt(row.best)]
            for key in sources:
                value, diff = row.published.get(key), _diff(row, key)
                cells += ["–" if value is None else f"{value:.2f}", "–" if diff is None else f"{diff:+.2f}"]
            cells.append(str(row.unfinished) if row.unfinished else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    open_runs = [r for r in runs if r.status != FINISHED]
    if open_runs:
        lines += ["## Runs not finished", "",
                  "Still training, stopped or failed; relaunching the same sweep resumes or re-runs them.", "",
                  "| run directory | status | epochs done | error |", "|---|---|---|---|"]
        for run in sorted(open_runs, key=lambda r: str(r.path)):
            planned = f" / {run.epochs_planned}" if run.epochs_planned else ""
            error = (run.error or "").replace("|", "/")
            lines.append(f"| {run.path} | {run.status} | {run.epochs_done}{planned} | {error} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], sources: Sequence[str], path: Path) -> None:
    """Machine-readable table, one row per (teacher, student, method)."""
    def num(x: float | None) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    fields = ["teacher", "student", "method", "runs", "last_top1_mean", "last_top1_std", "best_top1_mean",
              "best_top1_std", "not_finished", "hours_per_run", "seeds"]
    for key in sources:
        fields += [f"{key}_published", f"{key}_protocol", f"{key}_diff"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            values = [row.teacher, row.student, row.method, row.last.n, num(row.last.mean), num(row.last.std),
                      num(row.best.mean), num(row.best.std), row.unfinished, num(row.hours_per_run),
                      " ".join(map(str, row.seeds))]
            for key in sources:
                values += [num(row.published.get(key)), SOURCES[key].protocol, num(_diff(row, key))]
            writer.writerow(values)


def plot(rows: Sequence[Row], sources: Sequence[str], path: Path) -> None:
    """Per pair, per method: ours (last and best epoch, mean ± std) and each source's published number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys((r.teacher, r.student) for r in rows))
    cols = min(3, max(1, len(pairs)))
    nrows = math.ceil(len(pairs) / cols) if pairs else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    markers = {"crd": "x", "dkd": "+", "mdistiller": "1"}
    for ax, pair in zip(axes.flat, pairs):
        group = [r for r in rows if (r.teacher, r.student) == pair]
        xs = range(len(group))
        for offset, protocol, style in ((-0.12, "last", "o"), (0.12, "best", "s")):
            stats = [r.last if protocol == "last" else r.best for r in group]
            pts = [(x + offset, s.mean, s.std or 0.0) for x, s in zip(xs, stats) if s.mean is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                            ms=4, capsize=2, fillstyle="full" if protocol == "last" else "none",
                            label=f"ours ({protocol} epoch)")
        for key in sources:
            pts = [(x, r.published.get(key)) for x, r in zip(xs, group) if r.published.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", ms=8,
                        marker=markers.get(key, "*"), color="black" if key == "crd" else "tab:red",
                        label=f"{SOURCES[key].label} ({SOURCES[key].protocol})")
        teacher, student = pair
        ax.set_title(student if teacher == "-" else f"{teacher} → {student}", fontsize=10)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.method for r in group], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(inputs: Sequence[str], out: Path, sources: Sequence[str] = DEFAULT_SOURCES,
            tables: Sequence[str] = (), figure: bool = True, title: str = "Results") -> tuple[list[Row], list[Run]]:
    """Read the runs, write ``out``.md/.csv/.png and return the rows and runs."""
    published = load_published(sources)
    runs = [read_run(p) for p in find_run_dirs(inputs)]
    rows = build_rows(runs, published, tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows, runs, sources, title)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_csv(rows, sources, out.with_suffix(".csv"))
    if figure and rows:
        plot(rows, sources, out.with_suffix(".png"))
    return rows, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="run directories, multirun folders or glob patterns")
    parser.add_argument("--out", default="results/results",
                        help="output path without suffix: writes OUT.md, OUT.csv, OUT.png (default results/results)")
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
    try:
        _, runs = collect(args.inputs, Path(args.out), sources, args.table, not args.no_figure, args.title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(args.out).with_suffix(".md").read_text())
    if not runs:
        print("warning: no run directories found under " + " ".join(args.inputs), file=sys.stderr)
    written = [Path(args.out).with_suffix(s) for s in (".md", ".csv") + (() if args.no_figure else (".png",))]
    print("wrote " + ", ".join(str(p) for p in written if p.exists()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
