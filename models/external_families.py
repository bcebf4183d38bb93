"""Where the features of a library network are, by family: torchvision ResNet/MobileNet/EfficientNet/ConvNeXt,
timm's own ``feature_info``, a network's zoo-style ``feature_info``, or, for any other network, its embedding
(the last Linear's input) and the input of its last global pool. A config node's ``features`` override these.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping, Sequence

from torch import nn

from common.registry import Registry
from models.features import (
    INPUT_SUFFIX,
    SAME,
    FeatureDeclaration,
    declaration_of,
    probe_features,
)

# inferred features per network class (``module.qualname``), for the families common enough to know
FAMILIES: Registry[Callable[[nn.Module, Sequence[int]], FeatureDeclaration]] = Registry("network family")


def last_linear(model: nn.Module) -> str | None:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


GLOBAL_POOLS = ("AdaptiveAvgPool2d", "SelectAdaptivePool2d")  # torch's and timm's global pools


def _global_pool_input(model: nn.Module) -> str | None:
    """``<path>@in`` of the network's last global average pool (the map the embedding averages), if it has one."""
    names = [name for name, m in model.named_modules() if type(m).__name__ in GLOBAL_POOLS and name]
    return f"{names[-1]}{INPUT_SUFFIX}" if names else None


def generic_declaration(model: nn.Module, input_size: Sequence[int]) -> FeatureDeclaration:
    """What any network has: its own zoo-style ``feature_info``, or else the embedding (the last Linear's input)
    and the input of its last global pool."""
    own = getattr(model, "feature_info", None)
    if own and all(hasattr(i, "is_stage") for i in own):
        return declaration_of(own)
    family = f"{type(model).__module__}.{type(model).__qualname__}"
    if family in FAMILIES:
        return with_pool_input(FAMILIES.get(family)(model, input_size), model)
    why = f"features of {type(model).__name__} are not inferred"
    linear = last_linear(model)
    return with_pool_input(FeatureDeclaration(
        embedding=f"{linear}{INPUT_SUFFIX}" if linear else None,
        gaps={"stem": why, "stages": why, "preact": why, "embedding": "it has no Linear layer"}), model)


def with_pool_input(decl: FeatureDeclaration, model: nn.Module) -> FeatureDeclaration:
    """``decl`` with the input of the network's global pool as ``pool_input`` (a gap when it has none)."""
    if decl.pool_input is not None:
        return decl
    found = _global_pool_input(model)
    if found is not None:
        return replace(decl, pool_input=found)
    return replace(decl, gaps={**decl.gaps, "pool_input": f"{type(model).__name__} has no global pooling module"})


def _torchvision_resnet(model: nn.Module, input_size: Sequence[int]) -> FeatureDeclaration:
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
        return FeatureDeclaration(stem="relu", stages=stages, embedding="fc@in",
                                  gaps={"preact": "its blocks are not torchvision's BasicBlock/Bottleneck"})
    return FeatureDeclaration(stem="relu", stages=stages, embedding="fc@in", preact=tuple(preact), bn=tuple(bns))


def _feature_stages(model: nn.Module, input_size: Sequence[int], head: bool) -> list[str]:
    """Stage ends of a ``features`` Sequential: the last unit of each resolution after the stem (``features.0``).

    ``head``: the last unit is the head's 1x1 convolution, not a stage (MobileNet, EfficientNet).
    """
    units = [f"features.{name}" for name, _ in model.features.named_children()][1:]
    if head:
        units = units[:-1]
    seen, _ = probe_features(model, {u: (u, False) for u in units}, "features", type(model).__name__, input_size)
    sizes = [tuple(seen[u].tensor.shape[-2:]) for u in units]
    return [u for i, u in enumerate(units) if i == len(units) - 1 or sizes[i + 1] != sizes[i]]


def _last_batchnorm(model: nn.Module, path: str) -> str | None:
    names = [n for n, m in model.get_submodule(path).named_modules() if isinstance(m, nn.BatchNorm2d)]
    return f"{path}.{names[-1]}" if names else None


def _torchvision_mobile(model: nn.Module, input_size: Sequence[int]) -> FeatureDeclaration:
    """torchvision MobileNetV2/V3 and EfficientNet: ``features.0`` stem, one stage per resolution, linear block outputs.

    Each stage ends in a block whose output is a BatchNorm (plus the residual), so the map is its own
    pre-activation and that BatchNorm the one before it.
    """
    stages = _feature_stages(model, input_size, head=True)
    return FeatureDeclaration(stem="features.0", stages=tuple(stages), embedding="classifier@in", preact=SAME,
                              bn=tuple(_last_batchnorm(model, s) for s in stages))


def _torchvision_convnext(model: nn.Module, input_size: Sequence[int]) -> FeatureDeclaration:
    """torchvision ConvNeXt: patchify stem, the four block groups, the classifier's Linear input (after its norm)."""
    stages = _feature_stages(model, input_size, head=False)
    return FeatureDeclaration(stem="features.0", stages=tuple(stages), embedding=f"{last_linear(model)}@in",
                              preact=SAME)


for _name, _infer in (("resnet.ResNet", _torchvision_resnet), ("mobilenetv2.MobileNetV2", _torchvision_mobile),
                      ("mobilenetv3.MobileNetV3", _torchvision_mobile),
                      ("efficientnet.EfficientNet", _torchvision_mobile),
                      ("convnext.ConvNeXt", _torchvision_convnext)):
    FAMILIES.add(f"torchvision.models.{_name}", _infer)


def timm_declaration(model: nn.Module, input_size: Sequence[int]) -> FeatureDeclaration:
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
    path = next((n for n, m in model.named_modules() if m is classifier and n), last_linear(model))
    embedding = f"{path}{INPUT_SUFFIX}" if path else None
    stages = tuple(str(e["module"]) for e in entries)
    tokens = _token_outputs(model, (stem,) * (stem is not None) + stages, input_size)
    if tokens:  # a transformer's blocks: the logit methods need none of its features, map methods cannot use them
        why = f"timm's feature_info of {type(model).__name__} gives {tokens} token sequences, not [B, C, H, W] maps"
        return with_pool_input(FeatureDeclaration(embedding=embedding, gaps={"stem": why, "stages": why,
                                                                             "preact": why}), model)
    why = "timm's feature_info names no pre-activation maps"
    return with_pool_input(FeatureDeclaration(stem=stem, stages=stages, embedding=embedding,
                                              gaps={"stem": "timm's feature_info names no stem", "preact": why}), model)


def _token_outputs(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> str | None:
    """The shape (as ``[B, N, C]``) of the first of ``paths`` whose output is not a 4-d map, if one is not."""
    seen, _ = probe_features(model, {p: (p, False) for p in paths}, "features", type(model).__name__, input_size)
    for entry in seen.values():
        if entry.tensor is not None and entry.tensor.dim() != 4:
            return "[B, N, C]" if entry.tensor.dim() == 3 else f"{entry.tensor.dim()}-d"
    return None
