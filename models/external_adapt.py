"""Fitting a library network to small images and to its own weights file.

``cifar_stem``: the first convolution becomes 3x3 stride 1 and the max-pool before the first stage is
dropped (32 px inputs keep their resolution); ``weights``: the library's own weights file loads where its
tensors fit, the classifier and a replaced stem keeping their fresh initialisation.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from common.errors import UserError
from common.torch_files import not_a_torch_file
from models.external_families import last_linear
from models.features import (
    INPUT_SUFFIX,
    probe_features,
)

log = logging.getLogger("models")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _forward_order(model: nn.Module, input_size: Sequence[int]) -> list[str]:
    """Paths of the leaf modules in the order one forward first runs them."""
    order: list[str] = []
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n) if n not in order else None)
               for n, m in leaves]
    try:
        probe_features(model, {}, "cifar_stem", type(model).__name__, input_size)
    finally:
        for handle in handles:
            handle.remove()
    return order


def cifar_stem_conv(model: nn.Module, input_size: Sequence[int], label: str) -> str:
    """Make the first convolution 3x3 stride 1 with the same channels: the CIFAR variant of an ImageNet stem.

    The new convolution is He-initialised (fan-out). Returns its path.
    """
    if any(name.rsplit(".", 1)[-1] == "pos_embed" for name, _ in model.named_parameters()):
        raise UserError(f"cifar_stem does not apply to {label}: its first convolution embeds patches, and its position "
                        "embedding is made for their count; drop cifar_stem and set the patch and image size instead "
                        "(a timm ViT: +student.img_size=32 +student.patch_size=4)")
    order = _forward_order(model, input_size)
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    if not convs:
        raise UserError(f"cifar_stem: {label} has no Conv2d to turn into a CIFAR stem")
    old = model.get_submodule(convs[0])
    conv = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1,
                     bias=old.bias is not None).to(old.weight.device)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    _set_module(model, convs[0], conv)
    return convs[0]


def drop_stem_pool(model: nn.Module, input_size: Sequence[int], first_stage: str | None) -> bool:
    """Replace the max-pools that run before the first stage (``first_stage``, a feature path) by identities.

    Without declared stages, a max-pool that runs before the second convolution counts as the stem's.
    Returns whether one was dropped.
    """
    order = _forward_order(model, input_size)
    if first_stage is not None:
        path = first_stage.removesuffix(INPUT_SUFFIX)
        end = next((i for i, n in enumerate(order) if n == path or n.startswith(f"{path}.") or not path), len(order))
    else:
        convs = [i for i, n in enumerate(order) if isinstance(model.get_submodule(n), nn.Conv2d)]
        end = convs[1] if len(convs) > 1 else len(order)
    pools = [n for n in order[:end] if isinstance(model.get_submodule(n), nn.MaxPool2d)]
    for pool in pools:
        _set_module(model, pool, nn.Identity())
    return bool(pools)


def _read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file (a weights file you have locally; nothing is downloaded)")
    unlike = not_a_torch_file(path)
    if unlike:
        raise UserError(f"{key}={path} is not a torch file ({unlike})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{key}={path} holds objects other than tensors, so it was not loaded "
                        "(loading it could run code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as err:
        raise UserError(f"{key}={path} is corrupted or not a torch file ({type(err).__name__})") from None
    if isinstance(obj, Mapping):
        for inner in ("model", "state_dict"):
            if isinstance(obj.get(inner), Mapping):
                obj = obj[inner]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{key}={path} holds no state_dict (a mapping of parameter names to tensors)")
    if obj and all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_library_weights(model: nn.Module, path: Path, key: str, replaced: set[str] = frozenset()) -> None:
    """Load a library's weights file (e.g. torchvision's ``resnet18-f37072fd.pth``) into ``model``.

    Every tensor must match by name; shapes may differ only in the classifier (another number of
    classes) and in modules in ``replaced`` (the CIFAR stem): those keep their fresh weights.
    """
    state = _read_state_dict(path, key)
    own = model.state_dict()
    classifier = last_linear(model)
    adaptable = {p for p in (classifier, *replaced) if p}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{key}={path} does not fit this network ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors; {first}); is it the weights of the same architecture?")
    kept = []
    for name in [k for k in state if state[k].shape != own[k].shape]:
        if name.rpartition(".")[0] not in adaptable:
            raise UserError(f"{key}={path}: {name} has shape {list(state[name].shape)} but the network's is "
                            f"{list(own[name].shape)}; is it the weights of the same architecture?")
        kept.append(name)
        del state[name]
    model.load_state_dict(state, strict=False)
    if kept:
        log.info("%s: kept the fresh %s (shapes differ: other classes or the CIFAR stem)", key, ", ".join(kept))
