"""The GPU check's report: the machine and versions it ran on, one Markdown table, and a JSON file of the
same figures (under ``runs/gpu_check/`` by default; the table goes into docs/benchmarks.md)."""
from __future__ import annotations

import dataclasses
import datetime
import platform
import shlex
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_write
from distiller.bench.gpu_check.check_settings import Settings
from distiller.bench.gpu_check.rows import Row
from distiller.bench.report import jsonable
from distiller.bench.timing import device_name


def environment(s: Settings, argv: list[str]) -> dict[str, Any]:
    """Date, device, versions and the command line of this check."""
    device = torch.device(s.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "gpus": torch.cuda.device_count() if s.device == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "command": " ".join(["python scripts/gpu_check.py", *map(shlex.quote, argv)]),
        "dry_run": s.device == "cpu",
    }


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(env: dict[str, Any], rows: list[Row]) -> str:
    """The header lines and one table row per :class:`Row`."""
    head = [
        f"GPU check, {env['date']}: {env['device']}" + (f" x {env['gpus']}" if env["gpus"] else "")
        + f"; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}"
        + ("; DRY RUN on the CPU (tiny settings: the figures only show that every step runs)"
           if env["dry_run"] else ""),
        "",
        f"Command: `{env['command']}`",
        "",
        "| step | config | images/s | ms/step | MFU | peak memory | speedup | accuracy (top-1) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
        status = r.status + (f": {r.detail}" if r.detail else "")
        head.append(f"| {r.step} | {r.config} | {_f(r.images_per_sec, '.0f')} | {_f(r.ms_per_step, '.2f')} | "
                    f"{'-' if r.mfu is None else f'{100 * r.mfu:.1f} %'} | {_f(mem, '.0f')}"
                    f"{'' if mem is None else ' MiB'} | {_f(r.speedup, '.2f')}{'' if r.speedup is None else 'x'} | "
                    f"{r.accuracy or '-'} | {status.replace('|', '/')} |")
    return "\n".join(head) + "\n"


def write_report(out: Path, prefix: str, table: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """``<out>/<prefix>-<UTC stamp>.md`` (the table) and ``.json`` (``data``, made strict JSON); both paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    md_path, json_path = out / f"{prefix}-{stamp}.md", out / f"{prefix}-{stamp}.json"
    md_path.write_text(table)
    atomic_write(jsonable(data), json_path, "json")
    return md_path, json_path


def row_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """The rows as the JSON file holds them (every field, ``extra`` included)."""
    return [dataclasses.asdict(r) for r in rows]
