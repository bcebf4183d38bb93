"""The config schema of the two jobs, and the model zoo's config groups.

Every key of ``train_teacher`` and ``train_student`` is declared here once, with its type and its
range or valid values (:func:`key`); :func:`validate` checks a composed config against it and
raises one :class:`UserError` naming the key. The values themselves (defaults) live in the YAML
files under ``configs/``; the few keys no YAML sets have their default here. A method's own
keyword arguments (``distill.nce_k``, ...) stay untyped: its constructor defines and checks them.

The groups ``model``, ``teacher`` and ``student`` have no YAML files: one node per registered
architecture is generated from the model registry (name, and the ``lr`` the model file declares),
so adding a model is adding its file in ``models/``; and one per network source outside the zoo
(``torchvision``, ``timm``, ``module``: :mod:`models.external`), whose nodes carry further keys.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import UserError
from distiller.config_messages import describe_error, either, show, unwrap
from distiller.loggers import BACKENDS
from distiller.optim import OPTIMIZERS
from models import MODEL_METADATA_DEFAULTS, MODELS, list_models, model_metadata
from models.external import SOURCES

# Test top-1 of the widely shared pretrained CIFAR-100 teachers (RepDistiller / CRD, RECIPES.md).
PUBLISHED_TEACHER_TOP1: dict[str, float] = {
    "wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "vgg13": 74.64,
    "ResNet50": 79.34,
}


def key(default: Any = MISSING, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
        lt: float | None = None, choices: tuple | None = None, pattern: str | None = None, each: dict | None = None,
        extra_keys: bool = False) -> Any:
    """A schema field: ``MISSING`` (the YAML sets it) or a default, plus its range or valid values.

    ``pattern`` is a regular expression the value must match in full (``choices`` then only names
    the valid values in messages); ``each`` holds the same checks for every item of a list;
    ``extra_keys`` lets a typed mapping carry further, untyped keys.
    """
    checks = {"gt": gt, "ge": ge, "le": le, "lt": lt, "choices": choices, "pattern": pattern, "each": each,
              "extra_keys": extra_keys}
    checks = {k: v for k, v in checks.items() if v is not None and v is not False}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=checks)
    return field(default=default, metadata=checks)


# ---- the schema -----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = key()  # reference name in models.MODELS
    lr: float = key(gt=0)  # SGD learning rate when this architecture is the trained network


@dataclass
class TeacherConfig(ModelConfig):
    ckpt: str = key()  # the teacher's weights
    published_top1: float | None = key(ge=0, le=100)  # test top-1 of the widely shared pretrained teacher
    verify: bool = key()  # check the file against the teacher index (distiller/teachers.py) before use


@dataclass
class TapsConfig:
    """Where an external network's features are, by module path (``path``; ``path@in``: its input): models/taps.py."""

    stem: str | None = key(None)
    stages: List[str] | None = key(None)  # in forward order, reductions non-decreasing
    embedding: str | None = key(None)  # the pooled [B, D] vector, e.g. fc@in
    preact: Any = key(None)  # per stage, the map before its final activation; or "same" (stages end without one)
    bn: List[Any] | None = key(None)  # per stage, the BatchNorm producing the pre-activation map (OFD)
    reductions: List[int] | None = key(None)  # input size / stage map size, checked against the measured ones
    pool_input: str | None = key(None)  # the map the global pool averages into the embedding, e.g. avgpool@in


@dataclass
class ExternalKeys:
    """The keys of a network from outside the zoo (``model=torchvision|timm|module``: models/external.py).

    Further keys are the network constructor's keyword arguments (``+model.width=2``).
    """

    source: str = key(choices=tuple(SOURCES.names()))  # models.external.SOURCES
    cifar_stem: bool = key(False)  # first conv 3x3 stride 1, no max-pool before the first stage (32 px inputs)
    weights: str | None = key(None)  # the library's own weights file, loaded before training (never downloaded)
    taps: TapsConfig = field(default_factory=TapsConfig)  # over the taps inferred for the family
    _target_: str | None = key(None)  # module: import path of the network's class or builder


@dataclass
class ExternalModelConfig(ExternalKeys, ModelConfig):
    pass


@dataclass
class ExternalTeacherConfig(ExternalKeys, TeacherConfig):
    pass


@dataclass
class DatasetConfig:
    name: str = key()  # registry key in datasets.DATASETS
    root: str = key()
    batch_size: int = key(gt=0)
    eval_batch_size: int = key(gt=0)
    num_classes: int | None = key(None, gt=0)  # must match the data; null: the data set's own count
    mean: List[float] | None = key(None)  # per-channel normalisation (pixels in [0, 1]); null: the data set's
    std: List[float] | None = key(None, each={"gt": 0})
    # keys of one data set only (null: the data set has no such key)
    download: bool | None = key(None)  # cifar100, cifar10
    verify_checksums: bool | None = key(None)  # cifar100, cifar10
    train_size: int | None = key(None, ge=10)  # synthetic: every class appears (checked by the data set)
    test_size: int | None = key(None, ge=1)  # synthetic
    seed: int | None = key(None, ge=0)  # synthetic
    image_size: int | None = key(None, gt=0)  # imagefolder: resize every image to N x N (null: one shared size)
    stream: bool | str | None = key(None, choices=("auto", True, False))  # imagefolder, imagenet: datasets/streaming.py
    workers: int | None = key(None, ge=0)  # streamed sets: decoding processes per training process (null: auto)
    eval_resize: int | None = key(None, gt=0)  # imagenet: evaluation's shorter side before cropping image_size


@dataclass
class OptimConfig:
    name: str = key(choices=tuple(OPTIMIZERS.names()))  # distiller.optim.OPTIMIZERS
    lr: float = key(gt=0)
    momentum: float = key(ge=0, lt=1)  # 1 or more: the momentum buffer never forgets and the run diverges
    weight_decay: float = key(ge=0)
    nesterov: bool = key()
    implementation: str = key(choices=("auto", "fused", "foreach", "loop"))
    scale_lr_with_batch: bool = key()
    # keys of one optimizer only (null: the optimizer has no such key)
    delta: float | None = key(None, ge=0)  # dot: task momentum - delta, distillation momentum + delta


@dataclass
class ScheduleConfig:
    name: str = key(choices=("step",))
    milestones: List[int] = key(each={"ge": 0})  # the lr drops after these epochs (0: from the first)
    gamma: float = key(gt=0)


@dataclass
class TrainerConfig:
    epochs: int = key(gt=0)
    device: str = key(choices=("auto", "cpu", "cuda", "cuda:N"), pattern=r"auto|cpu|cuda(:\d+)?")
    precision: str = key(choices=("auto", "fp32", "bf16", "fp16"))
    eval_precision: str = key(choices=("fp32", "same", "bf16", "fp16"))  # evaluation's; same: as training
    channels_last: bool | str = key(choices=("auto", True, False))
    compile: bool | str = key(choices=("auto", True, False))
    log_interval: int = key(gt=0)
    checkpoint_every_steps: int = key(ge=0)
    resume: bool = key()
    auto_resume: bool = key()
    force: bool = key()
    nonfinite_check: str = key(choices=("loss", "grad", "off"))
    num_threads: int | None = key(gt=0)
    progress: bool = key()
    find_unused_parameters: bool = key(False)  # DDP: let some parameters go without a gradient in a step


@dataclass
class DistillConfig:
    """The objective's keys of one method; the method's own keyword arguments ride along untyped."""

    name: str = key()  # label in run directories and result tables
    method: str = key()  # registry key of the DistillMethod class
    gamma: float = key(ge=0)  # weight of cross-entropy
    alpha: float = key(ge=0)  # weight of KD on logits
    beta: float = key(ge=0)  # weight of the method's own terms
    temperature: float = key(gt=0)  # KD temperature
    warmup_epochs: int = key(ge=0)  # beta ramps linearly over this many epochs
    logit_standardize: bool | None = key(None)  # LS: standardise logits before KD and logit methods (absent: false)


@dataclass
class LoggerConfig:
    """Where the curves go (``logger=tensorboard|wandb|none``, configs/logger/); metrics.json is always written."""

    # every group file sets it; the default is for configs without a logger node (runs made before it existed)
    backends: List[str] = key(["tensorboard"], each={"choices": tuple(BACKENDS.names())})
    # Weights & Biases (backend wandb; configs/logger/wandb.yaml sets them; null: W&B's own default)
    project: str | None = key(None)
    entity: str | None = key(None)
    name: str | None = key(None)  # null: the run directory below runs/
    group: str | None = key(None)
    tags: List[str] | None = key(None)
    mode: str | None = key(None, choices=("online", "offline", "disabled"))  # null: $WANDB_MODE, else offline


def logger_settings(node: Any) -> DictConfig:
    """The ``logger`` node (None: a run made before it existed) with the schema's defaults filled in."""
    try:
        return OmegaConf.merge(OmegaConf.structured(LoggerConfig), node or {})
    except OmegaConfBaseException as err:
        raise UserError(f"invalid logger settings: {str(err).splitlines()[0]}") from None


@dataclass
class JobConfig:
    seed: int = key(ge=0)
    teacher_dir: str = key()  # where finished teachers are stored and teacher=<arch> looks
    dataset: DatasetConfig = key()
    optim: OptimConfig = key()
    schedule: ScheduleConfig = key()
    trainer: TrainerConfig = key()
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # absent: TensorBoard only


@dataclass
class TeacherJob(JobConfig):
    """``train_teacher``: one network trained with cross-entropy."""

    model: ModelConfig = key()
    save_teacher: bool = key()


@dataclass
class StudentJob(JobConfig):
    """``train_student``: a teacher distilled into a student."""

    teacher: TeacherConfig = key()
    student: ModelConfig = key()
    distill: DistillConfig = key(extra_keys=True)
    combine: Dict[str, DistillConfig] = key(extra_keys=True)  # further methods, each with its own weights
    method_label: str = key()
    pair: Dict[str, Any] | None = key(None)  # per-pair settings read by method configs (untyped)


SCHEMAS: dict[str, type] = {"train_teacher": TeacherJob, "train_student": StudentJob}


# ---- validation -----------------------------------------------------------------------------------
def validate(cfg: DictConfig | dict, job: str | None = None) -> DictConfig:
    """The config as a typed, resolved, range-checked view; a bad value raises one :class:`UserError`.

    ``job`` is ``train_teacher`` or ``train_student`` (default: ``train_student`` when the config has
    a ``distill`` node). Keys outside the schema at the top level (``bench`` of the benchmark, ...)
    pass untyped; Hydra's own ``hydra`` node is left out. A view that is already typed comes back as is.
    """
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) in SCHEMAS.values():
        return cfg
    schema = SCHEMAS[job] if job else (StudentJob if "distill" in cfg else TeacherJob)
    _require_network_names(cfg)
    data = _resolved(cfg)
    typed = OmegaConf.structured(schema)
    OmegaConf.set_struct(typed, False)  # unknown top-level keys pass; every group node stays closed
    if isinstance(data.get("combine"), dict):
        typed.combine = {name: OmegaConf.structured(DistillConfig) for name in data["combine"]}
    external = _type_external_networks(typed, data)
    _open_nodes(typed, schema)
    try:
        typed = OmegaConf.merge(typed, data)
        _check(typed, schema, "", data)
        for group, kind in external.items():
            _check(typed[group], kind, f"{group}.", data[group])
    except OmegaConfBaseException as err:
        raise UserError(describe_error(err, schema)) from None
    return typed


def _require_network_names(cfg: DictConfig | dict) -> None:
    """An external network node names its model (``teacher=torchvision teacher.name=resnet18``): say so in one line."""
    for group in ("model", "teacher", "student"):
        node = cfg.get(group) if isinstance(cfg, (dict, DictConfig)) else None
        if not isinstance(node, (dict, DictConfig)) or node.get("source") is None:
            continue
        key = "_target_" if node.get("source") == "module" else "name"
        example = "pkg.module.Class" if key == "_target_" else "resnet18"
        if isinstance(node, DictConfig):
            absent = key not in node.keys() or OmegaConf.is_missing(node, key)
        else:
            absent = node.get(key) in (None, MISSING)
        if absent:
            raise UserError(f"{group}={node.get('source')} needs {group}.{key}=... (e.g. {group}.{key}={example})")


def _type_external_networks(typed: DictConfig, data: dict) -> dict[str, type]:
    """Type the network nodes that name a ``source`` as external networks, open for constructor arguments."""
    external = {}
    for group in ("model", "teacher", "student"):
        node = data.get(group)
        if group in typed.keys() and isinstance(node, dict) and node.get("source") is not None:
            kind = ExternalTeacherConfig if group == "teacher" else ExternalModelConfig
            typed[group] = OmegaConf.structured(kind)
            OmegaConf.set_struct(typed[group], False)
            OmegaConf.set_struct(typed[group].taps, True)  # a misspelt tap key is an error
            external[group] = kind
    return external


def _resolved(cfg: DictConfig | dict) -> dict:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(describe_error(err)) from None


def _open_nodes(node: DictConfig, schema: type) -> None:
    """Let the nodes declared with ``extra_keys`` carry untyped keys beside their typed ones."""
    for f in dataclasses.fields(schema):
        child = node._get_node(f.name)
        if f.metadata.get("extra_keys") and isinstance(child, DictConfig):
            OmegaConf.set_struct(child, False)
            for value in (child.values() if OmegaConf.get_type(child) is dict else ()):
                if isinstance(value, DictConfig):
                    OmegaConf.set_struct(value, False)


def _check(node: Any, schema: type, prefix: str, given: Any) -> None:
    """Range and valid-value checks of every declared key below ``node`` (the merge checked the types).

    ``given`` is the same part of the config as the user wrote it, for messages (``0``, not ``0.0``).
    """
    hints = typing.get_type_hints(schema)
    given = given if isinstance(given, dict) else {}
    # the networks' nodes first: optim.lr follows model.lr / student.lr, and the message should name those
    for f in sorted(dataclasses.fields(schema), key=lambda f: f.name not in ("model", "teacher", "student")):
        path = f"{prefix}{f.name}"
        value = node[f.name]  # a MISSING value raises MissingMandatoryValue here
        kind = unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            _check(value, kind, f"{path}.", given.get(f.name))
        elif typing.get_origin(kind) in (dict, Dict) and value is not None:
            item = unwrap(typing.get_args(kind)[1])
            if dataclasses.is_dataclass(item):
                for name, child in value.items():
                    _check(child, item, f"{path}.{name}.", (given.get(f.name) or {}).get(name))
        elif isinstance(value, ListConfig):
            items = given.get(f.name) if isinstance(given.get(f.name), list) else list(value)
            for i, (item, shown) in enumerate(zip(value, items)):
                _check_value(f"{path}[{i}]", item, f.metadata.get("each", {}), shown)
        else:
            _check_value(path, value, f.metadata, given.get(f.name, value))


def _check_value(path: str, value: Any, checks: Any, given: Any) -> None:
    if value is None:
        return
    shown = show(given)
    if "pattern" in checks:
        if not re.fullmatch(checks["pattern"], str(value)):
            raise UserError(f"{path}={shown} is not valid; use {either(checks['choices'])}")
    elif "choices" in checks and not any(value == c and type(value) is type(c) for c in checks["choices"]):
        raise UserError(f"{path}={shown} is not valid; use {either(checks['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value:
            raise UserError(f"{path}={shown} is not a number")
        for op, fails, text in (("gt", lambda lim: value <= lim, ">"), ("ge", lambda lim: value < lim, ">="),
                                ("le", lambda lim: value > lim, "<="), ("lt", lambda lim: value >= lim, "<")):
            if op in checks and fails(checks[op]):
                raise UserError(f"{path}={shown} must be {text} {show(checks[op])}")


# ---- the config store -----------------------------------------------------------------------------
def model_nodes(arch: str) -> dict[str, Any]:
    """The ``model``, ``student`` and ``teacher`` config nodes of one registered architecture."""
    lr = float(model_metadata(arch)["lr"])
    return {
        "model": ModelConfig(name=arch, lr=lr),
        "student": ModelConfig(name=arch, lr=lr),
        # train_teacher.py model=<arch> writes the default checkpoint
        "teacher": TeacherConfig(name=arch, lr=lr, ckpt=f"${{teacher_dir}}/{arch}.pt",
                                 published_top1=PUBLISHED_TEACHER_TOP1.get(arch), verify=True),
    }


def external_nodes(source: str) -> dict[str, Any]:
    """The ``model``, ``student`` and ``teacher`` nodes of a network source (``teacher=torchvision``).

    ``name`` is the library's model name (module: the import path); ``lr`` is the zoo's default; the
    teacher's checkpoint is where ``train_teacher.py model=<source> model.name=<name>`` stores it.
    """
    common = dict(source=source, name="${._target_}" if source == "module" else MISSING,
                  lr=float(MODEL_METADATA_DEFAULTS["lr"]), _target_=MISSING if source == "module" else None)
    return {
        "model": ExternalModelConfig(**common),
        "student": ExternalModelConfig(**common),
        "teacher": ExternalTeacherConfig(**common, ckpt="${teacher_dir}/${.source}-${.name}.pt", published_top1=None,
                                         verify=True),
    }


def register_configs(store: ConfigStore | None = None) -> None:
    """Fill Hydra's ConfigStore: the job schemas, and one model/teacher/student node per architecture
    and per network source (torchvision, timm, module).

    Each architecture is also stored under its lower-case spelling and its aliases (``model=mobilenetv2``).
    """
    store = store or ConfigStore.instance()
    for job, schema in SCHEMAS.items():
        store.store(group="schema", name=job, node=schema)
    for arch in list_models():
        spellings = dict.fromkeys([arch, arch.lower(), *MODELS.aliases(arch)])
        for group, node in model_nodes(arch).items():
            for spelling in spellings:
                store.store(group=group, name=spelling, node=node)
    for source in SOURCES.names():
        for group, node in external_nodes(source).items():
            store.store(group=group, name=source, node=node)


def group_options(group: str) -> list[str]:
    """Names a config group offers from the ConfigStore (canonical architecture names for the model groups)."""
    if group in ("model", "teacher", "student"):
        return list_models() + SOURCES.names()
    entries = ConfigStore.instance().repo.get(group, {})
    return sorted(name.removesuffix(".yaml") for name in entries if isinstance(name, str) and name.endswith(".yaml"))


register_configs()
