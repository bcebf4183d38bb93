"""One command per published table: its Hydra multirun(s), through whichever Hydra launcher you pick.

    python scripts/sweep_table.py teachers                     # first: the six table teachers
    python scripts/sweep_table.py crd_table1                   # CRD Table 1 (incl. its FSP column)
    python scripts/sweep_table.py imagenet --dry-run           # one preset per cell; on 8 GPUs run each cell as
        torchrun --nproc_per_node=8 train_student.py experiment=imagenet/r34_r18/dkd dataset.root=DIR
    python scripts/sweep_table.py crd_table2 hydra/launcher=local_gpus hydra.launcher.n_jobs=8
    python scripts/sweep_table.py dkd hydra/launcher=slurm hydra.launcher.partition=gpu
    python scripts/sweep_table.py crd_table1 seed=0 --dry-run   # list the cells and commands, run nothing

A table is one or more experiment presets (``configs/experiment/``), each an ordinary Hydra multirun
over ``pair x distill x seed`` (``hydra.sweeper.params``). CRD Table 1 needs two, because FSP does not
apply to one of its pairs and a Hydra sweep is a cartesian product. This script only runs
``python <entry point> -m experiment=<preset> [OVERRIDES]`` for each preset, one after the other;
the launcher in the overrides decides where the jobs run. Overrides after the table name go to every
preset (``seed=0`` replaces the preset's seeds). Finished runs are skipped by the entry points, so a
sweep that died midway is continued by running the same command again.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from common.errors import UserError
from distiller.config.command_line import OneLineParser, fail
from distiller.config.overrides import override_key, readable_overrides, sweep_axes
from distiller.config.preflight import canonical_model_choices, preflight, preset_sweep

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# table -> (entry point, experiment presets run in this order)
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    # mdistiller's ImageNet tables (configs/experiment/imagenet/: one preset per cell, each its own batch and lr)
    "imagenet": ("train_student.py", tuple(f"imagenet/{pair}/{method}" for pair, methods in (
        ("r34_r18", ("kd", "at", "crd", "reviewkd", "dkd", "dot")),
        ("r50_mv1", ("kd", "at", "crd", "ofd", "reviewkd", "dkd", "dot"))) for method in methods)),
    # DOT's Tiny-ImageNet table (configs/experiment/tiny_imagenet/)
    "tiny_imagenet": ("train_student.py", tuple(f"tiny_imagenet/{pair}/{method}" for pair in ("r18_mv2", "r18_shuv2")
                                               for method in ("kd", "dot"))),
    "teachers": ("train_teacher.py", ("table_teachers",)),
    "baselines": ("train_teacher.py", ("table_baselines",)),
    "crd_table1": ("train_student.py", ("crd_table1", "crd_table1_fsp")),
    "crd_table2": ("train_student.py", ("crd_table2",)),
    "dkd": ("train_student.py", ("dkd_tables",)),
    "new_methods": ("train_student.py", ("new_methods_table", "new_methods_table_dot")),
    # the methods of 2023-2026 on the standard recipe, then SKD's and WKD's published recipes (runs/paper/)
    "methods_2025": ("train_student.py", ("methods_2025_standard", "methods_2025_skd_paper", "methods_2025_wkd_paper",
                                          "methods_2025_wkd_lf_paper")),
}


def entry_point(preset: str) -> str:
    """The entry point whose config a preset belongs to (teacher presets sweep ``model``)."""
    for entry, presets in TABLES.values():
        if preset in presets:
            return entry
    return "train_student.py"


def preset_params(preset: str, overrides: Sequence[str] = ()) -> list[str]:
    """The preset's ``hydra.sweeper.params`` as override lines (``pair=a,b``), composed with the overrides."""
    from distiller.config.compose import compose

    plain, _ = sweep_axes(list(overrides))
    cfg = compose(Path(entry_point(preset)).stem, [f"experiment={preset}", *plain], return_hydra_config=True)
    return [f"{k}={v}" for k, v in preset_sweep(cfg).items()]


def expand_preset(preset: str, overrides: Sequence[str] = ()) -> list[dict[str, str]]:
    """The jobs of one preset: its ``hydra.sweeper.params`` with the overrides applied, expanded by
    Hydra's own override parser into one {key: value} dict per job (the same product Hydra launches)."""
    axes = expand_axes(preset_params(preset, overrides) + list(overrides))
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def expand_axes(lines: Sequence[str]) -> dict[str, list[str]]:
    """Each key of override ``lines`` with its values (one for a plain override); later lines replace earlier
    ones, as in Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(list(lines)):
        key = override.get_key_element()
        axes[key] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                     else [override.get_value_element_as_str()])
    return axes


CELL_KEYS = ("pair", "distill", "model")  # what tells a table's cells apart


def selected_presets(table: str, overrides: Sequence[str]) -> dict[str, list[str]]:
    """The table's presets that hold a cell the overrides choose, each with the overrides it runs under.

    An override of a cell key (``distill=kd,fsp``) is narrowed, per preset, to the values that preset sweeps,
    and a preset with none of them is left out: CRD Table 1's FSP preset would otherwise run KD on its pairs
    a second time, and its main preset FSP on a pair FSP cannot take. One line when no preset is left, or
    when the overrides name another preset (``experiment=``).
    """
    _, presets = TABLES[table]
    if any(override_key(o) == "experiment" for o in overrides):
        raise UserError(f"experiment= is not an override of a table: {table} runs its own presets "
                        f"({', '.join(presets)}); run another one with python {TABLES[table][0]} -m experiment=NAME")
    chosen = {key: values for key, values in expand_axes(overrides).items() if key in CELL_KEYS}
    kept: dict[str, list[str]] = {}
    for preset in presets:
        own = expand_axes(preset_params(preset))
        narrowed, holds = list(overrides), True
        for key, values in chosen.items():
            if key in own:
                keep = [v for v in values if v in own[key]]
                holds = holds and bool(keep)
                narrowed = [o for o in narrowed if override_key(o) != key] + [f"{key}={','.join(keep)}"]
        if holds:
            kept[preset] = narrowed
    if not kept:
        asked = " ".join(f"{k}={','.join(v)}" for k, v in chosen.items())
        raise UserError(f"no cell of the {table} table has {asked}: its presets sweep other values; to run such "
                        f"cells with a preset's recipe: python {TABLES[table][0]} -m experiment={presets[0]} {asked}")
    return kept


def all_known(overrides: Sequence[str]) -> bool:
    """Whether every value the overrides give a cell key is a name of its config group (a file of configs/<key>/,
    or an architecture of the zoo for ``model``)."""
    from models import MODELS

    return all(value in MODELS if key == "model" else (CONFIGS / key / f"{value}.yaml").is_file()
               for key, values in expand_axes(overrides).items() if key in CELL_KEYS for value in values)


def commands(table: str, overrides: Sequence[str], presets: dict[str, list[str]] | None = None) -> list[list[str]]:
    """The multirun command of each preset (``presets``: :func:`selected_presets`' answer, else found here)."""
    entry, _ = TABLES[table]
    chosen = selected_presets(table, overrides) if presets is None else presets
    return [[sys.executable, str(REPO / entry), "-m", f"experiment={preset}", *own] for preset, own in chosen.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("table", choices=sorted(TABLES), help="which table to run")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="Hydra overrides for every preset (launcher, seeds, ...)")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and the commands; run nothing")
    args = parser.parse_args(argv)
    entry, every_preset = TABLES[args.table]
    try:  # as the entry points read them: quoted where Hydra needs it, names as registered (distill=hint: fitnet)
        args.overrides = canonical_model_choices(readable_overrides(list(args.overrides), multirun=True))
    except UserError as err:
        fail(str(err))
    try:  # the presets holding the cells the overrides choose (all of them without a cell key), each's overrides
        presets, none_chosen = selected_presets(args.table, args.overrides), None
    except UserError as err:
        if any(override_key(o) == "experiment" for o in args.overrides) or all_known(args.overrides):
            fail(str(err))
        # a misspelt value (distill=kdd): the checks below name it better
        presets, none_chosen = {preset: list(args.overrides) for preset in every_preset}, err
    # a dry run lists the cells of a table whose data is elsewhere (ImageNet) without its folder
    given_root = any(o.lstrip("+").split("=")[0] == "dataset.root" for o in args.overrides)
    stand_in = ["dataset.root=DATA_ROOT"] if args.dry_run and not given_root else []
    for preset, own in presets.items():  # a mistake in the overrides stops here, in one line, before any job runs
        preflight(Path(entry).stem, ["-m", f"experiment={preset}", *own, *stand_in])
        if own:  # then with the preset's own axes (each value with the others at their first), as
            # Hydra launches them: an override can clash with a cell (teacher=X with pair=...); the presets
            # alone are checked cell by cell by the test suite
            given = {override_key(o) for o in [*own, *stand_in]}
            axes = [line for line in preset_params(preset, [*own, *stand_in]) if override_key(line) not in given]
            preflight(Path(entry).stem, ["-m", f"experiment={preset}", *axes, *own, *stand_in])
    if none_chosen is not None:
        fail(str(none_chosen))
    if args.dry_run:
        total = 0
        for (preset, own), command in zip(presets.items(), commands(args.table, args.overrides, presets)):
            jobs = expand_preset(preset, own)
            total += len(jobs)
            print(f"# experiment={preset}: {len(jobs)} runs")
            for job in jobs:
                print("  " + " ".join(f"{k}={v}" for k, v in job.items()))
            print("$ " + shlex.join(command[1:]))
        print(f"# {args.table}: {total} runs in all")
        return 0
    status = 0
    for command in commands(args.table, args.overrides, presets):
        print("$ " + shlex.join(command[1:]), flush=True)
        # one preset failing (a failed cell ends its multirun) must not keep the next preset from running
        result = subprocess.run(command, cwd=REPO, env=os.environ.copy())
        status = status or result.returncode
    if status:
        print(f"some runs of {args.table} failed; fix them and run the same command again "
              f"(finished runs are skipped)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
