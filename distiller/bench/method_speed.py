"""Several methods' step speed side by side (``scripts/benchmark.py --methods SET``): each method of a preset
on the same pair, in one process, every step built and warmed up first, then timed in interleaved rounds.

A row per method: ``label``, ``status`` (``ok``, ``unavailable``: its config file does not exist yet,
``failed``: it raised, the others still run) and, when ok, its figures and its ratio to KD's (``vs_kd``).
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from distiller.bench.bench_settings import bench_settings, compose_benchmark, random_data_set, use_settings_data
from distiller.bench.flops import count_step_flops
from distiller.bench.report import fmt
from distiller.bench.timed_step import EngineStep, build_engine_step, load_bench_job
from distiller.bench.timing import device_name, seconds_per_call, synchronize
from distiller.config.compose import CONFIG_DIR
from distiller.config.overrides import override_key
from distiller.engine.runtime import Runtime, make_runtime
from models.external import network_label

# ``--methods`` presets: label -> the overrides that select the method. KD first: the ratios' base.
METHOD_SETS: dict[str, dict[str, list[str]]] = {
    "new": {
        "kd": ["distill=kd"],
        "dist": ["distill=dist"],
        "ctkd": ["distill=ctkd"],
        "mlkd": ["distill=mlkd"],
        "wttm": ["distill=wttm"],
        "ttm": ["distill=ttm"],
        "nkd": ["distill=nkd"],
        "kd+ls": ["distill=kd", "distill.logit_standardize=true"],
        "kd+dot": ["distill=kd", "optim=dot"],
    },
    "methods_2025": {  # the methods of 2023-2026, each with its published CIFAR-100 defaults
        "kd": ["distill=kd"],
        **{name: [f"distill={name}"] for name in (
            "rld", "luminet", "skd", "abkd", "eakd", "eakd_dkd", "normkd", "normkd_dkd", "wkd_l", "wkd_f",
            "sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd")},
    },
}
METHODS_PAIR = ("teacher=resnet32x4", "student=resnet8x4")
METHODS_DEFAULTS = ("bench.reference_steps=0",)  # methods are compared with KD, not with the older loop


def with_defaults(argv: list[str], defaults: tuple[str, ...]) -> list[str]:
    """``defaults`` for the keys ``argv`` leaves unset (Hydra rejects a key given twice), then ``argv``."""
    given = {override_key(a) for a in argv}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(argv)


def method_available(overrides: list[str]) -> str | None:
    """None when every ``distill=``/``optim=`` group option of ``overrides`` has its config file, else why not."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("distill", "optim") and not (CONFIG_DIR / key / f"{value}.yaml").is_file():
            return f"configs/{key}/{value}.yaml does not exist yet"
    return None


@dataclasses.dataclass
class _MethodRun:
    label: str
    built: EngineStep
    runtime: Runtime
    warmup_s: float
    flops_step: int | None
    times: list[float] = dataclasses.field(default_factory=list)


def _failure(label: str, err: Exception) -> dict[str, Any]:
    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    return {"label": label, "status": "failed", "error": message}


def measure_methods(set_name: str, argv: list[str]) -> list[dict[str, Any]]:
    """Time every method of ``METHOD_SETS[set_name]`` with the common overrides ``argv``; one row per method.

    Every method's step is built and warmed up first; then ``bench.rounds`` rounds each time
    ``bench.steps`` steps of every method in turn, and the best round of each counts: on a
    shared machine a burst of load hits all methods of a round alike, instead of whichever
    method happened to run then.
    """
    if set_name not in METHOD_SETS:
        raise UserError(f"--methods {set_name} is not a method set; use one of: {', '.join(METHOD_SETS)}")
    if any(a.split("=", 1)[0] in ("distill", "optim") for a in argv):
        raise UserError("--methods chooses distill= and optim= itself; leave them out of the overrides")
    common = with_defaults(argv, METHODS_PAIR + METHODS_DEFAULTS)
    rows: dict[str, dict[str, Any]] = {}
    runs: list[_MethodRun] = []
    bench = bench_settings(compose_benchmark(common + ["distill=kd"]))
    with random_data_set(), tempfile.TemporaryDirectory(prefix="kd-benchmark-") as tmp:
        for label, overrides in METHOD_SETS[set_name].items():
            why = method_available(overrides)
            if why is not None:
                rows[label] = {"label": label, "status": "unavailable", "error": why}
                continue
            try:
                cfg = compose_benchmark(common + overrides)
                use_settings_data(cfg, bench)
                bench_job = load_bench_job(cfg)
                runtime = make_runtime(bench_job.job.trainer)
                built = build_engine_step(bench_job, runtime, bench.phase, Path(tmp) / f"m{len(runs)}")
                started = time.perf_counter()
                for _ in range(bench.warmup):
                    built.next()
                synchronize(runtime.device)
                warmup_s = time.perf_counter() - started
                flops = count_step_flops(built, next(built.batches)) if bench.flops else None
                runs.append(_MethodRun(label, built, runtime, warmup_s, flops))
                rows[label] = {"label": label, "status": "ok"}
            except Exception as err:  # noqa: BLE001 - one method's failure must not hide the others' figures
                rows[label] = _failure(label, err)
        for _ in range(bench.rounds):
            for run_ in list(runs):
                try:
                    run_.times.append(seconds_per_call(run_.built.next, bench.steps))
                except Exception as err:  # noqa: BLE001 - as above
                    rows[run_.label] = _failure(run_.label, err)
                    runs.remove(run_)
    for run_ in runs:
        built, rt, job = run_.built, run_.runtime, run_.built.job
        ms = 1e3 * min(run_.times)
        ips = 1e3 * built.batch_size / ms
        rows[run_.label].update({
            "images_per_sec": ips, "ms_per_step": ms, "ms_per_step_rounds": [1e3 * t for t in run_.times],
            "reference_images_per_sec": None, "flops_per_step": run_.flops_step,
            "flops_per_image": run_.flops_step / built.batch_size if run_.flops_step is not None else None,
            "device": rt.device.type, "device_name": device_name(rt.device), "threads": torch.get_num_threads(),
            "teacher": network_label(job.teacher), "student": network_label(job.student),
            "method": job.method_label, "batch_size": built.batch_size,
            "precision": rt.precision, "channels_last": rt.channels_last,
            "compile": rt.compile, "steps": bench.steps, "warmup": bench.warmup,
            "warmup_s": run_.warmup_s, "rounds": bench.rounds, "data": bench.data, "torch": torch.__version__})
        print(f"[benchmark] {run_.label}: {ips:.1f} images/s", file=sys.stderr, flush=True)
    base = rows.get("kd") if rows.get("kd", {}).get("status") == "ok" else None
    for r in rows.values():
        if r["status"] == "ok" and base is not None:
            r["vs_kd"] = r["images_per_sec"] / base["images_per_sec"]
    return list(rows.values())


def methods_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure_methods` rows."""
    first = next((r for r in rows if r["status"] == "ok"), None)
    lines = []
    if first is not None:
        lines.append(f"{first['teacher']} -> {first['student']}, batch {first['batch_size']}, {first['device']} "
                     f"({first['device_name']}), {first['threads']} threads, precision {first['precision']}, "
                     f"compile {first['compile']}, {first['steps']} timed steps per round, best of "
                     f"{first['rounds']} interleaved round(s), torch {first['torch']}")
        lines.append("")
    lines += ["| method | images/s | ms/step | vs KD | FLOPs/image |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']}: {r['error']} | | | |")
            continue
        lines.append(f"| {r['label']} | {fmt(r['images_per_sec'])} | {fmt(r['ms_per_step'])} | "
                     f"{fmt(r.get('vs_kd'), 'x', digits=2)} | {fmt(r['flops_per_image'], ' G', 1e9, 3)} |")
    return "\n".join(lines)
