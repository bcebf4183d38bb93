"""Plain helpers the tests share: seeds, tiny data, command lines (in process or not), forked ranks, descent checks.

Imported as ``from helpers import ...`` (a plain module, as pytest recommends, not ``conftest``);
the fixtures and session hooks stay in ``conftest.py``.

``KD_TEST_SEED_OFFSET`` (integer, default 0) is added to every seed the tests use: tests build
their generators with ``seed(k)`` / ``generator(k)`` instead of literal seeds, so
``KD_TEST_SEED_OFFSET=1 pytest ...`` reruns the suite on other random networks and batches.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
SEED_OFFSET = int(os.environ.get("KD_TEST_SEED_OFFSET", "0"))


def seed(base: int) -> int:
    """``base`` shifted by ``KD_TEST_SEED_OFFSET``: use it wherever a test would write a literal seed."""
    return base + SEED_OFFSET


def generator(base: int) -> torch.Generator:
    """A CPU generator seeded with ``seed(base)``."""
    return torch.Generator().manual_seed(seed(base))


def random_splits(n: int, num_classes: int, seed_base: int, test_n: int):
    """Random uint8 images with balanced labels, in memory (no files: the data's content does not matter);
    the test split is the first ``test_n`` training images."""
    from datasets import DataSplits

    gen = generator(seed_base)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % num_classes
    return DataSplits(images, labels, images[:test_n].clone(), labels[:test_n].clone(), num_classes,
                      [str(i) for i in range(num_classes)])


@dataclass
class CliResult:
    """What a command left behind: its exit status and what it printed (as ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600, in_process: bool = True) -> CliResult:
    """Run a command line exactly as a user types it (``python <script> <args>``); returns its exit status and output.

    By default in this process (the script runs as ``__main__`` with ``sys.argv``, the working
    directory and the environment it would have, and its exit status, stdout and stderr are
    captured): the same code path without the seconds of a fresh interpreter. Pass
    ``in_process=False`` where the process boundary itself is what is tested (a real interpreter
    start, signals, imports a fresh process makes).
    """
    if not in_process:
        return _run_subprocess(script, *args, cwd=cwd, env=env, timeout=timeout)
    return _run_in_process(script, *args, cwd=cwd, env=env)


def _run_subprocess(script: str, *args: str, cwd: Path | None, env: dict | None, timeout: float) -> CliResult:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=full_env,
                  capture_output=True, text=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def _run_in_process(script: str, *args: str, cwd: Path | None, env: dict | None) -> CliResult:
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved = {"argv": sys.argv[:], "path": sys.path[:], "env": dict(os.environ), "cwd": os.getcwd(),
             "threads": torch.get_num_threads(), "handlers": logging.getLogger().handlers[:],
             "levels": {name: logging.getLogger(name).level for name in ("", "distiller")}}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    path = REPO / script
    try:
        os.environ.pop("HYDRA_FULL_ERROR", None)
        os.environ.update(env or {})
        os.chdir(cwd or REPO)
        sys.argv = [str(path), *args]
        sys.path.insert(0, str(path.parent))  # as ``python script`` puts the script's folder first
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exit_:
                if isinstance(exit_.code, int) or exit_.code is None:
                    code = exit_.code or 0
                else:  # sys.exit("message"): printed to stderr, status 1
                    print(exit_.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - an uncaught exception ends a process with a traceback
                traceback.print_exc()
                code = 1
    finally:
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler not in saved["handlers"]:  # the job's log file and console handlers
                root.removeHandler(handler)
                handler.close()
        for handler in saved["handlers"]:
            if handler not in root.handlers:
                root.addHandler(handler)
        for name, level in saved["levels"].items():
            logging.getLogger(name).setLevel(level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        os.chdir(saved["cwd"])
        os.environ.clear()
        os.environ.update(saved["env"])
        sys.argv[:] = saved["argv"]
        sys.path[:] = saved["path"]
        torch.set_num_threads(saved["threads"])
    return CliResult(code, out.getvalue(), err.getvalue())


def run_ranks(target: Callable[..., None], world: int, *args: object) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` forked processes and require each to exit cleanly.

    Forked, not spawned: the children inherit the imported modules instead of re-importing torch.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * world


def signature_line(fn: Callable[..., object]) -> str:
    """``name(a, b=default, ...)``: a function's signature written as the method documents pin it."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    shown = ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
    return f"{fn.__name__}({shown})"


def tiny_overrides(tmp: Path, train_size: int = 200, test_size: int = 100) -> list[str]:
    """Overrides for a tiny, fast CPU run on synthetic data inside ``tmp``."""
    return [
        "dataset=synthetic", f"dataset.root={tmp / 'data'}", f"dataset.train_size={train_size}",
        f"dataset.test_size={test_size}", "dataset.batch_size=32", "dataset.eval_batch_size=100",
        "trainer.epochs=1", "trainer.device=cpu", "trainer.progress=false", f"teacher_dir={tmp / 'teachers'}",
    ]


def train_tiny_teacher(tmp: Path, *extra: str) -> CliResult:
    """Train a resnet8 teacher from the command line on :func:`tiny_overrides` data in ``tmp``; it must succeed.

    The run goes to ``tmp/teacher_run`` and the teacher to ``tmp/teachers/resnet8.pt``.
    """
    result = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={tmp / 'teacher_run'}",
                     *tiny_overrides(tmp), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --------------------------------------------------------------------------- descent checks
def fix_batch_statistics(modules: Iterable[torch.nn.Module], forward: Callable[[], object]) -> None:
    """Put ``modules`` in eval mode with every BatchNorm normalising by this batch's statistics.

    Each BatchNorm's running statistics are replaced by those of one forward pass (``forward``,
    run with only the BatchNorms in train mode and cumulative averaging, so one pass gives the
    batch's own mean and variance); then everything is in eval mode. The loss is then a fixed,
    deterministic function of the weights: no dropout, no statistics that move with the step,
    no mode-dependent side effects (CRD's bank update).
    """
    modules = list(modules)
    for module in modules:
        module.eval()
    bns = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        forward()
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.eval()


def graph_leaves(loss: torch.Tensor) -> dict[int, torch.Tensor]:
    """The leaf tensors a ``backward`` of ``loss`` would write a gradient into, by ``id``."""
    leaves, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad
            leaves[id(fn.variable)] = fn.variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


# One plain gradient step theta - eta g is accepted when the loss falls by at least half its
# first-order prediction, loss(theta - eta g) <= loss(theta) - C_ARMIJO eta |g|^2 (Armijo). For a
# function that is smooth near theta (ReLU kinks and hinges are crossed by no arbitrarily short
# step from a generic point) with g != 0 this holds for every eta below 1/L (L: curvature along g),
# so halving eta terminates. The search starts at |f| / |g|^2 (the first-order model would take
# the loss to zero) and stops once the required decrease falls below MIN_DECREASE * |f|: a
# decrease that is accepted is at least 2^-20 (~1e-6) of the loss, above float32's unit roundoff
# (6e-8) and ~10^9 above the rounding of a float64 loss (~1e-16 times its few thousand
# accumulated terms), so no rounding mode, kernel choice or instruction set can decide the check.
C_ARMIJO = 0.5
MIN_DECREASE = 2.0 ** -20


def assert_gradient_step_descends(loss_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter],
                                  frozen: Iterable[torch.nn.Parameter] = (),
                                  reaches: dict[str, Iterable[torch.nn.Parameter]] | None = None,
                                  min_decrease: float = MIN_DECREASE) -> tuple[float, float]:
    """Check the gradient of ``loss_fn`` and that one backtracked gradient step lowers it.

    ``params`` are what the phase trains (they must require gradients). Checked: the loss is a
    finite scalar; every leaf of its autograd graph is in ``params`` (a helper outside the
    optimizer, or a parameter a phase must leave alone, would appear there); ``frozen`` parameters
    get no gradient; the gradient is finite and non-zero, and non-zero on each group of
    ``reaches`` (a detached path leaves its group at zero); one step theta - eta g satisfies the
    Armijo condition above, with a required decrease of at least ``min_decrease * |loss|`` (raise
    it above the loss's rounding where part of it is computed in float32). Parameters are left at
    the accepted step. Returns (before, after). Call it on a deterministic function
    (``fix_batch_statistics``), in float64.
    """
    params = list(params)
    frozen = list(frozen)
    for p in params + frozen:
        p.grad = None
    loss = loss_fn()
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    ids = {id(p) for p in params}
    stray = [tuple(t.shape) for i, t in graph_leaves(loss).items() if i not in ids]
    assert not stray, f"tensors outside the trained parameters receive gradients: {stray}"
    loss.backward()
    assert all(p.grad is None for p in frozen), "a frozen parameter received a gradient"
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    g2 = sum(float(g.double().pow(2).sum()) for g in grads)
    assert g2 > 0, "no gradient reached the trained parameters"
    for name, group in (reaches or {}).items():
        group_ids = {id(p) for p in group}
        assert group_ids, f"{name}: empty parameter group"
        norm = sum(float(g.double().pow(2).sum()) for p, g in zip(params, grads) if id(p) in group_ids)
        assert norm > 0, f"no gradient reaches {name}"

    f0 = float(loss.detach())
    start = [p.detach().clone() for p in params]
    eta = abs(f0) / g2
    tried = []
    with torch.no_grad():
        while C_ARMIJO * eta * g2 >= min_decrease * abs(f0):
            for p, p0, g in zip(params, start, grads):
                p.copy_(p0 - eta * g)
            f1 = float(loss_fn())
            tried.append(f1)
            if f1 <= f0 - C_ARMIJO * eta * g2:
                return f0, f1
            eta /= 2
        for p, p0 in zip(params, start):
            p.copy_(p0)
    raise AssertionError(f"no gradient step lowers the loss {f0} (tried {len(tried)} steps: {tried})")


# --------------------------------------------------------------------------- resume checks
VOLATILE_RECORD_KEYS = {"time_s", "images_per_s"}


def comparable_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    strip = lambda records: [{k: v for k, v in r.items() if k not in VOLATILE_RECORD_KEYS} for r in records]
    return {"epochs": strip(metrics["epochs"]), "init_epochs": strip(metrics["init_epochs"]),
            "final_top1": metrics["final_top1"], "best_top1": metrics["best_top1"], "status": metrics["status"]}


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def start_command(script: str, *overrides: str) -> subprocess.Popen:
    """Start ``python <script> <overrides>`` in a process of its own (to be killed), stdout discarded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / script), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, last: Path, condition, timeout: float = 300) -> dict:
    """SIGKILL ``process`` as soon as its ``last.pt`` satisfies ``condition``; returns that checkpoint's run state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.stderr.read()[-2000:]}")
        if last.exists():
            try:
                state = torch.load(last, weights_only=True)["run"]
            except Exception:  # noqa: BLE001 - replaced between exists() and load(); try again
                state = None
            if state is not None and condition(state):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return state
        time.sleep(0.02)
    process.kill()
    pytest.fail("timed out waiting for a checkpoint")


# --------------------------------------------------------------------------- the public builders, small
def objective_of(distill: dict, combine: dict | None = None):
    """The objective of a ``distill`` node given as a dict (keys the schema defaults may be left out)."""
    from distiller.config.validation import method_config
    from distiller.objective import Objective

    nodes = {label: method_config(node, f"combine.{label}") for label, node in (combine or {}).items()}
    return Objective.from_config(method_config(distill), nodes)


def compose_config(name: str, overrides: Iterable[str] = ()):
    """Hydra's compose of ``configs/<name>.yaml`` with ``overrides`` (the job's config, as a run gets it)."""
    from distiller.config.compose import compose

    return compose(name, overrides)


def tiny_trainer(tmp: Path, distill, epochs: int = 1, *overrides: str, data=None, num_classes: int = 10,
                 student: str = "resnet8", teacher: str | None = "resnet8", runtime=None, optimizer: str | None = None):
    """A run of the job's own assembly (:func:`distiller.jobs.train.assemble`) on ``data`` (default: 48 random
    images of ``num_classes`` classes), the objective of ``distill`` (a distill node as a dict, or an objective),
    fp32 on the CPU: what a test needs to run steps or a whole fit without the command line. ``overrides``
    set the rest (``optim.lr=0.05``, ``optim=dot``, ...); ``optimizer`` names one registered by the test alone."""
    import dataclasses

    from distiller.engine.runtime import Runtime, seed_everything
    from distiller.jobs.train import assemble, compose_job
    from models import build_model

    cfg = compose_config("train_student", [*tiny_overrides(tmp), f"trainer.epochs={epochs}", "optim.lr=0.01",
                                           "dataset.batch_size=16", "dataset.eval_batch_size=16", "logger=tensorboard",
                                           *overrides])
    job, record, _ = compose_job(cfg, "train_student")
    if optimizer is not None:
        job.optim = dataclasses.replace(job.optim, name=optimizer)
    seed_everything(seed(0))
    objective = objective_of(distill) if isinstance(distill, dict) else distill
    data = data if data is not None else random_splits(48, num_classes, 7, test_n=16)
    runtime = runtime or Runtime(torch.device("cpu"), "fp32", False, compile=False)
    header = {"kind": "student", "arch": student, "student": student, "teacher": teacher, "method": "test",
              "seed": seed(0), "dataset": "random"}
    return assemble(job, tmp, record, runtime, data, build_model(student, num_classes=data.num_classes),
                    build_model(teacher, num_classes=data.num_classes) if teacher else None, objective, header)


_COMPOSED_DISTILL: dict[str, object] = {}


def distill_node(name: str, **overrides: object) -> dict:
    """The composed ``distill=<name>`` node (the schema's objective defaults, then its YAML), with ``overrides``
    set before its interpolations resolve (``logit_standardize=True`` moves the keys that follow it)."""
    import copy

    from omegaconf import OmegaConf, open_dict

    if name not in _COMPOSED_DISTILL:
        _COMPOSED_DISTILL[name] = compose_config("train_student", [f"distill={name}"])
    cfg = copy.deepcopy(_COMPOSED_DISTILL[name])
    with open_dict(cfg):
        for key, value in overrides.items():
            cfg.distill[key] = value
    return OmegaConf.to_container(cfg.distill, resolve=True)


# --------------------------------------------------------------------------- teachers and image folders
def random_teacher_file(folder: Path, num_classes: int, seed_base: int = 0, name: str = "resnet8.pt",
                        arch: str = "resnet8"):
    """A random network (eval mode, non-trivial BatchNorm statistics) saved as a teacher file in ``folder``;
    returns (network, path). Its logits then depend on every layer, as a trained teacher's do."""
    from models import build_model

    torch.manual_seed(seed(seed_base))
    model = build_model(arch, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({"model": model.state_dict(), "arch": arch, "num_classes": num_classes}, path)
    return model.eval(), path


def write_image_folder(root: Path, data) -> None:
    """``root/train/<class>/*.png`` and ``root/val/...`` holding the splits ``data``'s images (PNG is lossless),
    for ``dataset=imagefolder dataset.root=<root>``."""
    from PIL import Image

    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("val", data.test_images, data.test_labels)):
        for k, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{k:03d}.png")


def randomize_batchnorm(model: torch.nn.Module) -> None:
    """Every BatchNorm2d of ``model`` gets non-trivial running statistics and shift (the global generator), so
    what an eval-mode forward computes depends on them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def assert_ranks_match_one_process(ranks: list[dict], single: dict) -> None:
    """Two DDP ranks' saved ``model`` and ``evaluation`` against one process's with the same global batch: the
    replicas are identical, the weights equal the single process's up to rounding (gradients averaged over
    ranks instead of summed in one batch), and the evaluation, sharded and reduced, gives its numbers."""
    for key, value in single["model"].items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(ranks[0]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"]
    for name, value in single["evaluation"].items():
        assert ranks[0]["evaluation"][name] == pytest.approx(value, abs=1e-3)
