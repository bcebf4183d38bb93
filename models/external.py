"""Networks from outside the zoo as teacher or student: torchvision and timm models by name, any ``nn.Module`` by path.

A config node with a ``source`` key (``torchvision``, ``timm`` or ``module``) describes such a
network; a node without one names a zoo architecture. :func:`build_network` builds either:
the library's model with ``num_classes`` from the data set, optionally with a CIFAR stem
(``cifar_stem``: the first convolution becomes 3x3 stride 1, the max-pool before the first
stage is dropped) and the library's own weights file (``weights``: matching tensors load, the
classifier and a replaced stem keep their fresh initialisation: :mod:`models.external_adapt`). Its
features come from the node's ``features`` (module paths, :mod:`models.features`) over an inference for the
family (:mod:`models.external_families`); channels and reductions are measured, so the network ends up with the
same ``feature_info`` vocabulary as a zoo model and every method runs on it unchanged.
timm is optional and imported only when a ``timm`` network is built.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from common.errors import UserError
from common.registry import Registry
from models.external_adapt import cifar_stem_conv, drop_stem_pool, load_library_weights
from models.external_families import generic_declaration, timm_declaration
from models.features import (
    FeatureDeclaration,
    describe_features,
    undeclared_kinds,
)

log = logging.getLogger("models")

# keys of an external network's config node that are not constructor arguments: the schema's
# (distiller/config/schema.py ExternalTeacherConfig; tests/test_external_networks.py checks that it lists them all)
CONFIG_KEYS = frozenset({"source", "name", "lr", "ckpt", "published_top1", "verify", "cifar_stem", "weights",
                         "features", "_target_", "cache", "cache_dir", "cache_dtype",
                         "extra"})  # extra: where a converted node keeps the constructor's arguments


@dataclass(frozen=True)
class NetworkSource:
    """Where a network comes from: how to build it by name and how to infer its features."""

    create: Callable[[Mapping[str, Any], int, str], nn.Module]  # (config node, num_classes, role) -> network
    infer: Callable[[nn.Module, Sequence[int]], FeatureDeclaration]  # (network, probe input size) -> declaration


SOURCES: Registry[NetworkSource] = Registry("network source")


def network_label(node: Mapping[str, Any]) -> str:
    """The name a network goes by in run headers and checkpoint files: ``resnet56``, ``torchvision-resnet18``."""
    source = node.get("source")
    return str(node["name"]) if source is None else f"{source}-{node['name']}"


def command_line_choice(node: Mapping[str, Any], group: str = "teacher") -> str:
    """How the command line chooses this network: ``teacher=resnet56``, ``teacher=torchvision teacher.name=NAME``,
    with its CIFAR stem and constructor arguments (``+teacher.width=2``) where the node has them."""
    source = node.get("source")
    if source is None:
        return f"{group}={node['name']}"
    key = "_target_" if source == "module" else "name"
    words = [f"{group}={source}", f"{group}.{key}={node.get(key, node['name'])}"]
    if node.get("cifar_stem"):
        words.append(f"{group}.cifar_stem=true")
    args = {**(_plain(node.get("extra")) or {}), **constructor_args(node)}
    words += [f"+{group}.{name}={_override_value(value)}" for name, value in sorted(args.items())]
    return " ".join(words)


def _override_value(value: Any) -> str:
    """A value as a command-line override writes it (``true``, ``[1,2]``, ``null``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"[{','.join(_override_value(v) for v in value)}]"
    return str(value)


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
    declared = _plain(node.get("features"))
    declare = lambda: source.infer(model, input_size).merged(declared, f"{role}.features")
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
    infos, logits = describe_features(model, decl, f"{role}.features", label, input_size)
    if tuple(logits.shape) != (input_size[0], num_classes):
        raise UserError(f"{role} {label} outputs {list(logits.shape)} for a batch of {input_size[0]}, but the data "
                        f"set has {num_classes} classes; give its constructor a num_classes argument (it is then "
                        "passed automatically) or make its classifier that wide")
    model.feature_info = infos
    model.undeclared_features = undeclared_kinds(decl)
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


SOURCES.add("torchvision", NetworkSource(_create_torchvision, generic_declaration))
SOURCES.add("timm", NetworkSource(_create_timm, timm_declaration))
SOURCES.add("module", NetworkSource(_create_module, generic_declaration))
