"""The feature contract between a model and the distillation code, and its declaration by module path.

A model lists ``feature_info``: one :class:`FeatureInfo` per feature, ``stem``,
``stage1`` .. ``stageL``, ``pool_input`` and ``embedding``, saying where the feature is (a
module path), what it is (channels, reduction of the input resolution) and what lies just
before it (the pre-activation map and the BatchNorm that produces it).
``distiller.features`` puts forward hooks there; models never return features from
``forward``. The declaration plays the part of timm's ``feature_info`` and of the
older frameworks' ``get_bn_before_relu``, so no method has to rediscover a fact.

A network from outside the zoo declares the same facts by module path only
(:class:`FeatureDeclaration`: a config's ``features`` node, or an inference for a known family):
``stem``, ``stages`` (in forward order), ``embedding``, and optionally ``preact`` (per stage, the
map before the stage's final activation; ``same`` where the stage ends without one), ``bn`` (per
stage, the BatchNorm producing that map) and ``pool_input``. A path names the module's output;
``path@in`` its first input. :func:`describe_features` runs one probe forward to measure channels
and reductions and to check the declaration (every path exists, runs once, is not changed in place
afterwards; stages reduce the resolution in order), and returns the :class:`FeatureInfo` list a zoo
model would declare.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from common.errors import UserError


@dataclass(frozen=True)
class FeatureInfo:
    """One feature of a model.

    ``module`` is a dotted path as in ``model.get_submodule`` ("" is the model itself);
    the feature is that module's output, or its first input when ``module_input``.
    ``preact`` (same convention, flag ``preact_input``) is the feature before the
    stage's final activation; ``None`` means it equals the feature itself.
    ``bn`` is the BatchNorm whose output is the pre-activation map (or the residual
    branch added into it); ``None`` where there is no such layer.
    ``reduction`` is input size / map size; ``None`` for the pooled embedding vector.
    """

    name: str
    module: str
    channels: int
    reduction: int | None
    module_input: bool = False
    preact: str | None = None
    preact_input: bool = False
    bn: str | None = None

    @property
    def is_stage(self) -> bool:
        return self.name.startswith("stage")


# ---- declared by module path ----------------------------------------------------------------------
INPUT_SUFFIX = "@in"
SAME = "same"  # preact: the stage maps end without an activation, so the pre-activation map is the map itself

# feature kinds a method asks for -> the declaration key that provides them
KIND_KEYS = {"stem": "stem", "stages": "stages", "stages_preact": "preact", "embedding": "embedding",
             "pool_input": "pool_input", "classifier": "embedding"}  # the classifier: the module the embedding enters


@dataclass(frozen=True)
class FeatureDeclaration:
    """Where a network's features are, by module path (``path`` or ``path@in``); None: not declared.

    ``preact`` is ``"same"``, or one entry per stage (None in an entry: that stage's map is its own
    pre-activation). ``reductions``, when given, is checked against the measured ones. ``gaps``
    says, for each key left undeclared, why (shown when a method needs it).
    """

    stem: str | None = None
    stages: tuple[str, ...] = ()
    embedding: str | None = None
    preact: str | tuple[str | None, ...] | None = None
    bn: tuple[str | None, ...] | None = None
    reductions: tuple[int, ...] | None = None
    pool_input: str | None = None  # the map the global pool averages into the embedding (e.g. avgpool@in)
    gaps: Mapping[str, str] = field(default_factory=dict)

    def merged(self, declared: Mapping[str, Any] | None, where: str = "features") -> FeatureDeclaration:
        """This declaration with the keys ``declared`` sets (a config's ``features`` node, at ``where``) replacing
        its own.

        Declaring ``stages`` drops the inferred ``preact``/``bn``/``reductions`` (they were per inferred stage).
        """
        given = {k: v for k, v in (declared or {}).items() if v is not None}
        unknown = sorted(set(given) - {"stem", "stages", "embedding", "preact", "bn", "reductions", "pool_input"})
        if unknown:
            raise UserError(f"{where}.{unknown[0]} is not a features key; use stem, stages, embedding, preact, bn, "
                            "reductions, pool_input")
        base = self
        if "stages" in given:
            base = replace(base, preact=None, bn=None, reductions=None,
                           gaps={**base.gaps, "preact": "no features.preact declared for the declared stages"})
        out = {}
        for key in ("stem", "embedding", "pool_input"):
            if key in given:
                out[key] = str(given[key])
        for key in ("stages", "bn"):
            if key in given:
                out[key] = tuple(None if v is None else str(v) for v in _as_list(given[key], f"{where}.{key}"))
        if "preact" in given:
            value = given["preact"]
            out["preact"] = SAME if value == SAME else tuple(None if v is None else str(v)
                                                            for v in _as_list(value, f"{where}.preact"))
        if "reductions" in given:
            out["reductions"] = tuple(int(v) for v in _as_list(given["reductions"], f"{where}.reductions"))
        return replace(base, **out, gaps={k: v for k, v in base.gaps.items() if k not in out})


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise UserError(f"{key} must be a list, e.g. {key}=[layer1,layer2]; got {value!r}")
    return list(value)


def parse_feature_path(text: str) -> tuple[str, bool]:
    """``"layer1"`` -> ("layer1", False) (the output); ``"fc@in"`` -> ("fc", True) (the first input)."""
    if text.endswith(INPUT_SUFFIX):
        return text[: -len(INPUT_SUFFIX)], True
    return text, False


def declaration_of(infos: Sequence[FeatureInfo]) -> FeatureDeclaration:
    """The declaration that gives back ``infos`` (a zoo-style ``feature_info``) when measured."""
    path_of = lambda path, take_input: f"{path}{INPUT_SUFFIX if take_input else ''}"
    by_name = {i.name: i for i in infos}
    stages = [i for i in infos if i.is_stage]
    stem, embedding, pool = by_name.get("stem"), by_name.get("embedding"), by_name.get("pool_input")
    return FeatureDeclaration(
        stem=path_of(stem.module, stem.module_input) if stem else None,
        stages=tuple(path_of(i.module, i.module_input) for i in stages),
        embedding=path_of(embedding.module, embedding.module_input) if embedding else None,
        preact=tuple(None if i.preact is None else path_of(i.preact, i.preact_input) for i in stages),
        bn=tuple(i.bn for i in stages),
        reductions=tuple(i.reduction for i in stages),
        pool_input=path_of(pool.module, pool.module_input) if pool else None,
    )


# ---- measuring ------------------------------------------------------------------------------------
@dataclass
class _Seen:
    calls: int = 0
    tensor: torch.Tensor | None = None
    version: int = 0


def _module(model: nn.Module, path: str, key: str, where: str, label: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close
                else f"its top-level modules: {', '.join(n for n, _ in model.named_children())}")
        raise UserError(f"{where}.{key}='{path}' is not a module of {label}; {hint}") from None


def probe_features(model: nn.Module, paths: dict[str, tuple[str, bool]], where: str, label: str,
           input_size: Sequence[int]) -> tuple[dict[str, _Seen], torch.Tensor]:
    """One forward of zeros in eval mode: per key, how often its module ran and what it saw."""
    seen = {key: _Seen() for key in paths}
    handles = []

    def record(key: str, tensor: Any) -> None:
        entry = seen[key]
        entry.calls += 1
        if isinstance(tensor, torch.Tensor):
            entry.tensor, entry.version = tensor, tensor._version

    for key, (path, take_input) in paths.items():
        module = _module(model, path, key, where, label)
        if take_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, key=key: record(key, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, key=key: record(key, out)))
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            logits = model(torch.zeros(*input_size, device=device, dtype=dtype))
    except Exception as err:  # noqa: BLE001 - whatever the network's own code raises (timm's size check is an AssertionError)
        first_line = next((s for s in str(err).splitlines() if s.strip()), type(err).__name__)
        raise UserError(f"{label} cannot run on {input_size[-2]}x{input_size[-1]} images ({first_line}); "
                        "check its arguments (further keys of its node go to its constructor, e.g. a ViT's "
                        "img_size), or cifar_stem for small images") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return seen, logits


def describe_features(model: nn.Module, decl: FeatureDeclaration, where: str, label: str,
                      input_size: Sequence[int] = (2, 3, 32, 32)) -> tuple[list[FeatureInfo], torch.Tensor]:
    """The ``feature_info`` of ``decl`` on ``model``, measured by one probe forward, and the probe's logits.

    ``where`` is the config prefix of the declaration (``teacher.features``) and ``label`` the network's
    name, both for messages. Raises :class:`UserError` for a path that does not exist, runs more
    than once or not at all, is changed in place after it ran, or gives a tensor of the wrong kind;
    for stages whose reduction decreases, or differs from ``decl.reductions``; for preact maps whose
    shape differs from their stage's; for a ``bn`` that is not a BatchNorm.
    """
    n = len(decl.stages)
    for key, values in (("preact", decl.preact), ("bn", decl.bn), ("reductions", decl.reductions)):
        if values is not None and values != SAME and len(values) != n:
            raise UserError(f"{where}.{key} has {len(values)} entries but {where}.stages has {n}; give one per stage")
    paths: dict[str, tuple[str, bool]] = {}
    if decl.stem is not None:
        paths["stem"] = parse_feature_path(decl.stem)
    for i, stage in enumerate(decl.stages):
        paths[f"stages[{i}]"] = parse_feature_path(stage)
    if isinstance(decl.preact, tuple):
        for i, pre in enumerate(decl.preact):
            if pre is not None:
                paths[f"preact[{i}]"] = parse_feature_path(pre)
    if decl.pool_input is not None:
        paths["pool_input"] = parse_feature_path(decl.pool_input)
    if decl.embedding is not None:
        paths["embedding"] = parse_feature_path(decl.embedding)
    for i, bn in enumerate(decl.bn or ()):
        if bn is not None and not isinstance(_module(model, bn, f"bn[{i}]", where, label),
                                             nn.modules.batchnorm._BatchNorm):
            raise UserError(f"{where}.bn[{i}]='{bn}' is a {type(model.get_submodule(bn)).__name__}, not a BatchNorm")
    seen, logits = probe_features(model, paths, where, label, input_size)
    height, width = int(input_size[-2]), int(input_size[-1])
    shapes: dict[str, torch.Size] = {}
    for key, entry in seen.items():
        path = paths[key][0] + (INPUT_SUFFIX if paths[key][1] else "")
        if entry.calls != 1:
            raise UserError(f"{where}.{key}='{path}' runs {entry.calls} times in one forward of {label}; "
                            "choose a module that runs exactly once (one module object per activation)")
        if entry.tensor is None:
            raise UserError(f"{where}.{key}='{path}' does not give a tensor in {label}")
        if entry.tensor._version != entry.version:
            raise UserError(f"{where}.{key}='{path}' is changed in place later in the forward of {label} "
                            "(an in-place op after it), so a hook would see another value; choose another module")
        shapes[key] = entry.tensor.shape

    def reduction(key: str) -> int:
        shape = shapes[key]
        if len(shape) != 4:
            raise UserError(f"{where}.{key} gives a {list(shape)} tensor in {label}, not a [B, C, H, W] map")
        r = max(round(height / shape[-2]), 1)
        # strided layers give floor or ceil of size / r (odd sizes): both count as a reduction by r
        fits = lambda size, got: got in (size // r, -(-size // r))
        if not (fits(height, shape[-2]) and fits(width, shape[-1])):
            raise UserError(f"{where}.{key} gives a {shape[-2]}x{shape[-1]} map of a {height}x{width} input in "
                            f"{label}: not one reduction of both sides")
        return r

    infos: list[FeatureInfo] = []
    if "stem" in shapes:
        infos.append(FeatureInfo("stem", *paths["stem"][:1], shapes["stem"][1], reduction("stem"),
                                 module_input=paths["stem"][1]))
    previous = ("stem", infos[0].reduction) if infos else None
    for i in range(n):
        key = f"stages[{i}]"
        r = reduction(key)
        if previous is not None and r < previous[1]:
            raise UserError(f"{where}.stages must be in forward order with non-decreasing reduction: {key}="
                            f"'{decl.stages[i]}' reduces {height} px by {r}, less than {previous[0]}'s {previous[1]}")
        if decl.reductions is not None and decl.reductions[i] != r:
            raise UserError(f"{where}.reductions[{i}]={decl.reductions[i]} but {key}='{decl.stages[i]}' "
                            f"reduces the resolution by {r} in {label}")
        previous = (key, r)
        preact, preact_input = None, False
        if isinstance(decl.preact, tuple) and decl.preact[i] is not None:
            preact, preact_input = parse_feature_path(decl.preact[i])
            if shapes[f"preact[{i}]"] != shapes[key]:
                raise UserError(f"{where}.preact[{i}]='{decl.preact[i]}' gives {list(shapes[f'preact[{i}]'])} but "
                                f"stage {key} gives {list(shapes[key])}; the pre-activation map must match its stage")
        path, take_input = paths[key]
        infos.append(FeatureInfo(f"stage{i + 1}", path, shapes[key][1], r, module_input=take_input, preact=preact,
                                 preact_input=preact_input, bn=decl.bn[i] if decl.bn else None))
    if "pool_input" in shapes:
        path, take_input = paths["pool_input"]
        infos.append(FeatureInfo("pool_input", path, shapes["pool_input"][1], reduction("pool_input"),
                                 module_input=take_input))
    if "embedding" in shapes:
        shape = shapes["embedding"]
        if len(shape) != 2:
            raise UserError(f"{where}.embedding='{decl.embedding}' gives a {list(shape)} tensor in {label}, not a "
                            "[B, D] vector; declare the classifier's input instead (e.g. fc@in)")
        path, take_input = paths["embedding"]
        infos.append(FeatureInfo("embedding", path, shape[1], None, module_input=take_input))
    return infos, logits


def undeclared_kinds(decl: FeatureDeclaration) -> dict[str, str]:
    """Feature kinds (``stem``, ``stages``, ``stages_preact``, ``embedding``, ``pool_input``, ``classifier``)
    ``decl`` cannot provide, with why."""
    missing = {"stem": decl.stem is None, "stages": not decl.stages,
               "stages_preact": not decl.stages or decl.preact is None, "embedding": decl.embedding is None,
               "pool_input": decl.pool_input is None, "classifier": decl.embedding is None}
    gaps = {}
    for kind, absent in missing.items():
        key = KIND_KEYS[kind]
        if absent:
            gaps[kind] = decl.gaps.get(key, f"no features.{key} declared")
    return gaps


def check_features(model: nn.Module, role: str, label: str, needs: Mapping[str, Iterable[str]]) -> None:
    """Raise one :class:`UserError` when a method (``needs``: label -> feature kinds) reads a feature ``model`` lacks.

    Zoo models declare every kind; a network built from a declaration carries ``undeclared_features``.
    """
    gaps: Mapping[str, str] = getattr(model, "undeclared_features", {})
    for method, kinds in needs.items():
        for kind in sorted(kinds):
            if kind in gaps:
                raise UserError(f"method '{method}' needs the {role}'s {kind} features, but {role} {label} has none "
                                f"({gaps[kind]}); declare them with {role}.features.{KIND_KEYS[kind]}=... "
                                "(README: Your own network) or choose another method")
