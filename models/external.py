"""Networks from outside the zoo as teacher or student: torchvision and timm models by name, any ``nn.Module`` by path.

A config node with a ``source`` key (``torchvision``, ``timm`` or ``module``) describes such a
network; a node without one names a zoo architecture. :func:`build_network` builds either:
the library's model with ``num_classes`` from the data set, optionally with a CIFAR stem
(``cifar_stem``: the first convolution becomes 3x3 stride 1, the max-pool before the first
stage is dropped) and the library's own weights file (``weights``: matching tensors load, the
classifier and a replaced stem keep their fresh initialisation). Its taps come from the
node's ``taps`` (module paths, :mod:`models.taps`) over an inference for the family
(torchvision ResNet/MobileNet/EfficientNet/ConvNeXt, timm's ``feature_info``, a module's own
``feature_info``); channels and reductions are measured, so the network ends up with the
same ``feature_info`` vocabulary as a zoo model and every method runs on it unchanged.
timm is optional and imported only when a ``timm`` network is built.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import pickle
import sysconfig
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from common.errors import UserError
from common.registry import Registry
from common.torch_files import not_a_torch_file
from models.taps import (
    INPUT_SUFFIX,
    SAME,
    TapDeclaration,
    declaration_of,
    describe_features,
    probe_taps,
    undeclared_kinds,
)

log = logging.getLogger("models")

# keys of an external network's config node that are not constructor arguments: the schema's
# (distiller/config.py ExternalTeacherConfig; tests/test_external_models.py checks that it lists them all)
CONFIG_KEYS = frozenset({"source", "name", "lr", "ckpt", "published_top1", "verify", "cifar_stem", "weights", "taps",
                         "_target_", "cache", "cache_dir", "cache_dtype"})


@dataclass(frozen=True)
class NetworkSource:
    """Where a network comes from: how to build it by name and how to infer its taps."""

    create: Callable[[Mapping[str, Any], int, str], nn.Module]  # (config node, num_classes, role) -> network
    infer: Callable[[nn.Module, Sequence[int]], TapDeclaration]  # (network, probe input size) -> declaration


SOURCES: Registry[NetworkSource] = Registry("network source")
# inferred taps per network class (``module.qualname``), for the families common enough to know
FAMILIES: Registry[Callable[[nn.Module, Sequence[int]], TapDeclaration]] = Registry("network family")


def network_label(node: Mapping[str, Any]) -> str:
    """The name a network goes by in run headers and checkpoint files: ``resnet56``, ``torchvision-resnet18``."""
    source = node.get("source")
    return str(node["name"]) if source is None else f"{source}-{node['name']}"


def command_line_choice(node: Mapping[str, Any], group: str = "teacher") -> str:
    """How the command line chooses this network: ``teacher=resnet56``, ``teacher=torchvision teacher.name=NAME``."""
    source = node.get("source")
    if source is None:
        return f"{group}={node['name']}"
    key = "_target_" if source == "module" else "name"
    words = [f"{group}={source}", f"{group}.{key}={node.get(key, node['name'])}"]
    if node.get("cifar_stem"):
        words.append(f"{group}.cifar_stem=true")
    return " ".join(words)


def label_choice(label: str, group: str = "teacher") -> str:
    """:func:`command_line_choice` for a name from :func:`network_label` (``torchvision-resnet18``)."""
    source, sep, name = label.partition("-")
    if sep and source in SOURCES:
        return command_line_choice({"source": source, "name": name, "_target_": name}, group)
    return f"{group}={label}"


def build_network(node: Mapping[str, Any], num_classes: int, image_size: Sequence[int] = (32, 32),
                  role: str = "model") -> nn.Module:
    """The network a ``model``/``teacher``/``student`` config node describes, freshly initialised.

    ``role`` is the node's config key (for messages); ``image_size`` (H, W) is the data's, for the probe.
    """
    from models import build_model

    if node.get("source") is None:
        return build_model(str(node["name"]), num_classes=num_classes)
    label = network_label(node)
    source = SOURCES.get(str(node["source"]))
    input_size = (2, 3, *(int(s) for s in image_size))
    model = source.create(node, num_classes, role)
    taps = _plain(node.get("taps"))
    declare = lambda: source.infer(model, input_size).merged(taps, f"{role}.taps")
    replaced: set[str] = set()
    if node.get("cifar_stem"):
        replaced.add(cifar_stem_conv(model, input_size, label))
        decl = declare()
        if drop_stem_pool(model, input_size, decl.stages[0] if decl.stages else None):
            decl = declare()  # resolutions changed
    else:
        decl = declare()
    if node.get("weights"):
        load_library_weights(model, Path(str(node["weights"])), f"{role}.weights", replaced)
    infos, logits = describe_features(model, decl, f"{role}.taps", label, input_size)
    if tuple(logits.shape) != (input_size[0], num_classes):
        raise UserError(f"{role} {label} outputs {list(logits.shape)} for a batch of {input_size[0]}, but the data "
                        f"set has {num_classes} classes; give its constructor a num_classes argument (it is then "
                        "passed automatically) or make its classifier that wide")
    model.feature_info = infos
    model.undeclared_taps = undeclared_kinds(decl)
    return model


def _plain(node: Any) -> Any:
    """A config node (DictConfig/ListConfig) as plain Python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency; models may be used without it
        pass
    return node


def constructor_args(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node's further keys: the network constructor's keyword arguments (``+teacher.width=2``)."""
    return {str(k): _plain(v) for k, v in node.items() if k not in CONFIG_KEYS}


def _call(factory: Callable[..., nn.Module], args: dict[str, Any], what: str, role: str) -> nn.Module:
    try:
        model = factory(**args)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the constructor raises is the network's failure to build
        raise UserError(f"{role}: building {what} failed ({_first_line(err)}{_raised_at(err)}); check its "
                        f"arguments ({', '.join(f'{k}={v!r}' for k, v in args.items())})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{role}: {what} returned a {type(model).__name__}, not an nn.Module")
    return model


def _first_line(err: BaseException) -> str:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _raised_at(err: BaseException) -> str:
    """Where in the user's own code it failed: the innermost frame outside Python, its packages and this file."""
    if isinstance(err, SyntaxError) and err.filename:
        return f", at {err.filename}:{err.lineno}"
    installed = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")})
    where, tb = "", err.__traceback__
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if file != __file__ and not file.startswith(("<", *installed)):
            where = f", raised at {file}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


# ---- sources --------------------------------------------------------------------------------------
def _create_torchvision(node: Mapping[str, Any], num_classes: int, role: str) -> nn.Module:
    import torchvision.models as tv

    name = str(node["name"])
    names = tv.list_models(module=tv)  # classification models only
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{role}.name='{name}' is not a torchvision classification model.{hint} "
                        f"Valid names: {', '.join(names)}")
    args = {"weights": None, "num_classes": num_classes, **constructor_args(node)}  # weights=None: never downloads
    return _call(lambda **kw: tv.get_model(name, **kw), args, f"torchvision {name}", role)


def _create_timm(node: Mapping[str, Any], num_classes: int, role: str) -> nn.Module:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise UserError(f"{role}=timm needs the package timm, which is not installed; install it with "
                        "`pip install timm` (an optional dependency)") from None
    name = str(node["name"])
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{role}.name='{name}' is not a timm model.{hint} See timm.list_models()")
    args = {"pretrained": False, "num_classes": num_classes, **constructor_args(node)}  # never downloads
    return _call(lambda **kw: timm.create_model(name, **kw), args, f"timm {name}", role)


def locate(path: str, role: str) -> Callable[..., Any]:
    """The object at import path ``pkg.mod.Class`` (the longest importable module, then attributes)."""
    parts = path.split(".")
    if not path or not all(p.isidentifier() for p in parts) or len(parts) < 2:
        raise UserError(f"{role}._target_='{path}' is not an import path; use pkg.module.Class")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise UserError(f"{role}._target_='{path}': importing {module_name} failed ({err})") from None
            continue
        except Exception as err:  # noqa: BLE001 - the module's own code failed while it was imported
            raise UserError(f"{role}._target_='{path}': importing {module_name} failed ({_first_line(err)}"
                            f"{_raised_at(err)})") from None
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise UserError(f"{role}._target_='{path}': {'.'.join(parts[:cut])} has no attribute '{attr}'")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise UserError(f"{role}._target_='{path}' is a {type(obj).__name__}, not a class or function")
        return obj
    raise UserError(f"{role}._target_='{path}': no module {parts[0]} can be imported; put its folder on "
                    "PYTHONPATH (or run from it)")


def _create_module(node: Mapping[str, Any], num_classes: int, role: str) -> nn.Module:
    target = node.get("_target_")
    if not target:
        raise UserError(f"{role}=module needs {role}._target_=pkg.module.Class (the network's import path)")
    factory = locate(str(target), role)
    args = constructor_args(node)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes and "num_classes" not in args:
        args["num_classes"] = num_classes
    return _call(factory, args, str(target), role)


# ---- inferred taps --------------------------------------------------------------------------------
def _last_linear(model: nn.Module) -> str | None:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


GLOBAL_POOLS = ("AdaptiveAvgPool2d", "SelectAdaptivePool2d")  # torch's and timm's global pools


def _global_pool_input(model: nn.Module) -> str | None:
    """``<path>@in`` of the network's last global average pool (the map the embedding averages), if it has one."""
    names = [name for name, m in model.named_modules() if type(m).__name__ in GLOBAL_POOLS and name]
    return f"{names[-1]}{INPUT_SUFFIX}" if names else None


def generic_declaration(model: nn.Module, input_size: Sequence[int]) -> TapDeclaration:
    """What any network has: its own zoo-style ``feature_info``, or else the embedding (the last Linear's input)
    and the input of its last global pool."""
    own = getattr(model, "feature_info", None)
    if own and all(hasattr(i, "is_stage") for i in own):
        return declaration_of(own)
    family = f"{type(model).__module__}.{type(model).__qualname__}"
    if family in FAMILIES:
        return with_pool_input(FAMILIES.get(family)(model, input_size), model)
    why = f"taps of {type(model).__name__} are not inferred"
    linear = _last_linear(model)
    return with_pool_input(TapDeclaration(
        embedding=f"{linear}{INPUT_SUFFIX}" if linear else None,
        gaps={"stem": why, "stages": why, "preact": why, "embedding": "it has no Linear layer"}), model)


def with_pool_input(decl: TapDeclaration, model: nn.Module) -> TapDeclaration:
    """``decl`` with the input of the network's global pool as ``pool_input`` (a gap when it has none)."""
    if decl.pool_input is not None:
        return decl
    found = _global_pool_input(model)
    if found is not None:
        return replace(decl, pool_input=found)
    return replace(decl, gaps={**decl.gaps, "pool_input": f"{type(model).__name__} has no global pooling module"})


def _torchvision_resnet(model: nn.Module, input_size: Sequence[int]) -> TapDeclaration:
    """torchvision ResNet/ResNeXt/Wide ResNet: stem after the first ReLU, ``layer1..4``, the ``fc`` input.

    Its blocks apply one in-place ReLU to every activation, so the last block of each stage is given a
    final ReLU of its own (:mod:`models.torchvision_blocks`, same values and weights): its input is
    the stage's pre-activation sum, and the block's last BatchNorm the one before it (AB, OFD).
    """
    from models.torchvision_blocks import make_tappable

    stages = ("layer1", "layer2", "layer3", "layer4")
    preact: list[str | None] = []
    bns: list[str | None] = []
    for stage in stages:
        name, block = list(model.get_submodule(stage).named_children())[-1]
        bn = make_tappable(block)
        preact.append(f"{stage}.{name}.relu_out{INPUT_SUFFIX}" if bn else None)
        bns.append(f"{stage}.{name}.{bn}" if bn else None)
    if None in preact:  # a block class of the user's own: its forward is unknown
        return TapDeclaration(stem="relu", stages=stages, embedding="fc@in",
                              gaps={"preact": "its blocks are not torchvision's BasicBlock/Bottleneck"})
    return TapDeclaration(stem="relu", stages=stages, embedding="fc@in", preact=tuple(preact), bn=tuple(bns))


def _feature_stages(model: nn.Module, input_size: Sequence[int], head: bool) -> list[str]:
    """Stage ends of a ``features`` Sequential: the last unit of each resolution after the stem (``features.0``).

    ``head``: the last unit is the head's 1x1 convolution, not a stage (MobileNet, EfficientNet).
    """
    units = [f"features.{name}" for name, _ in model.features.named_children()][1:]
    if head:
        units = units[:-1]
    seen, _ = probe_taps(model, {u: (u, False) for u in units}, "taps", type(model).__name__, input_size)
    sizes = [tuple(seen[u].tensor.shape[-2:]) for u in units]
    return [u for i, u in enumerate(units) if i == len(units) - 1 or sizes[i + 1] != sizes[i]]


def _last_batchnorm(model: nn.Module, path: str) -> str | None:
    names = [n for n, m in model.get_submodule(path).named_modules() if isinstance(m, nn.BatchNorm2d)]
    return f"{path}.{names[-1]}" if names else None


def _torchvision_mobile(model: nn.Module, input_size: Sequence[int]) -> TapDeclaration:
    """torchvision MobileNetV2/V3 and EfficientNet: ``features.0`` stem, one stage per resolution, linear block outputs.

    Each stage ends in a block whose output is a BatchNorm (plus the residual), so the map is its own
    pre-activation and that BatchNorm the one before it.
    """
    stages = _feature_stages(model, input_size, head=True)
    return TapDeclaration(stem="features.0", stages=tuple(stages), embedding="classifier@in", preact=SAME,
                          bn=tuple(_last_batchnorm(model, s) for s in stages))


def _torchvision_convnext(model: nn.Module, input_size: Sequence[int]) -> TapDeclaration:
    """torchvision ConvNeXt: patchify stem, the four block groups, the classifier's Linear input (after its norm)."""
    stages = _feature_stages(model, input_size, head=False)
    return TapDeclaration(stem="features.0", stages=tuple(stages), embedding=f"{_last_linear(model)}@in",
                          preact=SAME)


for _name, _infer in (("resnet.ResNet", _torchvision_resnet), ("mobilenetv2.MobileNetV2", _torchvision_mobile),
                      ("mobilenetv3.MobileNetV3", _torchvision_mobile),
                      ("efficientnet.EfficientNet", _torchvision_mobile),
                      ("convnext.ConvNeXt", _torchvision_convnext)):
    FAMILIES.add(f"torchvision.models.{_name}", _infer)


def _timm_declaration(model: nn.Module, input_size: Sequence[int]) -> TapDeclaration:
    """timm's own ``feature_info``: a first entry at reduction <= 2 is the stem (else a ``stem`` module), the rest
    the stages; the embedding is the input of ``get_classifier()``."""
    entries = [dict(e) for e in getattr(model, "feature_info", None) or [] if isinstance(e, Mapping)]
    if not entries:
        return generic_declaration(model, input_size)
    stem = None
    if entries[0].get("reduction", 4) <= 2 and len(entries) > 1:
        stem = entries.pop(0)["module"]
    elif any(name == "stem" for name, _ in model.named_children()):
        stem = "stem"
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    path = next((n for n, m in model.named_modules() if m is classifier and n), _last_linear(model))
    why = "timm's feature_info names no pre-activation maps"
    return with_pool_input(TapDeclaration(stem=stem, stages=tuple(str(e["module"]) for e in entries),
                          embedding=f"{path}{INPUT_SUFFIX}" if path else None,
                          gaps={"stem": "timm's feature_info names no stem", "preact": why}), model)


SOURCES.add("torchvision", NetworkSource(_create_torchvision, generic_declaration))
SOURCES.add("timm", NetworkSource(_create_timm, _timm_declaration))
SOURCES.add("module", NetworkSource(_create_module, generic_declaration))


# ---- CIFAR stem and library weights ---------------------------------------------------------------
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
        probe_taps(model, {}, "cifar_stem", type(model).__name__, input_size)
    finally:
        for handle in handles:
            handle.remove()
    return order


def cifar_stem_conv(model: nn.Module, input_size: Sequence[int], label: str) -> str:
    """Make the first convolution 3x3 stride 1 with the same channels: the CIFAR variant of an ImageNet stem.

    The new convolution is He-initialised (fan-out). Returns its path.
    """
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
    """Replace the max-pools that run before the first stage (``first_stage``, a tap path) by identities.

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
    classifier = _last_linear(model)
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
