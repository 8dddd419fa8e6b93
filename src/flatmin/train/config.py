"""The configuration of one training run: every knob, its default and its check.

A run is described by a ``TrainConfig``; the command line and YAML files only fill it in. Method
hyperparameters left at ``None`` take the method's default from ``METHOD_DEFAULTS`` (chosen on a
validation split of the bundled data sets, see docs/results.md).
"""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from ..losses.nrs import DIVERGENCES, NEIGHBOURS
from ..optim import METHODS
from ..optim.base import check_range

# Method hyperparameters used when the run does not set them. ``sigma_inc`` is the CosineInc
# growth of σ over the run (docs/algorithms.md, "σ schedule"): 0 keeps σ constant.
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sgd": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "rwp": {"sigma": 0.01, "sigma_inc": 0.0},
    "arwp": {"sigma": 0.001, "sigma_inc": 10.0, "eta": 0.1, "beta": 0.99},
    "m-rwp": {"sigma": 0.015, "sigma_inc": 0.0, "lam": 0.5},
    "m-arwp": {"sigma": 0.015, "sigma_inc": 0.0, "lam": 0.5, "eta": 0.1, "beta": 0.99},
    "nrs": {"alpha": 1.0, "sigma": 0.01, "neighbour": "random", "divergence": "kl"},
}
# Per data set, the values chosen on a validation split of its training set (never the test set);
# they replace METHOD_DEFAULTS for that data set. Each data set's values come from the sweep
# (docs/sweep.md, "The grid behind the recipes"):
#   flatmin sweep --data DATA --budget epochs --epochs 60 --seeds S --methods sgd,sam,rwp,arwp,m-rwp,m-arwp,nrs
#                 --space benchmarks/tune-space.yaml --tie 0.002 --jobs 2
# with S = 4 for digits and 2 for mnist1d (run then as benchmarks/tune_defaults.py, the same grid and
# rule). The numbers are in docs/results.md. CIFAR and ImageNet use the papers' values above.
DATA_RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "digits": {
        "sam": {"rho": 0.01},
        "rwp": {"sigma": 0.02},
        "arwp": {"sigma": 0.0005},
        "m-rwp": {"sigma": 0.01},
        "m-arwp": {"sigma": 0.01},
        "nrs": {"alpha": 0.5, "sigma": 0.05},
    },
    "mnist1d": {
        "sam": {"rho": 0.1},
        "rwp": {"sigma": 0.02},
        "arwp": {"sigma": 0.002},
        "m-rwp": {"sigma": 0.02},
        "m-arwp": {"sigma": 0.02},
        "nrs": {"alpha": 2.0, "sigma": 0.01},
    },
}
# Every method the trainer knows: the optimizers of flatmin.create, and NRS (a loss with plain SGD).
TRAIN_METHODS = (*METHODS, "nrs")
# What a run shares with plain SGD trained for ``epochs`` (docs/algorithms.md, "Comparison protocol").
BUDGETS = ("epochs", "updates", "gradients")
METHOD_HPARAMS = ("sigma", "sigma_inc", "lam", "eta", "beta", "rho", "alpha", "neighbour", "divergence")
PROGRESS_MODES = ("auto", "bar", "log", "none")
# The allowed interval of each numeric hyperparameter, (low, high, high_open), as the methods check it.
HPARAM_RANGES = {"sigma": (0.0, math.inf, True), "sigma_inc": (0.0, math.inf, True), "lam": (0.0, 1.0, False),
                 "eta": (0.0, math.inf, True), "beta": (0.0, 1.0, True), "rho": (0.0, math.inf, True),
                 "alpha": (0.0, math.inf, True)}
# The only settings a resumed run may change: where and how it runs, and how long. A sharded (fsdp)
# run writes the checkpoint of an unsharded one, so either resumes as the other.
RESUMABLE_CHANGES = ("epochs", "device", "out", "progress", "threads", "num_workers", "data_dir", "eval_batch_size",
                     "flatness", "stop_after", "log", "fsdp", "overwrite")
# Settings of one invocation, not of the run: a resumed run does not inherit them from its checkpoint
# (a run stopped with --stop-after continues to the end of its schedule unless it is given again).
NOT_INHERITED = ("stop_after", "overwrite")
# Settings whose default changed, with the value a checkpoint written before they existed was
# trained with: flatmin 0.2.0 and earlier cropped image folders to 224 px with ImageNet's statistics.
LEGACY_DEFAULTS = {"imagefolder": {"image_size": 224, "normalize": "imagenet"}}


def own_hparams(cfg: "TrainConfig", method: str) -> Dict[str, Any]:
    """The method hyperparameters of ``cfg`` that ``method`` has; the others ``None``. A setting
    shared by several methods (``--sigma`` in a comparison) applies to the methods that have it."""
    return {name: getattr(cfg, name) if name in METHOD_DEFAULTS[method] else None for name in METHOD_HPARAMS}


class ConfigError(ValueError):
    """A bad configuration value; its message names the value and what is allowed."""


@dataclass
class TrainConfig:
    data: str = field(default="digits", metadata={"help": "data set: digits, mnist1d, cifar10, cifar100, imagefolder"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "folder holding the data files (CIFAR, imagefolder) or the cache"})
    model: str = field(default="mlp", metadata={"help": "model: mlp, cnn, resnet18, vgg16bn, wrn28-10, wrn16-8, resnet18-imagenet, resnet50-imagenet"})
    method: str = field(default="arwp", metadata={"help": "method: " + ", ".join(TRAIN_METHODS)})
    base: str = field(default="sgd", metadata={"help": "base optimizer: sgd, adamw, adam"})
    epochs: int = field(default=60, metadata={"help": "epochs of data (the mixed methods make half as many updates per epoch)"})
    budget: str = field(default="epochs", metadata={"help": "what the run shares with SGD trained for --epochs: epochs "
                                                            "(the same epochs of data), updates (as many updates: "
                                                            "the mixed methods run about twice the epochs) or gradients "
                                                            "(as many gradient evaluations: two-gradient methods make "
                                                            "half the updates)"})
    batch_size: int = field(default=64, metadata={"help": "mini-batch size"})
    eval_batch_size: int = field(default=1024, metadata={"help": "batch size for evaluation"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate (cosine decay per update)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay of the base optimizer"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear learning-rate warm-up, in epochs of --epochs (under any budget the same fraction of the run)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    clip: Optional[float] = field(default=None, metadata={"help": "clip the update's gradient to this 2-norm"})
    sigma: Optional[float] = field(default=None, metadata={"help": "RWP-family noise radius σ (method default if unset)"})
    sigma_inc: Optional[float] = field(default=None, metadata={"help": "CosineInc growth of σ: final σ = (1+inc)·σ"})
    lam: Optional[float] = field(default=None, metadata={"help": "m-(A)RWP weight λ of the perturbed term"})
    eta: Optional[float] = field(default=None, metadata={"help": "ARWP η"})
    beta: Optional[float] = field(default=None, metadata={"help": "ARWP β"})
    rho: Optional[float] = field(default=None, metadata={"help": "SAM/ASAM radius ρ"})
    alpha: Optional[float] = field(default=None, metadata={"help": "NRS weight α of the divergence term"})
    neighbour: Optional[str] = field(default=None, metadata={"help": "NRS neighbour: " + ", ".join(NEIGHBOURS)})
    divergence: Optional[str] = field(default=None, metadata={"help": "NRS divergence: " + ", ".join(DIVERGENCES)})
    parallel: bool = field(default=False, metadata={"help": "m-rwp/m-arwp under torchrun: clean and perturbed terms on different workers at once (an even number of workers)"})
    fsdp: bool = field(default=False, metadata={"help": "shard the model with FSDP2 (fully_shard per block, then "
                                                        "the root) over the torchrun workers, or in one process"})
    same_batch: bool = field(default=False, metadata={"help": "mixed methods: use one batch for both terms instead of two"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order, augmentation and noise"})
    val_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of TRAIN as a validation split"})
    cutout: int = field(default=0, metadata={"help": "CIFAR Cutout square size (0: off)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "imagefolder: side of the square crops the model sees (default: the training images' median short side, at most 224; smaller images are enlarged only when this asks for more)"})
    normalize: Optional[str] = field(default=None, metadata={"help": "imagefolder: per-channel normalisation, data (mean and std of a fixed sample of up to 512 training images) or imagenet (ImageNet's) (default: data)"})
    num_workers: int = field(default=0, metadata={"help": "data-loading workers (imagefolder)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    amp: Optional[str] = field(default=None, metadata={"help": "mixed precision: bf16 or fp16"})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch; None: torch's default, one per core. The numbers of a CPU run depend on it"})
    stop_after: Optional[int] = field(default=None, metadata={"help": "stop once this many epochs of the schedule are done (checkpointed); continue later with --resume"})
    flatness: int = field(default=0, metadata={"help": "batches of training data for the Hessian's top eigenvalue and trace in the summary (0: skip)"})
    log: Optional[str] = field(default=None, metadata={"help": "also log to: tensorboard (event files in the output folder; needs flatmin[tensorboard])"})
    out: str = field(default="runs/train", metadata={"help": "output folder: metrics.jsonl, summary.json, checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in the output folder (without it, a folder holding a checkpoint.pt or summary.json is refused; compare: every run folder under --out)"})
    progress: str = field(default="auto", metadata={"help": "auto (bar on a terminal, log lines otherwise), bar, log, none"})

    def hparams(self) -> Dict[str, Any]:
        """The method's hyperparameters: the method's defaults, the data set's recipe, then what was set."""
        values = {**METHOD_DEFAULTS[self.method], **DATA_RECIPES.get(self.data, {}).get(self.method, {})}
        for name in METHOD_HPARAMS:
            given = getattr(self, name)
            if given is not None:
                values[name] = given
        return values

    def validate(self) -> "TrainConfig":
        from ..data import DATASETS
        from ..models import MODELS

        self.check_types()
        choice("data", self.data, DATASETS)
        choice("model", self.model, MODELS)
        choice("method", self.method, TRAIN_METHODS)
        choice("base", self.base, ("sgd", "adamw", "adam"))
        choice("progress", self.progress, PROGRESS_MODES)
        choice("budget", self.budget, BUDGETS)
        if self.amp is not None:
            choice("amp", self.amp, ("bf16", "fp16"))
        if self.log is not None:
            choice("log", self.log, ("tensorboard",))
        for name in ("epochs", "batch_size", "eval_batch_size"):
            positive_int(name, getattr(self, name))
        if self.threads is not None:
            positive_int("threads", self.threads)
        if self.stop_after is not None:
            positive_int("stop_after", self.stop_after)
        if self.parallel and self.method not in ("m-rwp", "m-arwp"):
            raise ConfigError(f"--parallel is for the mixed methods m-rwp and m-arwp, not {self.method!r} "
                              "(every other method runs data-parallel under torchrun without it)")
        if self.fsdp and self.parallel:
            raise ConfigError("--fsdp does not combine with --parallel: parallel m-(A)RWP keeps whole weights on "
                              "every worker; drop one of them (m-rwp/m-arwp also run sharded without --parallel)")
        if self.fsdp and self.method == "nrs" and self.amp == "fp16":
            raise ConfigError("--amp fp16 does not combine with --fsdp for method 'nrs' (it backpropagates a "
                              "sharded model itself, without the loss scaler): use --amp bf16")
        if self.flatness < 0:
            raise ConfigError(f"flatness={self.flatness} is not allowed: it must be >= 0 (batches)")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} is not allowed: it must be >= 0")
        if self.cutout < 0:
            raise ConfigError(f"cutout={self.cutout} is not allowed: it must be >= 0")
        if self.image_size is not None:
            positive_int("image_size", self.image_size)
        if self.normalize is not None:
            choice("normalize", self.normalize, ("data", "imagenet"))
        for name in ("image_size", "normalize"):
            if getattr(self, name) is not None and self.data != "imagefolder":
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed for {self.data}: it applies to "
                                  f"imagefolder only")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed} is not allowed: it must be an integer in [0, 2**63)")
        check_range("lr", self.lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf, high_open=True)
        check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        if self.clip is not None:
            check_range("clip", self.clip, 0.0, math.inf, low_open=True, high_open=True)
        allowed = set(METHOD_DEFAULTS[self.method])
        for name in METHOD_HPARAMS:
            if getattr(self, name) is not None and name not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} does not apply to method {self.method!r} "
                    f"(its hyperparameters: {', '.join(sorted(allowed)) or 'none'})"
                )
        hp = self.hparams()
        for name, (low, high, high_open) in HPARAM_RANGES.items():
            if name in hp:
                check_range(name, hp[name], low, high, high_open=high_open)
        if "neighbour" in hp:
            choice("neighbour", hp["neighbour"], NEIGHBOURS)
            choice("divergence", hp["divergence"], DIVERGENCES)
            if self.fsdp and hp["neighbour"] != "random":
                raise ConfigError(f"neighbour={hp['neighbour']!r} does not combine with --fsdp: a sharded model "
                                  "takes NRS's random neighbour only")
        check_device(self.device)
        return self

    def check_types(self) -> None:
        """Every setting of the type its field declares (a YAML file can hold anything)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in allowed:
                continue
            if bool in allowed:
                ok, kind = isinstance(value, bool), "true or false"
            elif int in allowed:
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif float in allowed:
                ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            else:
                ok, kind = isinstance(value, str), "text"
            if not ok:
                raise ConfigError(f"{f.name}={value!r} is not allowed: it must be {kind}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "config") -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: the settings must be a mapping of names to values, "
                              f"not {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"{where}: unknown setting {key!r}; known settings: {', '.join(sorted(names))}")
            clean[name] = value
        return cls(**clean)


def with_legacy_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The settings of a checkpoint's config, completed with ``LEGACY_DEFAULTS`` for the settings it
    predates, so that it is resumed and analysed as it was trained."""
    legacy = LEGACY_DEFAULTS.get(saved.get("data"), {})
    return {**{k: v for k, v in legacy.items() if k not in saved}, **saved}


def load_yaml(path: str) -> Dict[str, Any]:
    """The settings of a YAML run file (a mapping of setting names to values)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def choice(name: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, allowed))}")


def check_device(device: Any) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``: the devices flatmin trains and analyses on."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is not allowed: use cpu, cuda or cuda:N")


def output_folder(path: Union[str, Path], name: str = "out") -> Path:
    """``path`` as a folder that exists and takes new files (created if need be); a ``ConfigError``
    naming it otherwise. Checked before any work, so a bad folder costs nothing already computed."""
    if not str(path):
        raise ConfigError(f"{name}='' is not allowed: give the folder the results go to")
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"{name}={str(path)!r} is not a folder flatmin can write to: {err.strerror or err}") from None
    return folder


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed: it must be an integer >= 1")

