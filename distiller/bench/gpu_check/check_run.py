"""Running the GPU check: its steps in order of priority under one time budget, then the report; and the CPU
precision check (fp32 against bf16 on this CPU, same seed), the evidence ``trainer.precision=auto`` needs."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from common.errors import UserError
from common.files import atomic_write
from distiller.bench.gpu_check.check_report import environment, markdown, row_dicts, write_report
from distiller.bench.gpu_check.check_settings import STEPS, Settings, dry_settings, subset_data_overrides
from distiller.bench.gpu_check.concurrency import step_concurrency
from distiller.bench.gpu_check.precision_compare import precision_comparison
from distiller.bench.gpu_check.rows import FAILED, Budget, Row, guarded
from distiller.bench.gpu_check.speed_steps import step_benchmark, step_compile, step_tests
from distiller.bench.gpu_check.training_steps import accuracy_runs, step_accuracy, step_ddp
from distiller.bench.report import jsonable

STEP_FUNCTIONS: dict[str, Callable[[Settings, Budget, Path], list[Row]]] = {
    "tests": step_tests, "benchmark": step_benchmark, "compile": step_compile, "accuracy": step_accuracy,
    "ddp": step_ddp, "concurrency": step_concurrency,
}


def parse_steps(only: str) -> list[str]:
    """The steps a comma-separated ``--only`` names, in its order; an unknown one is a :class:`UserError`."""
    steps = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in steps if x not in STEP_FUNCTIONS]
    if unknown:
        raise UserError(f"--only {unknown[0]} is not a step; the steps are {','.join(STEPS)}")
    if not steps:
        raise UserError(f"--only {only!r} names no step; give one or more of {','.join(STEPS)}, comma-separated")
    return steps


def run_check(s: Settings, steps: list[str], out: Path, argv: list[str], budget_s: float) -> int:
    """Run ``steps``, write the table and the JSON file; 0 when no step failed, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment(s, argv)
    budget = Budget(budget_s)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as tmp:
        for name in steps:
            print(f"[gpu_check] {name} ({max(0.0, budget.left()):.0f} s of budget left)", flush=True)
            before = len(rows)
            guarded(name, "(step)", rows, budget, lambda name=name: STEP_FUNCTIONS[name](s, budget, Path(tmp)))
            for r in rows[before:]:
                print(f"[gpu_check]   {r.step} | {r.config} | {r.status} {r.detail}", flush=True)
    footprints = [r.extra.get("footprint_mib") for r in rows if r.extra.get("footprint_mib")]
    table = markdown(env, rows)
    data = {**env, "rows": row_dicts(rows), "footprint_mib": max(footprints) if footprints else None}
    md_path, json_path = write_report(out, "gpu_check", table, data)
    if not env["dry_run"]:  # the latest real figures, where hydra/launcher=local_gpus looks for the footprint
        atomic_write(jsonable(data), out / "gpu_check.json", "json")
    print(table)
    print(f"table: {md_path}\njson:  {json_path}", flush=True)
    return 1 if any(r.status == FAILED for r in rows) else 0


def cpu_precision_check(subset_dir: Path, model: str, epochs: int, seed: int, out: Path, argv: list[str]) -> int:
    """fp32 vs bf16 on this CPU, same seed, ``model`` trained ``epochs`` epochs on the subset under ``subset_dir``."""
    from distiller.engine.runtime import cpu_has_native_bf16

    data = subset_data_overrides(subset_dir)
    if data is None:
        raise UserError(f"no CIFAR-100 subset under {subset_dir}; write it first: python scripts/gpu_check.py "
                        "--write-subset (with the same --subset-dir)")
    native = cpu_has_native_bf16()
    s = dry_settings(out)
    env = environment(s, argv)
    env["dry_run"] = False
    env["device"] += f" (bf16 {'native' if native else 'EMULATED: no avx512_bf16/amx_bf16'})"
    with tempfile.TemporaryDirectory(prefix="kd-precision-") as tmp:
        rows = accuracy_runs({"fp32": ["trainer.precision=fp32"], "bf16": ["trainer.precision=bf16"]}, None,
                             model, (epochs, epochs), data, 64, "cpu", Path(tmp), Budget(1e9), seed)
        rows.append(precision_comparison(rows))
    table = markdown(env, rows)
    md_path, json_path = write_report(out, "cpu_precision", table, {**env, "native_bf16": native,
                                                                    "rows": row_dicts(rows)})
    print(table)
    print(f"table: {md_path}\njson:  {json_path}", flush=True)
    return 1 if any(r.status == FAILED for r in rows) else 0
