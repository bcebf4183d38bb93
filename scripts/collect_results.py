"""Turn run directories into the paper tables: our mean ± std over seeds next to the published numbers.

    python scripts/collect_results.py runs/                       # everything under runs/
    python scripts/collect_results.py runs/student 'runs/teacher/*/seed*' --table crd_table1
    python scripts/collect_results.py runs/ --out results/dkd --table dkd_same_arch --table dkd_cross_arch
    python scripts/collect_results.py runs/student --out results/new --sources post_dkd --table lskd_same_arch

Reads any set of run directories (a multirun folder, a glob, single runs) into one tidy table, one
row per run, and groups it per data set (never averaged across; each image folder is its own): student
runs by (teacher, student, method), plain cross-entropy runs (``train_teacher.py``) by architecture. The
runs of one group must differ only in their seed and in keys that change nothing trained (paths, device,
workers, logging, ...: ``NOT_TRAINING_KEYS`` in distiller/results/runs.py), and must not repeat a seed;
else it is refused in one line naming the keys and values, or the seed, and the runs. Both evaluation
protocols are reported: top-1 of the last epoch (the CRD tables) and of the best epoch (the DKD tables), mean
± sample std over finished seeds and the number of runs. Each published source is placed beside the
protocol it used, with the difference ours - published. A pair's ``teacher`` and ``student`` rows
are the plain cross-entropy runs of those architectures, when they are among the inputs. Runs that
are not finished (still training, stopped, failed) are counted and listed, never silently dropped; a
directory that cannot be read (a sweep job that died on a typo, a run without its config.yaml) is skipped
with a warning naming it.

The post-DKD methods (DIST, LS, CTKD, MLKD, DOT, WTTM/TTM, NKD; source ``post_dkd``) were published
under different recipes, so each of their published numbers carries its recipe: epochs, views per
step, augmentation, and best or last epoch (MLKD: 480 or 960 epochs, 2 views with RandAugment +
Cutout, best epoch). Runs with ``distill.logit_standardize=true`` or ``optim=dot`` are grouped as
their own method (``kd_ls``, ``kd_dot``, ...), like the ``kd_ls`` / ``experiment=new_methods_table_dot``
presets name them. The methods of 2023-2026 (source ``methods_2025``) likewise: SKD's and WKD's numbers
say what their recipe changed and which 'paper' preset re-runs it; a number quoted by a secondary source
says so (it backs no paper preset). A cell whose runs departed from the settings behind its published
number is flagged ``NOT_PUBLISHED_SETTINGS: <why>`` in the ``settings`` column (WTTM/TTM: their per-pair
gamma and beta are not known, so every cell but TTM vgg13 -> vgg8 with the README's values).

Writes ``<out>.md`` (Markdown, also printed), ``<out>.csv`` (the summary, one row per table cell),
``<out>_runs.csv`` (the tidy per-run table: ``pandas.read_csv`` it for your own analysis) and
``<out>.png`` (per pair: our accuracy vs published, per method); ``--out results/t.md`` (or .csv, .png)
is ``--out results/t``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.errors import UserError
from distiller.config.command_line import OneLineParser
from distiller.results.published import DEFAULT_SOURCES, SOURCES
from distiller.results.tables import collect
from distiller.results.writers import output_paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="run directories, multirun folders or glob patterns")
    parser.add_argument("--out", default="results/results",
                        help="output path: writes OUT.md, OUT.csv, OUT_runs.csv, OUT.png; a suffix .md, .csv or .png "
                             "is stripped once first (results/t.md and results/t write the same files), any other "
                             "is kept (default results/results)")
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
        collect(args.inputs, args.out, sources, args.table, not args.no_figure, args.title)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = output_paths(Path(args.out))
    print(files.markdown.read_text())
    written = [files.markdown, files.summary, files.runs] + ([] if args.no_figure else [files.figure])
    print("wrote " + ", ".join(str(p) for p in written if p.exists()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
