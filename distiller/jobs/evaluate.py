"""Evaluate any checkpoint on a data set's test split: top-1, top-5, loss and accuracy per class.

Reads our files (``final.pt``, ``best.pt``, ``last.pt``, stored teachers: ``{'model', 'arch',
'num_classes', ...}``), the older frameworks' ``ckpt_epoch_240.pth`` (``{'model': state_dict,
...}``) and plain state dicts (torchvision style, with or without a ``module.`` prefix). The
architecture comes from ``model=``, else from our header, else from the parameter names and
shapes; the class count from the header, else from the classifier's shape. A network from outside
the zoo (``model=torchvision model.name=resnet18 model.cifar_stem=true``, or the node our header's
run config recorded for it) is rebuilt from its config node. A file that does not fit the
architecture is a one-line error naming the keys that differ. Used by ``scripts/evaluate.py`` and
``scripts/teachers.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from common.errors import UserError
from datasets import DATASETS, load_dataset
from distiller.config.overrides import hydra_quoted, override_key, refuse_unread
from distiller.config.schema import current_names
from distiller.engine.checkpoints import (
    check_file,
    extract_state_dict,
    guess_architecture,
    safe_load,
    stem_mismatch,
)
from distiller.engine.evaluation import measure_per_class
from distiller.engine.runtime import Runtime, resolve_device, resolve_eval_precision
from models import MODELS, build_model
from models.external import build_network, label_choice, network_label

SHOWN_KEYS = 3  # keys named per kind of mismatch in an error line
# data-defining keys of a checkpoint's own dataset node that carry over (the rest: this machine's choice);
# the root too where it *is* the data (an image folder: registered with teachers_per_root), or where it is on
# this machine (ImageNet's folder, which has no default)
DATA_KEYS = ("train_size", "test_size", "seed", "num_classes", "image_size", "eval_resize", "mean", "std")
# keys of an external network's node that do not describe the network to evaluate: the weights come from
# the checkpoint (a recorded ``weights=`` file need not exist on this machine), the rest are training's
NOT_ARCHITECTURE = ("weights", "ckpt", "lr", "published_top1", "verify")
NetworkChoice = str | dict[str, Any] | None  # a zoo name, an external network's config node, or none given


@dataclass
class CheckpointFile:
    """A checkpoint file read from disk, before any network is built for it."""

    path: Path
    layout: str
    state: dict[str, torch.Tensor]
    header: dict[str, Any]  # the file's entries other than the weights: arch, accuracy, epoch, config, ...


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into its network, with what the file said about itself."""

    path: Path
    layout: str  # ours | model-dict (the older frameworks' {'model': sd}) | state_dict-key | state-dict
    arch: str
    arch_from: str  # header | model= | parameter shapes
    num_classes: int
    model: nn.Module
    header: dict[str, Any] = field(default_factory=dict)  # the file's other entries: accuracy, epoch, config, ...


def checkpoint_layout(obj: Any) -> str:
    """Which of the accepted layouts ``obj`` (a loaded checkpoint) has."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return "ours" if "arch" in obj else "model-dict"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return "state_dict-key"
    return "state-dict"


def classifier_classes(state: Mapping[str, torch.Tensor], arch: str,
                       build: Callable[[int], nn.Module] | None = None) -> int | None:
    """The class count ``state`` was trained for, read from the parameters whose shape depends on it.

    Which parameters those are is found by building the network (``build(num_classes)``, by
    default the zoo's ``arch``) for 100 and 101 classes and comparing, so no classifier name is assumed.
    """
    build = build or (lambda n: build_model(arch, num_classes=n))
    a = {k: tuple(v.shape) for k, v in build(100).state_dict().items()}
    b = {k: tuple(v.shape) for k, v in build(101).state_dict().items()}
    for key, shape in a.items():
        if key in state and b.get(key) != shape and state[key].ndim == len(shape):
            dim = next(i for i, (x, y) in enumerate(zip(shape, b[key])) if x != y)
            return int(state[key].shape[dim])
    return None


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def describe_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state`` differs from ``expected`` (missing keys, unexpected keys, shapes), or None if it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    parts = [f"{label}: {_shown(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shapes (file vs model)", shapes)) if keys]
    return "; ".join(parts) or None


def read_checkpoint(path: str | Path) -> CheckpointFile:
    """Read the weights and header of the checkpoint at ``path`` (one-line errors for unreadable files)."""
    path = Path(path)
    obj = safe_load(path, "checkpoint")
    header = {k: v for k, v in obj.items() if k not in ("model", "state_dict")} if isinstance(obj, Mapping) else {}
    return CheckpointFile(path, checkpoint_layout(obj), extract_state_dict(obj), header)


def recorded_network(header: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config node of the external network our header names, as its run's config recorded it (else None)."""
    config = header.get("config")
    if not isinstance(config, Mapping):
        return None
    for key in ("model", "student"):  # a teacher run trains ``model``; a distillation run saves its ``student``
        node = config.get(key)
        if isinstance(node, Mapping) and node.get("source") is not None and network_label(node) == header.get("arch"):
            return current_names(node)  # a file of an earlier release too
    return None


def _indexed_arch(path: Path) -> str | None:
    """The architecture the teacher index of ``path``'s folder records for it (None: not indexed)."""
    from distiller.jobs.teachers import read_index

    try:
        entry = read_index(path.parent).get(path.name) or {}
    except (OSError, ValueError, UserError):
        return None
    return str(entry["arch"]) if entry.get("arch") else None


def load_checkpoint(path: str | Path | CheckpointFile, model: NetworkChoice = None,
                    image_size: Sequence[int] = (32, 32)) -> LoadedCheckpoint:
    """Build the network of a checkpoint and load its weights (strict).

    ``model`` (from ``model=``: a zoo name or an external network's config node) overrides the
    file's header; without either, the architecture is recognised from the parameter names and
    shapes. ``image_size`` is the data's (H, W), at which an external network's features are probed.
    """
    file = path if isinstance(path, CheckpointFile) else read_checkpoint(path)
    path, state, header = file.path, file.state, file.header
    node = model if isinstance(model, Mapping) else None
    if model is not None:
        arch_from = "model="
    elif header.get("arch"):
        arch_from = "header"
        if str(header["arch"]) not in MODELS:  # a network from outside the zoo, as its run recorded it
            node = recorded_network(header)
    else:
        arch_from = "parameter shapes"
    if node is not None:
        node = {k: v for k, v in node.items() if k not in NOT_ARCHITECTURE}
        arch = network_label(node)

        def build(n: int) -> nn.Module:
            return build_network(node, n, image_size, role="model")
    else:
        indexed = None if model is not None or header.get("arch") else _indexed_arch(path)
        zoo_indexed = indexed if indexed in MODELS else None  # an outside network needs more than its name
        if zoo_indexed is not None:
            arch_from = "teacher index"
        arch = model if isinstance(model, str) else header.get("arch") or zoo_indexed or guess_architecture(state)
        if arch is None:
            named = (f"; its folder's teacher index names it {indexed}: pass {label_choice(indexed, 'model')} with the "
                     "keys it was built with (cifar_stem, +model.<argument>=...)" if indexed else "")
            raise UserError(f"cannot tell the architecture of {path} (no 'arch' entry, and its parameters match "
                            f"no model of the zoo); pass model=ARCH, or model=torchvision|timm|module with its "
                            f"name for a network from outside the zoo{named}")
        arch = MODELS.canonical(str(arch))

        def build(n: int) -> nn.Module:
            return build_model(arch, num_classes=n)
    num_classes = int(header.get("num_classes") or classifier_classes(state, arch, build) or 100)
    network = build(num_classes)
    expected = network.state_dict()
    mismatch = describe_mismatch(state, expected)
    stem = stem_mismatch(state, expected)
    if stem is not None:
        raise UserError(f"checkpoint {path} holds a {arch} {stem}")
    if mismatch:
        guess = guess_architecture(state)
        hint = f"; its weights are those of a {guess}: pass model={guess}" if guess and guess != arch else \
            "; pass model= with the checkpoint's architecture"
        raise UserError(f"checkpoint {path} does not fit {arch} ({arch_from}): {mismatch}{hint}")
    network.load_state_dict(state, strict=True)
    return LoadedCheckpoint(path, file.layout, arch, arch_from, num_classes, network, header)


# ---- the evaluation command (scripts/evaluate.py, scripts/teachers.py add --measure) ---------------
def _override(overrides: list[str], key: str) -> str | None:
    """The value the command line gives ``key`` (None when it is not overridden)."""
    values = [o.split("=", 1)[1] for o in overrides if override_key(o) == key]
    return values[-1] if values else None


def data_overrides(header: dict[str, Any], overrides: list[str]) -> tuple[list[str], str]:
    """Overrides choosing the checkpoint's own data set (unless the command line chooses one), and their origin."""
    stored = (header.get("config") or {}).get("dataset") if isinstance(header.get("config"), dict) else None
    if _override(overrides, "dataset") is not None or not isinstance(stored, dict) or "name" not in stored:
        return [], "command line" if _override(overrides, "dataset") is not None else "default"
    extra = [f"dataset={stored['name']}"]
    extra += [f"dataset.{k}={_hydra_value(stored[k])}" for k in DATA_KEYS
              if stored.get(k) is not None and _override(overrides, f"dataset.{k}") is None]
    name = str(stored["name"])
    if stored.get("root") and _override(overrides, "dataset.root") is None:
        root = Path(str(stored["root"])).expanduser()
        if root.is_dir():
            extra.append(f"dataset.root={_hydra_value(str(root))}")
        elif name in DATASETS and DATASETS.metadata(name).get("teachers_per_root"):
            raise UserError(f"the checkpoint was trained on the {name} data set at {root}, which does not exist "
                            f"here: pass dataset.root=DIR (the folder holding train/ and val/)")
    return extra, "the checkpoint's config"


def _hydra_value(value: Any) -> str:
    """``value`` written for a command-line override: lists as ``[a,b]``, strings quoted (any path survives)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return hydra_quoted(value) if isinstance(value, str) else str(value)


def compose_config(overrides: list[str]) -> Any:
    """The ``train_teacher`` config with these overrides, validated (the data set and trainer nodes are used)."""
    from distiller.config.command_line import explain_config_error
    from distiller.config.compose import compose
    from distiller.config.validation import validate

    try:
        cfg = compose("train_teacher", overrides)
        validate(cfg, "train_teacher")
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        raise UserError(explain_config_error(err)) from None
    return cfg


def is_model_override(override: str) -> bool:
    """Whether a command-line override chooses or configures the network (``model=``, ``model.name=``)."""
    key = override_key(override)
    return key == "model" or key.startswith("model.")


def model_choice(overrides: Sequence[str], cfg: Any = None) -> NetworkChoice:
    """The network the command line names: a zoo name, an external network's config node, or None.

    ``model=resnet56`` is a zoo name; ``model=torchvision model.name=resnet18 model.cifar_stem=true``
    (or ``timm``, or ``module`` with ``model._target_=``) is composed like training's ``model`` node,
    or read from ``cfg`` when the caller has already composed the overrides.
    """
    chosen = [o for o in overrides if is_model_override(o)]
    if not chosen:
        return None
    name = _override(chosen, "model")
    if name is not None and name in MODELS and len(chosen) == 1:
        return name
    from omegaconf import OmegaConf

    node = OmegaConf.to_container((cfg if cfg is not None else compose_config(chosen)).model, resolve=True)
    return node if node.get("source") is not None else str(node["name"])


class CheckpointOnData(NamedTuple):
    """A checkpoint loaded into its network beside the data set it is to be measured on."""

    overrides: list[str]  # as given, architecture names as registered
    cfg: Any  # the composed train_teacher config: data set, device, model= as in training
    data: Any  # the data set's splits
    data_from: str  # where the data set's settings came from (the checkpoint's record or the command line)
    loaded: LoadedCheckpoint


EVALUATE_READS = ("model", "dataset", "trainer.device", "trainer.precision", "trainer.eval_precision")


def load_on_data(path: str | Path, overrides: Sequence[str] = (), what: str = "checkpoint",
                 reads: Sequence[str] = EVALUATE_READS, command: str = "scripts/evaluate.py",
                 options: Mapping[str, str] | None = None) -> CheckpointOnData:
    """Read ``path`` (``what`` names it in errors), compose its data set (the one it recorded unless ``dataset=``
    says otherwise) and load it into its network; a class count the data set does not have is one line, and
    so is an override ``command`` does not read (``reads``, ``options``:
    :func:`distiller.config.overrides.refuse_unread`)."""
    from distiller.config.preflight import canonical_model_choices

    path = Path(path)
    overrides = canonical_model_choices(list(overrides))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"'{bad[0]}' is not an override; write KEY=VALUE (e.g. model=resnet56, dataset=synthetic)")
    refuse_unread(overrides, reads, command, options)
    check_file(path, what)
    file = read_checkpoint(path)
    extra, data_from = data_overrides(file.header, overrides)
    cfg = compose_config([*extra, *overrides])  # model= as in training, beside the data set and the device
    data = load_dataset(cfg.dataset)
    loaded = load_checkpoint(file, model_choice(overrides, cfg), image_size=data.image_size)
    if data.num_classes != loaded.num_classes:
        raise UserError(f"{path} holds a {loaded.num_classes}-class {loaded.arch}, but the {cfg.dataset.name} data "
                        f"set has {data.num_classes} classes; choose its data set with dataset=NAME "
                        f"(and dataset.num_classes=)")
    return CheckpointOnData(overrides, cfg, data, data_from, loaded)


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Everything the command reports, as one JSON-ready dict."""
    from common.files import file_sha256
    from distiller.jobs.teacher_accuracy import published_check
    from distiller.jobs.teachers import read_index

    path = Path(path)
    overrides, cfg, data, data_from, loaded = load_on_data(path, overrides)
    device = resolve_device(str(cfg.trainer.device))
    precision = _override(overrides, "trainer.precision")
    precision = "fp32" if precision in (None, "auto") else precision
    # the forward passes run in trainer.eval_precision when it is given, else in trainer.precision (fp32 by default)
    precision = resolve_eval_precision(_override(overrides, "trainer.eval_precision") or "same", precision, device)
    runtime = Runtime(device, precision, channels_last=False, compile=False, eval_precision=precision)
    result = measure_per_class(loaded.model, data, runtime, int(cfg.dataset.eval_batch_size))
    entry = read_index(path.parent).get(path.name)
    index = None
    if entry is not None:
        index = {"entry": entry, "sha256_matches": file_sha256(path) == entry.get("sha256")}
    stored = loaded.header.get("accuracy")
    return {
        "checkpoint": str(path), "layout": loaded.layout, "arch": loaded.arch, "arch_from": loaded.arch_from,
        "num_classes": loaded.num_classes, "epoch": loaded.header.get("epoch"),
        "stored_top1": float(stored) if isinstance(stored, (int, float)) else None,
        "dataset": str(cfg.dataset.name), "dataset_from": data_from, "precision": precision,
        "device": str(runtime.device), **result, "class_names": list(data.class_names),
        "published": published_check(loaded.arch, str(cfg.dataset.name), result["num_images"], result["test_top1"]),
        "index": index,
    }
