"""The teacher index: list the stored teachers, check them, add downloaded ones.

    python scripts/teachers.py list                      # every index under checkpoints/teachers/
    python scripts/teachers.py list checkpoints/teachers/cifar100 --json
    python scripts/teachers.py check                     # re-hash every indexed file (status 2 if one changed)
    python scripts/teachers.py add save/models/resnet56_vanilla/ckpt_epoch_240.pth model=resnet56 dataset=cifar100
    python scripts/teachers.py add FILE model=ARCH dataset=cifar100 --measure   # also measure its test accuracy
    python scripts/teachers.py cache checkpoints/teachers/cifar100/resnet32x4.pt dataset=cifar100 trainer.device=cuda

``train_teacher.py`` indexes the teachers it stores; ``add`` indexes a file it did not make (a
downloaded pretrained teacher, or a file you changed on purpose), after checking that the weights
fit ``model=`` and that their class count is the data set's. A file whose content is indexed
already keeps that entry (who made it, how, its accuracy); ``add`` only fills in what it lacks.
``add`` reads ``model=``/``model.*`` and ``dataset=``/``dataset.*`` (with ``--measure`` what
``scripts/evaluate.py`` reads: also ``trainer.device``, ``trainer.precision``,
``trainer.eval_precision``); any other key is refused in one line.
``train_student.py`` then checks the file before using it (``teacher.verify``).
``cache`` computes the teacher's logits for every crop and flip of the training split
(:mod:`distiller.jobs.cache_build`), beside the teacher unless ``--cache-dir`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from common.errors import UserError
from common.files import file_sha256
from datasets.base import teachers_data_root
from distiller.config.command_line import OneLineParser, at_least, explain_config_error, fail
from distiller.config.overrides import refuse_unread, set_keys
from distiller.config.preflight import canonical_model_choices
from distiller.jobs.cache_build import cache_teacher_file
from distiller.jobs.teachers import (
    DATA_RECIPE_KEYS,
    INDEX_NAME,
    JOURNAL_SUFFIX,
    add_teacher,
    pending_store,
    read_index,
    recipe_of,
)

DEFAULT_ROOT = Path(os.environ.get("KD_TEACHER_DIR") or "checkpoints/teachers")
ADD_READS = ("model", "dataset")  # what ``add`` reads (the choices and their keys); with --measure, evaluate.py's


def folders(root: Path) -> list[Path]:
    """``root`` and every folder below it that holds a teacher index."""
    if not root.exists():
        raise UserError(f"no teacher folder at {root}; train a teacher with `python train_teacher.py model=ARCH`, "
                        f"or name the folder")
    if root.is_file():
        root = root.parent
    marked = {p.parent for pattern in (INDEX_NAME, f"*{JOURNAL_SUFFIX}") for p in root.rglob(pattern)}
    return sorted(marked | ({root} if (root / INDEX_NAME).is_file() else set()))


def entries(root: Path, check: bool) -> list[dict[str, Any]]:
    """One row per indexed file: its entry plus ``file`` and, with ``check``, ``status`` (ok/changed/missing)."""
    rows = []
    for folder in folders(root):
        for name, entry in read_index(folder).items():
            row = {"file": str(folder / name), **entry}
            if check:
                path = folder / name
                row["status"] = ("missing" if not path.is_file()
                                 else "ok" if file_sha256(path) == entry.get("sha256") else "changed")
            rows.append(row)
        if check:  # a store killed before it finished: its rerun completes it
            for journal in sorted(folder.glob(f"*{JOURNAL_SUFFIX}")):
                pending = pending_store(folder / journal.name[:-len(JOURNAL_SUFFIX)]) or {}
                rows.append({"file": str(folder / journal.name[:-len(JOURNAL_SUFFIX)]), **pending.get("entry", {}),
                             "status": "store interrupted: rerun the teacher run"})
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["file", "arch", "dataset", "top-1", "epochs", "sha256", "date", *(["status"] if rows and
                                                                               "status" in rows[0] else [])]
    body = [[r["file"], _fmt(r.get("arch")), _fmt(r.get("dataset")), _fmt(r.get("test_top1")),
             _fmt((r.get("recipe") or {}).get("epochs")), str(r.get("sha256"))[:12], _fmt(r.get("date")),
             *([r["status"]] if "status" in r else [])] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body])


def add(path: Path, overrides: list[str], measure: bool) -> tuple[dict[str, Any], bool]:
    """Index ``path`` (its weights must fit ``model=`` or its header's architecture, and the data set's class
    count); returns its entry and whether it is new (False: the index knew the content, its entry is kept)."""
    from distiller.config.compose import compose
    from distiller.engine.checkpoints import check_file
    from distiller.jobs.evaluate import (
        EVALUATE_READS,
        _override,
        data_overrides,
        evaluate_checkpoint,
        load_checkpoint,
        model_choice,
        read_checkpoint,
    )

    overrides = canonical_model_choices(overrides)
    refuse_unread(overrides, EVALUATE_READS if measure else ADD_READS, "scripts/teachers.py add")  # as evaluate.py
    check_file(path, "teacher file")
    file = read_checkpoint(path)
    recorded, _ = data_overrides(file.header, overrides)  # the data set the file's own config names
    composed = [*recorded, *overrides]
    try:  # the data set's node, unvalidated: add needs no data (an ImageNet teacher is indexed without dataset.root)
        data_node = compose("train_teacher", composed).dataset
    except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
        raise UserError(explain_config_error(err, "train_teacher", composed)) from None
    loaded = load_checkpoint(file, model_choice(overrides))
    config = loaded.header.get("config") if isinstance(loaded.header.get("config"), dict) else {}
    known = bool(recorded) or _override(overrides, "dataset") is not None  # else the data set is unknown
    dataset = str(data_node.name) if known else None
    classes = data_node.get("num_classes") if known else None  # None: the data's folders say (--measure checks)
    if isinstance(classes, int) and not isinstance(classes, bool) and classes != loaded.num_classes:
        raise UserError(f"{path} holds a {loaded.num_classes}-class {loaded.arch}, but the {dataset} data set has "
                        f"{classes} classes: name the data set it was trained on with dataset=NAME (and "
                        f"dataset.num_classes=N where the data set takes it)")
    metrics = None
    if measure:
        result = evaluate_checkpoint(path, overrides)
        metrics, dataset = {k: result[k] for k in ("test_top1", "test_top5")}, result["dataset"]
    elif isinstance(loaded.header.get("accuracy"), (int, float)):
        metrics = {"test_top1": float(loaded.header["accuracy"])}  # as the file records it
    data_root = None if dataset is None else teachers_data_root(dataset, OmegaConf.select(data_node, "root"))
    given = set_keys(overrides)  # the data's sizes and seed the command line sets: recorded, or checked
    told = {name: OmegaConf.select(data_node, key.removeprefix("dataset.")) for name, key in DATA_RECIPE_KEYS.items()
            if key in given}
    return add_teacher(path, loaded.arch, dataset, loaded.num_classes, metrics, recipe_of(config),
                       source="added (measured)" if measure else "added", data_root=data_root, told_data=told)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, what in (("list", "list the indexed teachers"), ("check", "re-hash every indexed teacher file")):
        sub = commands.add_parser(name, help=what)
        sub.add_argument("folder", nargs="?", default=str(DEFAULT_ROOT),
                         help=f"a teacher folder, or teacher_dir=FOLDER as the entry points take it (default: "
                              f"{DEFAULT_ROOT})")
        sub.add_argument("--json", action="store_true", help="print JSON")
    sub = commands.add_parser("add", help="index a teacher file (a downloaded one, or one changed on purpose)")
    sub.add_argument("file")
    sub.add_argument("overrides", nargs="*", default=[],
                     help="model=ARCH (else the file's header), dataset=NAME, dataset.*=...")
    sub.add_argument("--measure", action="store_true", help="measure the test accuracy on dataset= and record it")
    sub.add_argument("--json", action="store_true", help="print the new entry as JSON")
    sub = commands.add_parser("cache", help="compute the teacher's logits for every crop and flip of the training "
                                             "split (distiller/jobs/cache_build.py)")
    sub.add_argument("file", help="the teacher file (checkpoints/teachers/<data>/<arch>.pt)")
    sub.add_argument("overrides", nargs="*", default=[],
                     help="dataset=NAME, dataset.*=..., model=ARCH (else the file's "
                                                  "header), trainer.device=cpu|cuda|auto")
    sub.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="stored dtype (default fp32)")
    sub.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="the forwards' precision: fp32, or bf16 autocast (default fp32)")
    sub.add_argument("--batch-size", type=at_least(1), default=256, help="forwards per batch (default 256)")
    sub.add_argument("--cache-dir", default=None, help="where the cache goes (default: the teacher's folder)")
    sub.add_argument("--rebuild", action="store_true", help="compute it again, replacing a cache with another key")
    sub.add_argument("--json", action="store_true", help="print the cache's path, size and key as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "cache":
            built = cache_teacher_file(Path(args.file), list(args.overrides), args.dtype, args.precision,
                                       args.batch_size, args.cache_dir, args.rebuild)
            summary = {"path": str(built.path), "bytes": built.nbytes, "built": built.built, "key": built.key.to_json()}
            print(json.dumps(summary) if args.json else
                  f"teacher cache {built.path}: {built.key.size} images x {built.key.variants} variants x "
                  f"{built.key.num_classes} logits, {built.key.dtype}, {built.nbytes / 1e9:.3f} GB "
                  f"({'built now' if built.built else 'already there'})")
            return 0
        if args.command == "add":
            entry, new = add(Path(args.file), list(args.overrides), args.measure)
            facts = (f"{entry['arch']} ({_fmt(entry['dataset'])}, test top-1 {_fmt(entry['test_top1'])}, "
                     f"sha256 {entry['sha256'][:12]}...)")
            print(json.dumps(entry) if args.json else f"indexed {args.file} as {facts}" if new else
                  f"the content of {args.file} is indexed already (by {entry.get('source')}): kept that entry, "
                  f"{facts}")
            return 0
        folder = args.folder.removeprefix("teacher_dir=")  # the entry points' key for the same folder
        if "=" in folder and not Path(folder).exists():
            raise UserError(f"{args.command} takes a teacher folder (or teacher_dir=FOLDER), not the override "
                            f"{args.folder}")
        args.folder = folder
        rows = entries(Path(folder), check=args.command == "check")
        print(json.dumps(rows) if args.json else table(rows) if rows else f"no indexed teachers under {args.folder}")
        changed = [r["file"] for r in rows if r.get("status") not in (None, "ok")]
        if changed:
            fail(f"{len(changed)} teacher file(s) changed or missing since they were indexed ({', '.join(changed)}); "
                 f"retrain them, or re-index with `python scripts/teachers.py add FILE model=ARCH`")
    except UserError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
