"""Checkpoint files: safe reads, loading the widely shared teacher files, and what a run saves and restores.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint from the
internet cannot run code while it is unpickled. Our own checkpoints hold only
tensors, numbers, strings and plain containers, so they load the same way; writes go
through :func:`common.files.atomic_write`.

A run keeps ``last.pt`` to continue exactly (student, method helpers such as CRD banks,
optimizer, :class:`RunState`, mid-epoch meter sums, RNG states) and ``best.pt`` / ``final.pt``
to use the network (what using it needs, in the older frameworks' layout): :class:`Checkpointer`.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from common.errors import UserError
from common.files import atomic_write
from common.torch_files import not_a_torch_file
from distiller.engine.runtime import barrier, rng_state, set_rng_state

UNSAFE_ENV = "KD_TRUST_CHECKPOINTS"  # set to 1 to allow full unpickling of files you trust


RUN_CHECKPOINTS = ("final.pt", "best.pt", "last.pt")  # what a run directory holds, the usual choice first


def check_file(path: str | Path, what: str = "checkpoint") -> None:
    """One line when ``path`` is not a file: missing, or a directory (then its checkpoints are suggested)."""
    path = Path(path)
    if path.is_file():
        return
    if not path.is_dir():
        raise UserError(f"{what} not found: {path}")
    found = [path / name for name in RUN_CHECKPOINTS if (path / name).is_file()]
    found = found or sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())
    hint = (f"name a checkpoint in it: {', '.join(str(p) for p in found[:3])}"
            + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")) if found else "it holds no .pt/.pth file"
    raise UserError(f"{what} {path} is a directory, not a file; {hint}")


def safe_load(path: str | Path, what: str = "checkpoint", trust: bool | None = None) -> Any:
    """Load a torch file with ``weights_only=True``; turn every failure into a one-line :class:`UserError`.

    ``trust`` (or the environment variable ``KD_TRUST_CHECKPOINTS=1``) allows full
    unpickling, for files whose origin you trust and that need it.
    """
    path = Path(path)
    if trust is None:
        trust = os.environ.get(UNSAFE_ENV, "") == "1"
    check_file(path, what)
    unlike = not_a_torch_file(path)
    if unlike:
        raise UserError(f"{what} {path} is not a torch checkpoint ({unlike}); give the .pt/.pth file that "
                        f"torch.save wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UserError(
                f"{what} {path} holds objects other than tensors and plain containers, so it was not loaded "
                f"(loading it could run code). If you trust the file, set {UNSAFE_ENV}=1"
            ) from None
        raise UserError(f"{what} {path} is corrupted or not a torch checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path} is corrupted or truncated ({first}); "
                        f"re-download or re-create it") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways (KeyError, IndexError, ...)
        raise UserError(f"{what} {path} is corrupted or not a torch checkpoint ({type(err).__name__}: "
                        f"{str(err).strip()[:80]}); re-download or re-create it") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: ``{'model': sd, ...}``, ``{'state_dict': sd}`` or a bare sd.

    A ``module.`` prefix (saved from DataParallel / DDP) is removed.
    """
    state = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("the checkpoint holds no model weights (expected {'model': state_dict} or a state_dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_weights(model: nn.Module, path: str | Path, arch: str, what: str = "checkpoint") -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (strict), naming both architectures on mismatch.

    Returns the checkpoint's other entries (e.g. ``accuracy``, ``epoch``, ``arch``).
    """
    obj = safe_load(path, what)
    state = extract_state_dict(obj)
    saved_arch = obj.get("arch") if isinstance(obj, Mapping) else None
    expected = model.state_dict()
    mismatch = (set(state) != set(expected)) or any(state[k].shape != expected[k].shape for k in expected)
    if mismatch:
        classes = class_counts(state, expected)
        if classes is not None:  # the same network for another data set
            raise UserError(f"{what} {path} holds a {classes[0]}-class {saved_arch or arch}, but the {arch} built here "
                            f"has {classes[1]} classes (the data set's): use a checkpoint trained on this data set, "
                            f"or choose the checkpoint's data set with dataset=NAME")
        stem = stem_mismatch(state, expected)
        if stem is not None:
            raise UserError(f"{what} {path} holds a {saved_arch or arch} {stem}")
        if saved_arch is not None and str(saved_arch) == arch:  # one name, another build (cifar_stem, width, ...)
            raise UserError(f"{what} {path} holds a {arch} built with other settings than this one (its parameter "
                            f"shapes differ, e.g. cifar_stem or a constructor argument): build it as it was "
                            f"trained (the keys of its run's config.yaml), or pick another checkpoint")
        described = f"a {saved_arch} model" if saved_arch else "another architecture"
        guess = guess_architecture(state)
        if not saved_arch and guess:
            described = f"a {guess} model"
        raise UserError(f"{what} {path} holds {described}, not {arch}: its weights do not fit {arch}. "
                        f"Pick the matching architecture or another checkpoint")
    model.load_state_dict(state, strict=True)
    return {k: v for k, v in obj.items() if k not in ("model", "state_dict")} if isinstance(obj, Mapping) else {}


def stem_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``expected`` when only the first convolution's kernel differs (a CIFAR stem on one
    side: ``cifar_stem``), as the end of a sentence naming the file's network; else None."""
    if set(state) != set(expected):
        return None
    differ = [k for k in expected if state[k].shape != expected[k].shape]
    if len(differ) != 1 or state[differ[0]].dim() != 4 or state[differ[0]].shape[:2] != expected[differ[0]].shape[:2]:
        return None
    saved, built = (tuple(t.shape[-2:]) for t in (state[differ[0]], expected[differ[0]]))
    cifar = saved == (3, 3)
    return (f"whose first convolution ({differ[0]}) is {saved[0]}x{saved[1]} where this build's is "
            f"{built[0]}x{built[1]}: it was trained {'with' if cifar else 'without'} a CIFAR stem; set "
            f"cifar_stem={'true' if cifar else 'false'} on its node (teacher.cifar_stem, model.cifar_stem, ...)")


def class_counts(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(the file's, the model's) class count when ``state`` differs from ``expected`` only by it, else None.

    That is: the same parameter names, and every mis-shaped parameter differs in one dimension, from
    one and the same size in the file to one and the same size in the model (the classifier's rows).
    """
    if set(state) != set(expected):
        return None
    pairs = set()
    for key, value in expected.items():
        got = state[key].shape
        if got == value.shape:
            continue
        if len(got) != len(value.shape):
            return None
        dims = [(a, b) for a, b in zip(got, value.shape) if a != b]
        if len(dims) != 1:
            return None
        pairs.add(dims[0])
    return next(iter(pairs)) if len(pairs) == 1 else None


def guess_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the zoo architecture whose parameter names and shapes equal ``state``'s, if any."""
    from models import build_model, list_models

    signature = {k: tuple(v.shape) for k, v in state.items()}
    # the class count: rows of the last linear weight, or of the last 1x1 convolution (a classifier stored as
    # one, e.g. mobilenetv2_tinyimagenet's conv2); 100 when neither says
    linear = [v.shape[0] for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    pointwise = [v.shape[0] for k, v in state.items() if k.endswith("weight") and v.ndim == 4 and v.shape[2:] == (1, 1)]
    counts = list(dict.fromkeys([*linear[-1:], *pointwise[-1:], 100]))
    for name in list_models():
        for num_classes in counts:
            try:
                shapes = {k: tuple(v.shape) for k, v in build_model(name, num_classes=num_classes).state_dict().items()}
            except Exception:  # noqa: BLE001 - a candidate that cannot be built is simply not a match
                break
            if shapes == signature:
                return name
            if shapes.keys() != signature.keys():
                break  # another architecture: no class count makes it one
    return None


CHECKPOINT_FORMAT = 1


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (plain types only)."""

    phase: int = 0  # index into the phase plan (init phases first, main last)
    epoch: int = 0  # completed epochs of the current phase
    step: int = 0  # completed steps of the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one record per main-phase epoch
    init_history: list = field(default_factory=list)  # one record per initialisation epoch
    calibrated: bool = False  # the methods' calibration pass over the training set is done (its results saved)
    finished: bool = False


def slim_checkpoint(model: dict[str, torch.Tensor], arch: str, num_classes: int, epochs: int, top1: float | None,
                    config: dict[str, Any]) -> dict[str, Any]:
    """The layout of ``final.pt``/``best.pt`` (and stored teachers): the weights under ``model`` plus a header."""
    return {"model": model, "arch": arch, "num_classes": num_classes, "epoch": epochs, "accuracy": top1,
            "config": config}


def slim_from_last(last: dict[str, Any]) -> dict[str, Any]:
    """A finished run's ``final.pt``, rebuilt from its ``last.pt`` (for a run killed before it wrote one)."""
    history = last["run"]["history"]
    return slim_checkpoint(last["model"], last["arch"], last["num_classes"], len(history),
                           history[-1]["test_top1"] if history else None, last.get("config") or {})


class Checkpointer:
    """Writes (rank 0 only, atomically) and reads the checkpoints of one run directory.

    ``teacher_sha256``: the sha256 of the teacher file a student distils from, recorded in every
    checkpoint, so that a resumed run can tell that its teacher file is still the same
    (:func:`distiller.jobs.teachers.resumed_teacher_change`).
    """

    def __init__(self, run_dir: Path, is_main: bool, student: nn.Module, objective: nn.Module,
                 student_arch: str, teacher_arch: str | None, num_classes: int, config: dict[str, Any],
                 teacher_sha256: str | None = None) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.student, self.objective = student, objective
        self.student_arch, self.teacher_arch, self.teacher_sha256 = student_arch, teacher_arch, teacher_sha256
        self.num_classes, self.config = num_classes, config

    def save_last(self, state: RunState, optimizer: torch.optim.Optimizer,
                  meter_state: dict[str, torch.Tensor]) -> None:
        """Everything needed to continue; all ranks wait until it is on disk."""
        if self.is_main:
            atomic_write({
                "format": CHECKPOINT_FORMAT, "arch": self.student_arch, "num_classes": self.num_classes,
                "teacher_arch": self.teacher_arch, "teacher_sha256": self.teacher_sha256,
                "model": self.student.state_dict(),
                "objective": self.objective.state_dict(), "optimizer": optimizer.state_dict(),
                "run": asdict(state), "accumulators": meter_state, "rng": rng_state(), "config": self.config,
            }, self.run_dir / "last.pt")
        barrier()

    def slim(self, epochs: int, top1: float | None) -> dict[str, Any]:
        """What a user of the trained network needs (loads like the older frameworks' files), and which
        teacher file a student learnt from."""
        slim = slim_checkpoint(self.student.state_dict(), self.student_arch, self.num_classes, epochs, top1,
                               self.config)
        return slim if self.teacher_sha256 is None else {**slim, "teacher_sha256": self.teacher_sha256}

    def save_best(self, epochs: int, top1: float) -> None:
        if self.is_main:
            atomic_write(self.slim(epochs, top1), self.run_dir / "best.pt")

    def restore(self, checkpoint: dict, device: torch.device) -> tuple[RunState, dict | None, dict[str, torch.Tensor]]:
        """Load a ``last.pt``: weights, helpers, RNG. Returns (run state, optimizer state, meter sums)."""
        if checkpoint.get("format") != CHECKPOINT_FORMAT or "run" not in checkpoint:
            raise UserError("last.pt was not written by this version of the trainer; "
                            "start afresh with trainer.resume=false trainer.force=true")
        self.student.load_state_dict(checkpoint["model"])
        self.objective.load_state_dict(checkpoint["objective"])
        set_rng_state(checkpoint["rng"])
        meter = {k: v.to(device) for k, v in checkpoint.get("accumulators", {}).items()}
        return RunState(**checkpoint["run"]), checkpoint.get("optimizer"), meter
