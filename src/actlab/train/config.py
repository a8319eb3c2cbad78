"""Training configuration: one flat dataclass, read from YAML and command-line overrides, validated."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..data.transforms import CROPS, ERASE_MODES, check_auto_augment
from .precision import AMP_CHOICES


@dataclass
class TrainConfig:
    """Everything a run depends on; stored resolved in the run folder and in every checkpoint."""

    model: str = "resnet20"
    act: str = "relu"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    epochs: int = 10
    batch_size: int = 128          # per process; DDP's global batch is batch_size * world size
    optimizer: str = "sgd"         # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True          # SGD only
    weight_decay: float = 5e-4
    weight_decay_rule: str = "actlab"  # actlab: never on norms, biases or activation parameters; timm: on every
                                       # parameter not 1-D (published shapes) or a bias; all: on everything
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0         # the warmup starts here (0: from lr / warmup steps)
    min_lr: float = 0.0
    cooldown_epochs: float = 0.0   # the last epochs at min_lr, after the cosine
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    dpa_lambda: float = 1.0        # weight of DPA's channel loss (1 for CIFAR-10, 5 for CIFAR-100)
    amp: str = "auto"              # auto | bf16 | fp16 | off (auto: bf16 on CUDA where supported, else fp16; off on CPU)
    compile: bool = False          # torch.compile the model for training and evaluation
    cuda_graphs: bool = False      # compile with CUDA graphs (torch.compile mode "reduce-overhead"); implies compile
    channels_last: bool = False    # NHWC memory format for model and images
    seed: int = 0
    workers: int | None = None     # data loader processes; None: min(8, CPUs per process) on CUDA, 0 on CPU
    device: str = "auto"           # auto | cpu | cuda
    augment: bool = True           # the dataset's standard augmentation (CIFAR: pad-and-crop, flip)
    crop: str | None = None        # pad | rrc | none (default: the dataset's)
    crop_scale: float = 0.08       # smallest area fraction of rrc
    auto_augment: str | None = None  # timm string, e.g. rand-m9-mstd0.5-inc1
    randaugment: int | None = None   # shorthand: timm RandAugment of this magnitude (0-10 scale), 2 ops
    color_jitter: float = 0.0
    random_erasing: float = 0.0    # probability
    random_erasing_mode: str = "pixel"  # const | rand | pixel
    random_erasing_count: int = 1
    interpolation: str = "bilinear"     # of the training crops (bilinear | bicubic | random)
    eval_crop_pct: float | None = None  # test view: resize to size / crop_pct, center crop (default: the dataset's)
    eval_interpolation: str = "bilinear"
    mean: list | None = None       # normalisation (default: the dataset's)
    std: list | None = None
    drop_path: float | None = None
    width: float | None = None     # mobilenet_v2 width multiplier
    dropout: float | None = None   # mobilenet_v2: before the classifier (torchvision 0.2; the IIEU paper's 0)
    sync_bn: bool = False
    act_kwargs: dict = field(default_factory=dict)
    out: str = "runs/run"
    log_every: int = 20

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping, rejecting unknown keys and values of the wrong type."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("amp"), bool):  # amp: true / false, as older configs wrote it
            values["amp"] = "auto" if values["amp"] else "off"
        for key, value in values.items():
            if isinstance(value, str) and _kinds(known[key]) - {str}:
                values[key] = coerce(key, value)  # YAML scalars PyYAML left as text (1e-3, "no") as flags are
            elif isinstance(value, int) and not isinstance(value, bool) and float in _kinds(known[key]):
                values[key] = float(value)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """ValueError naming the first setting that is unknown or out of range."""
        from ..data import list_datasets
        from ..activations import get_spec
        from ..models import get_model_spec, model_acts, site_activation

        self._check_types()
        get_model_spec(self.model)
        if self.act not in model_acts():
            raise ValueError(f"unknown act {self.act!r}; choose from {model_acts()}")
        if self.dataset not in list_datasets():
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {list_datasets()}")
        for ok, message in self._optimization_checks() + self._data_checks() + self._model_and_run_checks():
            if not ok:
                raise ValueError(f"bad config: {message}")
        self._check_architecture_options(get_model_spec(self.model))
        get_spec(site_activation(self.act)).check_kwargs(self.act_kwargs)
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment)

    def _optimization_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the schedule, optimizer and loss settings."""
        return [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be within [0, epochs]"),
            (0 <= self.cooldown_epochs and self.warmup_epochs + self.cooldown_epochs <= self.epochs,
             "warmup_epochs + cooldown_epochs must be within [0, epochs]"),
            (0 <= self.warmup_lr <= self.lr, "warmup_lr must be within [0, lr]"),
            (self.weight_decay_rule in WEIGHT_DECAY_RULES,
             f"weight_decay_rule must be one of {WEIGHT_DECAY_RULES}, got {self.weight_decay_rule!r}"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 (or null for none)"),
            (self.dpa_lambda >= 0, "dpa_lambda must be >= 0"),
            (0 <= self.min_lr <= self.lr, "min_lr must be within [0, lr]"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
        ]

    def _data_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the data and augmentation settings."""
        return [
            (self.random_erasing_count >= 1, "random_erasing_count must be >= 1"),
            (self.eval_interpolation in ("bilinear", "bicubic"),
             f"eval_interpolation must be bilinear or bicubic, got {self.eval_interpolation!r}"),
            ((self.mean is None) == (self.std is None), "set mean and std together"),
            (self.mean is None or (len(self.mean) == len(self.std) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.mean + self.std)
                and all(v > 0 for v in self.std)), "mean and std must be lists of numbers of one length, std > 0"),
            (0 <= self.random_erasing <= 1, "random_erasing must be a probability"),
            (self.image_size is None or self.image_size >= 1, "image_size must be >= 1 (or null for the dataset's)"),
            (self.randaugment is None or self.randaugment >= 0, "randaugment must be >= 0 (or null for none)"),
            (self.randaugment is None or self.auto_augment is None,
             "set auto_augment or its shorthand randaugment, not both"),
            (self.crop is None or self.crop in CROPS, f"crop must be one of {CROPS} (or null), got {self.crop!r}"),
            (0 < self.crop_scale <= 1, "crop_scale must be in (0, 1]"),
            (self.random_erasing_mode in ERASE_MODES,
             f"random_erasing_mode must be one of {ERASE_MODES}, got {self.random_erasing_mode!r}"),
            (self.color_jitter >= 0, "color_jitter must be >= 0"),
            (self.interpolation in ("bilinear", "bicubic", "random"),
             f"interpolation must be bilinear, bicubic or random, got {self.interpolation!r}"),
            (self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, "eval_crop_pct must be in (0, 1] (or null)"),
        ]

    def _model_and_run_checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the architecture options and where and how the run goes."""
        return [
            (self.drop_path is None or 0 <= self.drop_path < 1, "drop_path must be in [0, 1) (or null)"),
            (self.width is None or self.width > 0, "width must be > 0 (or null)"),
            (self.dropout is None or 0 <= self.dropout < 1, "dropout must be in [0, 1) (or null)"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
            (self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got {self.amp!r}"),
            (self.workers is None or self.workers >= 0, "workers must be >= 0 (or null for the default)"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]

    def architecture_options(self) -> dict:
        """The architecture keywords this config sets (``create_model`` ``**kw``)."""
        return {arch: getattr(self, key) for key, arch in ARCHITECTURE_OPTIONS.items() if getattr(self, key) is not None}

    def _check_architecture_options(self, spec) -> None:
        from ..models import get_model_spec, list_models

        if spec.options is None:
            return
        for key, arch in ARCHITECTURE_OPTIONS.items():
            if getattr(self, key) is not None and arch not in spec.options:
                takers = [m for m in list_models() if arch in (get_model_spec(m).options or ())]
                raise ValueError(f"bad config: {self.model} has no {key} setting (models that take it: "
                                 f"{', '.join(takers)}, and timm:/torchvision: models that have {arch}=)")

    def augment_options(self) -> dict:
        """The fields of ``actlab.data.Augment`` this config sets over the dataset's standard augmentation."""
        options = {"scale": (self.crop_scale, 1.0), "color_jitter": self.color_jitter, "reprob": self.random_erasing,
                   "remode": self.random_erasing_mode, "recount": self.random_erasing_count,
                   "interpolation": self.interpolation}
        if self.crop is not None:
            options["crop"] = self.crop
        if self.auto_augment is not None or self.randaugment is not None:
            options["auto_augment"] = self.auto_augment or f"rand-m{self.randaugment}-n2"
        return options

    def view_options(self) -> dict:
        """The test view and normalisation this config sets (``actlab.data.build_datasets`` keywords)."""
        return {"eval_crop_pct": self.eval_crop_pct, "eval_interpolation": self.eval_interpolation,
                "mean": self.mean, "std": self.std}

    def _check_types(self) -> None:
        """Every field holds its declared type (bools are not numbers here) and every float is finite."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _kinds(f)
            if value is None:
                if type(None) not in kinds:
                    raise ValueError(f"bad config: {f.name} must not be null")
                continue
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = (isinstance(value, bool) if bool in kinds else False) or \
                (isinstance(value, str) and str in kinds) or (isinstance(value, dict) and dict in kinds) or \
                (isinstance(value, list) and list in kinds) or \
                (numeric and float in kinds) or (numeric and isinstance(value, int) and int in kinds)
            if not ok:
                wanted = " or ".join(sorted(k.__name__ for k in kinds if k is not type(None)))
                raise ValueError(f"bad config: {f.name} must be {wanted}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"bad config: {f.name} must be a finite number, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The settings that change what the run computes (``run_identity`` of this config)."""
        return run_identity(self.to_dict())


# Settings that say where and how fast a run goes, not what it computes: they are outside a run's
# identity. Two configs equal but for these are the same run: the bench grid's key, resuming a run and
# the report's grouping all ask ``run_identity``. (Loading with any number of workers gives the same
# batches: each sample's augmentation is drawn from (seed, epoch, index).)
NOT_IDENTITY = ("out", "data_dir", "download", "workers", "log_every", "device", "compile", "cuda_graphs")


def run_identity(values: dict) -> dict:
    """A run config (as stored in config.json) without the settings outside a run's identity."""
    return {k: v for k, v in values.items() if k not in NOT_IDENTITY}


def identity_changes(stored: dict, new: dict, allow: tuple[str, ...] = ()) -> dict:
    """``{setting: (stored value, new value)}`` for every identity setting that differs (``allow``: ones
    that may differ), for messages such as "checkpoint 'adamw' vs now 'sgd'"."""
    a, b = run_identity(stored), run_identity(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in allow and a.get(k) != b.get(k)}


# config key -> the architecture keyword it sets
ARCHITECTURE_OPTIONS = {"width": "width", "drop_path": "drop_path_rate", "dropout": "dropout"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list, "None": type(None)}
WEIGHT_DECAY_RULES = ("actlab", "timm", "all")


def _kinds(f: dataclasses.Field) -> set[type]:
    """The types a field's annotation allows: ``"int | None"`` -> {int, NoneType}."""
    return {_TYPES[part.strip()] for part in str(f.type).split("|")}


# Settings that a (dataset, model family) needs to train well with every activation, for runs that leave
# them unset (``actlab train``). On digits (1,438 8x8 scans) the field defaults (lr 0.1, batch 128, no
# warmup, 32x32) left IIEU-B at 21.7 % top-1 after 3 epochs; these are the settings of the digits bench.
RECOMMENDED: dict[tuple[str, str], dict] = {
    ("digits", "cnn"): {"image_size": 16, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0.5},
    ("digits", "transformer"): {"image_size": 16, "batch_size": 32, "optimizer": "adamw", "lr": 0.005,
                                "weight_decay": 0.05, "warmup_epochs": 0.5},
}


def recommended_settings(dataset: str, model: str) -> dict:
    """The settings recommended for ``model`` on ``dataset`` (empty where there are none)."""
    from ..models import get_model_spec

    return dict(RECOMMENDED.get((dataset, get_model_spec(model).family), {}))


def with_recommended(values: dict) -> dict:
    """``values`` (config keys) over the settings recommended for their dataset and model: what
    ``actlab train`` and every point of ``actlab bench`` start from."""
    dataset, model = values.get("dataset", TrainConfig.dataset), values.get("model", TrainConfig.model)
    if isinstance(dataset, str) and isinstance(model, str):
        return {**recommended_settings(dataset, model), **values}
    return values


def coerce(key: str, text: str):
    """A command-line string for ``key`` as the field's type (``none``/``null`` for optional fields)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"unknown config key {key!r}; known keys: {sorted(fields)}")
    kind = str(fields[key].type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("dict"):
            import yaml

            value = yaml.safe_load(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        if kind.startswith("list"):  # "0.5,0.4,0.4" or "[0.5, 0.4, 0.4]"
            import yaml

            value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
            if not isinstance(value, list):
                raise ValueError(text)
            return value
    except ValueError:
        raise ValueError(f"bad value for {key}: {text!r} is not of type {kind}") from None
    return text
