"""The config schema of the two jobs: every key declared once, with its type, range and default.

Every key of ``train_teacher`` and ``train_student`` is declared here once, with its type and its
range or valid values (:func:`key`); :func:`distiller.config.validation.load_job` checks a composed
config against it (one :class:`UserError` naming the key) and converts it, once, into these
dataclasses, which every part of a job reads. Defaults: the YAML files under ``configs/`` set the
values of their groups; the objective keys of a method (``gamma`` ... ``warmup_epochs``) default
here, so a method's YAML states only what differs (its ``defaults`` list pulls :func:`objective_defaults`
in); the few keys no YAML sets default here too. A method's own keyword arguments (``distill.nce_k``,
...) and an outside network's constructor arguments stay untyped (``extra``): the method's
constructor or the network's defines and checks them.

The converted nodes read like mappings too (:class:`ConfigNode`), so the layers below the
configuration (data sets, models) take them as they take a plain dict, without knowing the schema.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List

from omegaconf import MISSING

from distiller.engine.run_log import BACKENDS
from distiller.engine.teacher_cache import DTYPES as CACHE_DTYPES
from distiller.optim import OPTIMIZERS
from models.external import SOURCES

# Test top-1 of the widely shared pretrained CIFAR-100 teachers (RepDistiller / CRD, RECIPES.md).
PUBLISHED_TEACHER_TOP1: dict[str, float] = {
    "wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "vgg13": 74.64,
    "ResNet50": 79.34,
}
# Top-1 on ImageNet's 50,000-image val split of torchvision's IMAGENET1K_V1 weights (torchvision's model docs),
# by the name the network goes by (models.external.network_label): the ImageNet tables' teachers and R18 baseline.
PUBLISHED_IMAGENET_TOP1: dict[str, float] = {
    "torchvision-resnet18": 69.758, "torchvision-resnet34": 73.314, "torchvision-resnet50": 76.130,
}


def key(default: Any = MISSING, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
        lt: float | None = None, choices: tuple | None = None, pattern: str | None = None, each: dict | None = None,
        extra_keys: bool = False, path: bool = False) -> Any:
    """A schema field: ``MISSING`` (the YAML sets it) or a default, plus its range or valid values.

    ``pattern`` is a regular expression the value must match in full (``choices`` then only names
    the valid values in messages); ``each`` holds the same checks for every item of a list;
    ``extra_keys`` lets a typed mapping carry further, untyped keys; ``path``: a file or folder, a
    leading ``~`` read as the home folder.
    """
    checks = {"gt": gt, "ge": ge, "le": le, "lt": lt, "choices": choices, "pattern": pattern, "each": each,
              "extra_keys": extra_keys, "path": path}
    checks = {k: v for k, v in checks.items() if v is not None and v is not False}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=checks)
    return field(default=default, metadata=checks)


class ConfigNode(Mapping):
    """A converted config node: a dataclass whose fields also read as a mapping, in declaration order.

    A node that takes untyped keys (a method's own parameters, an outside network's constructor
    arguments) holds them in its ``extra`` field; the mapping reads them after the other fields, where
    the composed node had them.
    """

    def _items(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != EXTRA}
        return {**fields, **getattr(self, EXTRA, {})}

    def __getitem__(self, name: str) -> Any:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


EXTRA = "extra"  # the field of a node's untyped keys (filled when the config is checked, never composed)


# ---- the schema -----------------------------------------------------------------------------------
@dataclass
class ModelConfig(ConfigNode):
    name: str = key()  # reference name in models.MODELS
    lr: float = key(gt=0)  # SGD learning rate when this architecture is the trained network


@dataclass
class TeacherConfig(ModelConfig):
    ckpt: str = key(path=True)  # the teacher's weights
    published_top1: float | None = key(ge=0, le=100)  # CIFAR-100 test top-1 of the widely shared pretrained teacher
    verify: bool = key()  # check the file against the teacher index (distiller/jobs/teachers.py) before use
    # the exact teacher-output cache (distiller/jobs/run_cache.py): logits of every crop and flip, computed once
    cache: bool = key(False)  # true: methods that read only the teacher's logits take them from the cache
    cache_dir: str | None = key(None)  # where the cache lives; null: beside the teacher file
    cache_dtype: str = key("fp32", choices=tuple(CACHE_DTYPES))  # stored logits: fp32 exact; fp16/bf16 rounded


# the config nodes that each name a network (a zoo name, or torchvision/timm/module)
NETWORK_GROUPS = ("model", "teacher", "student")
# a network node's keys of an earlier release -> their names now: named in the unknown-key message, read in
# recorded configs (current_names)
RENAMED = {"taps": "features"}  # an outside network's features by module path


def current_names(node: Mapping[str, Any]) -> dict[str, Any]:
    """A network node as recorded by an earlier release, with its keys under their names now."""
    return {RENAMED.get(k, k): v for k, v in node.items()}


@dataclass
class FeaturesConfig(ConfigNode):
    """Where an external network's features are, by module path (``path``; ``path@in``: its input).

    Read by :meth:`models.features.FeatureDeclaration.merged`.
    """

    stem: str | None = key(None)
    stages: List[str] | None = key(None)  # in forward order, reductions non-decreasing
    embedding: str | None = key(None)  # the pooled [B, D] vector, e.g. fc@in
    preact: Any = key(None)  # per stage, the map before its final activation; or "same" (stages end without one)
    bn: List[Any] | None = key(None)  # per stage, the BatchNorm producing the pre-activation map (OFD)
    reductions: List[int] | None = key(None)  # input size / stage map size, checked against the measured ones
    pool_input: str | None = key(None)  # the map the global pool averages into the embedding (SDD, CAT-KD)


@dataclass
class ExternalKeys(ConfigNode):
    """The keys of a network from outside the zoo (``model=torchvision|timm|module``: models/external.py).

    Further keys are the network constructor's keyword arguments (``+model.width=2``).
    """

    source: str = key(choices=tuple(SOURCES.names()))  # models.external.SOURCES
    cifar_stem: bool = key(False)  # first conv 3x3 stride 1, no max-pool before the first stage (32 px inputs)
    weights: str | None = key(None, path=True)  # the library's weights file, loaded before training (never downloaded)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # over the features inferred for the family
    _target_: str | None = key(None)  # module: import path of the network's class or builder
    extra: Dict[str, Any] = key({})  # the constructor's keyword arguments (+model.width=2)


@dataclass
class ExternalModelConfig(ExternalKeys, ModelConfig):
    pass


@dataclass
class ExternalTeacherConfig(ExternalKeys, TeacherConfig):
    pass


@dataclass
class DatasetConfig(ConfigNode):
    name: str = key()  # registry key in datasets.DATASETS
    root: str = key(path=True)
    batch_size: int = key(gt=0)
    eval_batch_size: int = key(gt=0)
    num_classes: int | None = key(None, gt=0)  # must match the data; null: the data set's own count
    mean: List[float] | None = key(None)  # per-channel normalisation (pixels in [0, 1]); null: the data set's
    std: List[float] | None = key(None, each={"gt": 0})
    # keys of some data sets only, each declared where those register (options=...: datasets/); set (not
    # null) for another data set, such a key is refused (config/validation.py)
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
class OptimConfig(ConfigNode):
    name: str = key(choices=tuple(OPTIMIZERS.names()))  # distiller.optim.OPTIMIZERS
    lr: float = key(gt=0)
    momentum: float = key(ge=0, lt=1)  # 1 or more: the momentum buffer never forgets and the run diverges
    weight_decay: float = key(ge=0)
    nesterov: bool = key()
    implementation: str = key(choices=("auto", "fused", "foreach", "loop"))
    scale_lr_with_batch: bool = key()
    # keys of one optimizer only, declared where it registers (options=...: distiller/optim.py); null elsewhere
    delta: float | None = key(None, ge=0)  # dot: task momentum - delta, distillation momentum + delta


@dataclass
class ScheduleConfig(ConfigNode):
    name: str = key(choices=("step",))
    milestones: List[int] = key(each={"ge": 0})  # the lr drops after these epochs (0: from the first)
    gamma: float = key(gt=0)


@dataclass
class TrainerConfig(ConfigNode):
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
class DistillConfig(ConfigNode):
    """The objective's keys of one method (their defaults: what a method's YAML need not state); the
    method's own keyword arguments ride along untyped in ``extra``."""

    name: str = key()  # label in run directories and result tables
    method: str = key()  # registry key of the DistillMethod class
    gamma: float = key(1.0, ge=0)  # weight of cross-entropy
    alpha: float = key(0.0, ge=0)  # weight of KD on logits
    beta: float = key(0.0, ge=0)  # weight of the method's own terms
    temperature: float = key(4.0, gt=0)  # KD temperature
    warmup_epochs: int = key(0, ge=0)  # beta ramps linearly min(epoch / warmup, 1) over this many epochs
    logit_standardize: bool | None = key(None)  # LS: standardise logits before KD and logit methods (absent: false)
    extra: Dict[str, Any] = key({})  # the method's own keyword arguments (distill.nce_k, ...)


OBJECTIVE_DEFAULTS = ("gamma", "alpha", "beta", "temperature", "warmup_epochs")
OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(DistillConfig))  # a method's own keys must differ


def objective_defaults() -> dict[str, Any]:
    """The base every ``configs/distill/<name>.yaml`` pulls in (``defaults: [_objective, _self_]``): name and
    method to be set, then the objective keys at their schema defaults, in this order."""
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    return {"name": MISSING, "method": MISSING, **{k: fields[k].default for k in OBJECTIVE_DEFAULTS}}


@dataclass
class LoggerConfig(ConfigNode):
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


@dataclass
class JobConfig(ConfigNode):
    seed: int = key(ge=0)
    teacher_dir: str = key(path=True)  # where finished teachers are stored and teacher=<arch> looks
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
