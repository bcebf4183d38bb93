"""Speed of the streaming loader against the torchvision baseline, on the same folder of real-size JPEGs and cores.

    python -m scripts.stream_benchmark --images 320 --workers 1 2 --rounds 3
    python -m scripts.stream_benchmark --root /data/imagenet --workers 8   # a real ImageNet-layout folder

``decoders``: images/s per core of decode + ImageNet training transform per candidate decoder;
``loaders``: end to end images/s of ours (``dataset=imagenet`` + StreamLoader) and of torchvision's
ImageFolder + DataLoader, per worker count. What and how: :mod:`distiller.bench.loader_speed`.
Prints a table, then the figures as one JSON object.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common.errors import UserError
from distiller.bench.loader_speed import measure
from distiller.config.command_line import OneLineParser, at_least, fail


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="an ImageNet-layout folder (default: generate one)")
    parser.add_argument("--images", type=at_least(2), default=320, help="training JPEGs to generate")
    parser.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    args = parser.parse_args(argv)
    try:
        result = measure(args.root, args.images, tuple(args.workers), args.batch_size, args.rounds)
    except UserError as err:
        fail(str(err))
    print(f"{result['folder']}, mean file {result['mean_file_kb']:.0f} KB, {result['cores']} cores")
    for name, rate in result["decoders_per_core"].items():
        print(f"  decode + train transform, 1 core: {name:38s} {rate:7.1f} images/s")
    for w, rates in result["loaders"].items():
        print(f"  loader, {w} worker(s): ours {rates['ours']:7.1f} images/s ({rates['ours_per_core']:.1f}/core), "
              f"torchvision {rates['torchvision ImageFolder']:7.1f} ({rates['baseline_per_core']:.1f}/core), "
              f"ratio {rates['ratio']:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
