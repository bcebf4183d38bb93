"""ImageNet (ILSVRC-2012) from its folders: ``dataset=imagenet dataset.root=DIR``, always streamed.

Layout as torchvision's ImageNet preparation leaves it: ``DIR/train/<wnid>/*.JPEG`` and
``DIR/val/<wnid>/*.JPEG`` (read by the image folder's scan: every ``.png``/``.jpg``/``.jpeg``
below a class folder). The classes are the sorted wnids of ``train/``; ``val/`` must hold
the same class folders (a missing or extra one is one line naming it).

Recipe (torchvision's reference and mdistiller's): train RandomResizedCrop(224) + horizontal
flip, evaluation Resize(256) + CenterCrop(224), normalised with ImageNet's published mean/std.
``dataset.image_size`` (224) and ``dataset.eval_resize`` (256) change the sizes, e.g. for tests.

Streaming: RandomResizedCrop draws from the whole decoded image every epoch, so the set is
read from its files by :class:`~datasets.stream_loader.StreamLoader`; ``dataset.stream`` may
be ``auto`` or ``true`` (both stream), ``false`` is refused. Every file is decoded once up
front (:func:`~datasets.streaming.check_files`, cached): a bad file stops the run before it
starts, CMYK / grayscale / PNG-named-JPEG files are counted in one warning line.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from datasets.base import DATASETS, DatasetFacts, FileSplits, cfg_get, cfg_int
from datasets.imagefolder import scan
from datasets.sample_transforms import InceptionCrop
from datasets.streaming import check_files, stream_setting

# ImageNet's per-channel statistics as published with torchvision's pretrained models (pixels in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUT = "dataset=imagenet reads DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG"


def check_imagenet_settings(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """What ``dataset=imagenet`` refuses in its settings alone, before any file is read (also checked with
    the config, before a run or a sweep starts); the training crop and the evaluation resize."""
    if stream_setting(cfg_get(cfg, "stream", "auto")) is False:
        raise UserError("dataset=imagenet always streams from its files (RandomResizedCrop reads the whole image "
                        "every epoch): use dataset.stream=auto or true, or dataset=imagefolder dataset.image_size=N "
                        "for a resized copy in memory")
    size = cfg_int(cfg, "image_size", 224, minimum=1)
    resize = cfg_int(cfg, "eval_resize", 256, minimum=1)
    if resize < size:
        raise UserError(f"dataset.eval_resize={resize} is smaller than dataset.image_size={size}: the evaluation "
                        f"crop is taken from the image resized to eval_resize, so it must be at least image_size")
    return size, resize


@DATASETS.register("imagenet", facts=DatasetFacts(channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
                   options=("image_size", "eval_resize", "stream", "workers"), check=check_imagenet_settings)
def load_imagenet(cfg: Mapping[str, Any]) -> FileSplits:
    """``dataset=imagenet``: the folders at ``dataset.root``, checked once, streamed with the ImageNet recipe."""
    given = cfg_get(cfg, "root")
    if given is None or str(given) == "":
        raise UserError(f"dataset=imagenet needs dataset.root=DIR: {_LAYOUT}")
    size, resize = check_imagenet_settings(cfg)
    root = Path(str(given)).expanduser()
    classes, splits = scan(root, _LAYOUT)
    missing = sorted(set(range(len(classes))) - set(splits["val"].labels))
    if missing:
        shown = ", ".join(classes[i] for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                             else "")
        raise UserError(f"{root / 'val'} lacks the class folder(s) {shown} that {root / 'train'} has: "
                        f"train/ and val/ must hold the same wnids")
    check = check_files(root, "imagenet", splits["train"].files, splits["val"].files, key_facts=(list(classes),))
    check.warn(str(root))
    workers = None if cfg_get(cfg, "workers") is None else cfg_int(cfg, "workers", 0, minimum=0)
    return FileSplits([str(p) for p in splits["train"].files], torch.tensor(splits["train"].labels, dtype=torch.int64),
                      [str(p) for p in splits["val"].files], torch.tensor(splits["val"].labels, dtype=torch.int64),
                      len(classes), list(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      transform=InceptionCrop(size=size, resize=resize), workers=workers)
