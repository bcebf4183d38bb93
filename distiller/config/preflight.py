"""The check before Hydra runs: every override read as Hydra will, the config composed and validated once,
and in a sweep (``-m``) every value of every swept key, so a typo in the middle of ``seed=8,abc,9`` stops the
sweep in one line before any job (:func:`preflight`). Names are spelled as registered on the way
(:func:`canonical_model_choices`)."""
from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError
from distiller.config import run_record
from distiller.config.before_start import check_before_start
from distiller.config.command_line import debug_mode, explain_config_error, fail
from distiller.config.compose import CONFIG_DIR, compose
from distiller.config.key_scope import check_added_keys
from distiller.config.overrides import added_top_level_keys, override_key, readable_overrides, set_keys, sweep_axes
from distiller.config.schema import SCHEMAS
from distiller.config.validation import validate
from distiller.methods import METHODS
from models import MODELS


def _method_config(name: str) -> str:
    """The ``configs/distill`` file a method name chooses: its own, or, for an alias without a file of its own
    (``hint``, ``attention``, ...), the file of the method it names; in any case (``KD``, ``CRD_KD``), as
    network names are."""
    files = {path.stem.lower(): path.stem for path in (CONFIG_DIR / "distill").glob("*.yaml")}
    if name.lower() in files:
        return files[name.lower()]
    if name.lower() in METHODS:
        return METHODS.canonical(name.lower())
    return name


def canonical_model_choices(argv: list[str]) -> list[str]:
    """``model=``, ``teacher=`` and ``student=`` choices spelled as registered (names are case-insensitive), and
    ``distill=`` (or ``+distill@combine.<key>=``) method aliases as the method's config (``distill=hint``: fitnet)."""
    out = []
    for arg in argv:
        choice = re.fullmatch(r"(model|teacher|student)=(.+)", arg)
        method = re.fullmatch(r"(\+?distill(?:@combine\.\w+)?)=(.+)", arg)
        if choice:
            names = [MODELS.canonical(n) if n in MODELS else n for n in choice.group(2).split(",")]
            arg = f"{choice.group(1)}={','.join(names)}"
        elif method:
            arg = f"{method.group(1)}={','.join(_method_config(n) for n in method.group(2).split(','))}"
        out.append(arg)
    return out


def preflight(config_name: str, argv: list[str]) -> None:
    """Compose and validate the config once with the command-line overrides; a mistake ends here in one line.

    Overrides Hydra cannot read as typed are first made readable (quoted), and architecture names
    rewritten as registered (``sys.argv`` too, for Hydra). In a sweep (``-m``), each value of each
    swept key is checked with the other keys at their first value (a sum of compositions, not the
    product; a mistake only some combinations make is reported by its job). Hydra's other flags
    (``--cfg``, ``-cn``, ...) are left to Hydra.
    """
    run_record.forget_new_folders()
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        if sys.argv[1:] == argv:  # Hydra's own flags (--cfg job, ...): only the names spelled as registered
            sys.argv[1:] = canonical_model_choices(argv)
        return
    flags = [a for a in argv if a in ("-m", "--multirun")]
    try:
        overrides = canonical_model_choices(readable_overrides([a for a in argv if a not in flags], multirun))
    except UserError as err:
        if debug_mode():
            raise
        fail(str(err))
    if sys.argv[1:] == argv:
        sys.argv[1:] = flags + overrides
    if debug_mode():
        return
    job = config_name if config_name in SCHEMAS else None
    try:
        if job:
            groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()} | {"model", "teacher", "student"}
            check_added_keys(added_top_level_keys(overrides, groups), job)
    except UserError as err:
        fail(str(err))
    if not multirun:
        try:
            cfg = compose(config_name, overrides, return_hydra_config=True)
            check_preset_cell(cfg, overrides)
            _check(cfg, job, set_keys(overrides))
            run_record.check_run_dir(str(cfg.hydra.run.dir))
            run_record.note_new_folders(Path(str(cfg.hydra.run.dir)))
        except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
            fail(explain_config_error(err, config_name, overrides))
        return
    _check_sweep(config_name, job, overrides)


def _check(cfg: DictConfig, job: str | None, keys: set[str]) -> None:
    """The checks the job makes before it starts (:func:`distiller.config.before_start.check_before_start`),
    and that each key the command line sets (``keys``) that may go unread is read. ``hydra.job.chdir=true`` is
    refused: every path a job reads (data, teacher checkpoints, ``teacher_dir``) is relative to the folder the
    command starts in, which a changed working directory would silently move."""
    if "hydra" in cfg and cfg.hydra.job.get("chdir"):
        raise UserError("hydra.job.chdir=true is not supported: the jobs read data, teacher checkpoints and "
                        "teacher_dir relative to the folder you start them in; leave it false (the run still "
                        "writes to hydra.run.dir)")
    if job is None:
        validate(cfg)
    else:
        check_before_start(cfg, job, keys)


def preset_sweep(cfg: DictConfig) -> dict[str, str]:
    """What a preset (``experiment=``) sweeps when run with ``-m``: its ``hydra.sweeper.params``, key -> values."""
    params = cfg.hydra.sweeper.get("params") if "hydra" in cfg and "sweeper" in cfg.hydra else None
    return {str(k): str(v) for k, v in (params or {}).items()}


def check_preset_cell(cfg: DictConfig, overrides: list[str]) -> None:
    """A sweep preset without ``-m`` runs one job: only when the command line chooses its cell (every key the
    preset sweeps but the seed), else one line, where Hydra would silently run the defaults as a single job."""
    _, axes = sweep_axes([f"{k}={v}" for k, v in preset_sweep(cfg).items()])
    swept = [key for key, values in axes.items() if len(values) > 1]  # one value: the preset's one job
    unset = [key for key in swept if key not in set_keys(overrides) and key != "seed"]  # seed: 0 unless given
    if unset:
        preset = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "experiment"), "this preset")
        raise UserError(f"experiment={preset} is a sweep over {', '.join(swept)}: add -m to run its jobs, or choose "
                        f"one of them with {' '.join(f'{key}=...' for key in unset)}")


def _preset_axes(config_name: str, plain: list[str], axes: dict[str, list[str]]) -> dict[str, list[str]]:
    """The keys a preset on the command line sweeps that the command line does not, at their first value: what
    Hydra's sweeper adds to every job (a preset of the other entry point fails here, in one line)."""
    if not any(override_key(o) == "experiment" for o in plain):
        return {}
    try:
        cfg = compose(config_name, plain + [f"{k}={v[0]}" for k, v in axes.items() if v], return_hydra_config=True)
    except Exception:  # noqa: BLE001 - the checks below report a composition failure in one line
        return {}
    given = set_keys(plain) | set(axes)
    _, preset_axes = sweep_axes([f"{k}={v}" for k, v in preset_sweep(cfg).items() if k not in given])
    return {key: values[:1] for key, values in preset_axes.items()}


def _check_sweep(config_name: str, job: str | None, overrides: list[str]) -> None:
    """Every value of every swept key composes and validates (with the other keys at their first value); a
    preset's own swept keys at their first value."""
    plain, axes = sweep_axes(overrides)
    for key, values in _preset_axes(config_name, plain, axes).items():
        known = {f.name for f in dataclasses.fields(SCHEMAS[config_name])} if config_name in SCHEMAS else None
        if known is not None and key.split(".")[0] not in known:
            other = next(name for name in SCHEMAS if name != config_name)
            preset = next(o.split("=", 1)[1] for o in plain if override_key(o) == "experiment")
            fail(f"experiment={preset} sweeps {key}, which {config_name}.py has not: it is a preset of {other}.py "
                 f"(python {other}.py -m experiment={preset})")
        axes[key] = values
    for key, values in axes.items():
        repeated = next((value for value in values if values.count(value) > 1), None)
        if repeated is not None:
            fail(f"the sweep names {key}={repeated} more than once ({key}={','.join(values)}): its jobs would be one "
                 f"run twice; give each value once")
    first = [f"{key}={values[0]}" for key, values in axes.items() if values]
    trials = [first] + [[f"{k}={v[0]}" for k, v in axes.items() if k != key and v] + [f"{key}={value}"]
                        for key, values in axes.items() for value in values[1:]]
    folders: dict[str, list[str]] = {}  # each trial's run folder below the sweep's -> the trials that use it
    for number, trial in enumerate(trials):
        try:
            cfg = compose(config_name, plain + trial, return_hydra_config=True)
            _check(cfg, job, set_keys(plain + trial))
            if number == 0:  # the sweep's own folder, where Hydra writes before any job runs
                run_record.check_run_dir(str(cfg.hydra.sweep.dir), "hydra.sweep.dir")
        except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
            where = f" (in the sweep's job with {' '.join(trial)}; nothing was run)" if axes else ""
            fail(explain_config_error(err, config_name, plain + trial) + where)
        folder = _job_folder(cfg)
        if folder is not None:
            folders.setdefault(folder, []).append(trial)
    shared = next(((folder, jobs) for folder, jobs in folders.items() if len(jobs) > 1), None)
    if shared is not None:  # the second job would be refused as 'a different run' after the first trained
        folder, (one, other) = shared[0], shared[1][:2]
        differ = [t for t in one + other if t not in set(one) & set(other)]
        key = override_key(differ[0])
        # Hydra's quotes keep the commas of the interpolations in one value of a -m sweep; the shell's keep the $
        subdir = shlex.quote(f'hydra.sweep.subdir="{_raw_subdir(cfg)}/{key}=${{{key}}}"')
        fail(f"the sweep's jobs with {' '.join(t for t in one if t in differ)} and "
             f"{' '.join(t for t in other if t in differ)} would share one run directory ({folder}), whose name "
             f"does not hold {key}: add it to hydra.sweep.subdir, e.g. {subdir}, or run one value per command")


def _job_folder(cfg: DictConfig) -> str | None:
    """A sweep job's run folder below the sweep's (``hydra.sweep.subdir`` resolved), or None when it names
    Hydra's job number or cannot be resolved before the job runs."""
    from omegaconf import OmegaConf

    raw = _raw_subdir(cfg)
    if raw is None or "hydra." in raw:
        return None
    try:
        return str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    except Exception:  # noqa: BLE001 - a folder name only a running job can resolve: not checked here
        return None


def _raw_subdir(cfg: DictConfig) -> str | None:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.hydra.sweep, resolve=False) if "hydra" in cfg else {}
    return None if node.get("subdir") is None else str(node["subdir"])
