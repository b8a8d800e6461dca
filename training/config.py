"""Training configuration: one dataclass tree, loaded from YAML or a packaged preset.

A config is plain data (like open_clip's model JSONs): ``TrainConfig`` holds the model section
(a :class:`training.model.ModelConfig` as a dict), the data, the episodic or supervised
regime's settings, the optimiser, the schedule, the loss weights and validation. Presets live in
``training/configs/<name>.yaml`` and only list what differs from the defaults below.

    cfg = load_config("synthetic-tiny", overrides=["optim.lr=1e-3", "model.metric=bimhm"])

Overrides are ``dotted.key=value`` strings; the value is parsed as YAML and then checked against
the field's type (``optim.lr=1e-3`` is a float, ``model.ted_layers=[0,1]`` a list), so a typo in a
key or a value of the wrong type stops with a :class:`ConfigError` that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A training config (file, preset name, override or value) is invalid; the message says why."""


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the videos come from and how they are sampled."""

    preset: Optional[str] = None  # a name in training.data.DATASET_PRESETS, checked against ROOT
    train_split: str = "train"
    val_split: str = "val"
    skip_missing: bool = False  # train without listed videos that are not on disk (else training refuses to start)
    size: Optional[int] = None  # frame size in pixels; None = the backbone's input size
    num_workers: int = 2  # DataLoader workers (0 = load in the main process)


@dataclass
class EpisodicConfig:
    """Episodic (few-shot, MA-CLIP / CLIP-FSAR) training: one episode per iteration."""

    way: int = 5
    shot: int = 1
    query: int = 5  # training queries per class
    episodes: int = 10000  # training episodes in total (iterations = episodes)
    # > 0: with a frozen image tower (model.adapter none), encode every training video this many
    # times once (each a fresh random frame per segment: temporal jitter) and run the episodes on
    # those cached features; a random view per video and episode. 0: decode every episode's videos.
    feature_views: int = 0


@dataclass
class SupervisedConfig:
    """Supervised multi-task (M2-CLIP) training on labelled base classes."""

    batch_size: int = 32  # videos per iteration (per process under DDP)
    epochs: int = 30


@dataclass
class OptimConfig:
    """Optimiser. ``lr`` is the base rate; with ``lr_reference_batch`` set the rate used is
    ``lr * global_batch / lr_reference_batch`` (M2-CLIP's ``1e-3 * batch / 256``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 5e-5
    lr_reference_batch: Optional[int] = None
    weight_decay: float = 0.0
    no_decay_bias: bool = True  # no weight decay on biases and normalisation weights (1-D tensors)
    text_adapter_lr_scale: float = 1.0  # M2-CLIP halves the text adapter's rate (0.5)
    visual_adapter_lr_scale: float = 1.0  # rate of the adapters inside the image tower (TED, MA) vs TPCM/heads
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    max_grad_norm: Optional[float] = None  # clip the global gradient norm when set


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimiser steps: linear warm-up, then constant / cosine / linear."""

    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # supervised regime: warm-up in epochs (added to warmup_steps)
    min_lr_ratio: float = 0.0  # floor of cosine / linear decay, as a fraction of the base rate


@dataclass
class LossConfig:
    """Loss weights of both regimes.

    Episodic (MA-CLIP): ``alpha * (L_S2T + L_Q2T) / 2 + (1 - alpha) * L_Q2S``; ``alpha`` None takes
    the model's ``alpha``. ``text_weight`` w (CLIP-FSAR's video-text loss weight) instead gives
    ``L_Q2S + w * (L_S2T + L_Q2T) / 2``; it is computed as ``(1 + w) * episodic_loss(alpha=w/(1+w))``.
    Supervised (M2-CLIP): ``multitask_weights`` for ``training.losses.multitask_loss`` (None = the
    released weighting ``((KL_v + KL_t)/2 + CMC)/2 + VC + MLM/10``).
    """

    alpha: Optional[float] = None
    text_weight: Optional[float] = None
    multitask_weights: Optional[Dict[str, float]] = None
    mlm_mask_prob: float = 0.15
    vc_dropout: float = 0.5


@dataclass
class ValConfig:
    """Periodic validation; the best validation accuracy is saved as ``best.pt``.

    ``mode`` "episodes": few-shot episodes on the validation split's (held-out) classes;
    "zero_shot": zero-shot classification over the validation split's classes (supervised data
    whose val split shares the training classes); "auto": episodes for the episodic regime and
    zero-shot for the supervised one.
    """

    every: int = 500  # optimiser steps between validations (0 = only at the end)
    mode: Literal["auto", "episodes", "zero_shot"] = "auto"
    episodes: int = 500
    way: int = 5
    shot: int = 1
    query: int = 5
    seed: int = 1
    # After training, fit the temperatures of best.pt's few-shot probabilities on the validation split's
    # episodes (way, query, episodes, seed as above; 1, 5 and 10 shots) and record them in it, so the
    # served probabilities say how often an answer is right (training.calibration). Episodes mode only.
    calibrate: bool = True


@dataclass
class PretrainConfig:
    """Stand-in CLIP pretraining of a tiny random backbone on synthetic image-caption pairs
    (``training.pretrain``), run before training when ``steps > 0``; needs ``model.pretrained: null``.
    The weights land in ``OUT/backbone.pt`` (reused when present with the same settings) and
    ``model.pretrained`` is set to that file."""

    steps: int = 0  # 0 = off
    batch_size: int = 96
    lr: float = 7e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    # Rebuild the weights from training/assets/<backbone>-standin-visual.pt when that file was made
    # with these settings (seconds instead of minutes; `python -m training.pretrain` remakes it).
    use_shipped: bool = True


@dataclass
class TrainConfig:
    """Everything one training run needs besides the data root and the output folder."""

    name: str = "custom"
    regime: Literal["episodic", "supervised"] = "episodic"
    model: Dict[str, Any] = field(default_factory=dict)  # training.model.ModelConfig fields
    data: DataConfig = field(default_factory=DataConfig)
    episodic: EpisodicConfig = field(default_factory=EpisodicConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    val: ValConfig = field(default_factory=ValConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    grad_accum: int = 1  # iterations (episodes or batches) per optimiser step
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # autocast on CUDA; always off on CPU
    threads: Optional[int] = None  # torch CPU threads (None = torch's default); 1 suits small CPU runs
    seed: int = 0
    log_every: int = 10  # optimiser steps between metrics.csv rows
    save_every: int = 200  # optimiser steps between last.pt saves (and always at the end)
    max_steps: Optional[int] = None  # cap on optimiser steps (None = from episodes / epochs)

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> Dict[str, Any]:
        """A plain, YAML/JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrainConfig":
        """Build and validate a config from a plain dict; unknown keys and bad values raise ConfigError."""
        cfg = _build_dataclass(cls, raw, prefix="")
        cfg.validate()
        return cfg

    def model_config(self):
        """The model section as a :class:`training.model.ModelConfig`."""
        from training.model import ModelConfig

        try:
            return ModelConfig.from_dict(dict(self.model))
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"model: {err}") from err

    def validate(self) -> None:
        """Check value ranges and cross-field rules; raise ConfigError naming the key."""
        def positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for key in ("episodic.way", "episodic.shot", "episodic.query", "episodic.episodes",
                    "supervised.batch_size", "supervised.epochs", "optim.lr", "optim.eps",
                    "val.way", "val.shot", "val.query", "val.episodes", "grad_accum", "log_every",
                    "save_every", "max_steps", "optim.lr_reference_batch", "threads"):
            positive(key, _get(self, key))
        for key in ("optim.weight_decay", "optim.text_adapter_lr_scale", "optim.visual_adapter_lr_scale",
                    "schedule.warmup_steps",
                    "schedule.warmup_epochs", "val.every", "data.num_workers", "optim.max_grad_norm",
                    "loss.text_weight", "pretrain.steps", "pretrain.warmup_steps", "pretrain.weight_decay"):
            positive(key, _get(self, key), allow_zero=True)
        if self.data.size is not None:
            positive("data.size", self.data.size)
        if self.episodic.way < 2:
            raise ConfigError(f"episodic.way must be at least 2, got {self.episodic.way}")
        if self.val.way < 2:
            raise ConfigError(f"val.way must be at least 2, got {self.val.way}")
        for key in ("loss.alpha", "schedule.min_lr_ratio", "loss.mlm_mask_prob", "loss.vc_dropout"):
            value = _get(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {value!r}")
        if self.loss.alpha is not None and self.loss.text_weight is not None:
            raise ConfigError("set loss.alpha or loss.text_weight, not both (text_weight w means alpha = w / (1 + w))")
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas!r}")
        positive("pretrain.batch_size", self.pretrain.batch_size)
        positive("pretrain.lr", self.pretrain.lr)
        if self.pretrain.steps > 0 and self.model.get("pretrained", "openai") is not None:
            raise ConfigError("pretrain.steps > 0 trains a backbone from scratch: set model.pretrained to null "
                              f"(it is {self.model.get('pretrained', 'openai')!r})")
        if self.data.train_split == self.data.val_split:
            raise ConfigError(f"data.train_split and data.val_split are both {self.data.train_split!r}")
        self.model_config()  # the model section must build a ModelConfig


# --------------------------------------------------------------------------- loading
def list_presets() -> List[str]:
    """Names of the packaged presets (``training/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(config: Union[str, Path, Mapping[str, Any], TrainConfig],
                overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a TrainConfig from a preset name, a YAML path, a dict or a TrainConfig, then apply overrides.

    ``config``: a packaged preset name (see :func:`list_presets`), a path to a YAML file, a plain
    dict in the YAML's shape, or a TrainConfig (copied). ``overrides``: ``"dotted.key=value"``
    strings applied in order (values parsed as YAML, checked against the field's type).
    """
    if isinstance(config, TrainConfig):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    elif isinstance(config, (str, Path)):
        raw = _read_yaml(_resolve_config_path(config))
    else:
        raise ConfigError(f"config must be a preset name, a YAML path or a dict, got {type(config).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return TrainConfig.from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"a.b=value"`` into ``("a.b", parsed value)``; the value is parsed as YAML."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key, value


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    """Write the config as YAML (what :func:`load_config` reads back)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _resolve_config_path(config: Union[str, Path]) -> Path:
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    names = list_presets()
    close = difflib.get_close_matches(str(config), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{str(config)!r} is neither a YAML file nor a packaged preset "
                      f"(presets: {', '.join(names)}).{hint}")


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _set_dotted(raw: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------- type checking
def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw`` (a mapping), checking keys and value types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(f"unknown config key {prefix}{key}.{hint} Valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build_dataclass(hint, value, prefix=f"{prefix}{name}.")
        elif name == "model" and cls is TrainConfig:
            kwargs[name] = _check_model_section(value)
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _check_model_section(value: Any) -> Dict[str, Any]:
    """Type-check the model section against ModelConfig's fields (the model package owns them)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"model must be a mapping of ModelConfig fields, got {value!r}")
    from training.model import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for name, item in value.items():
        if name not in hints:
            close = difflib.get_close_matches(str(name), list(hints), n=1)
            hint = f" Did you mean model.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key model.{name}.{hint} Valid keys here: {', '.join(hints)}")
        out[name] = _coerce(item, hints[name], f"model.{name}")
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to the type ``hint`` (lossless conversions only) or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off / on / no / yes as booleans
            value = {False: "off", True: "on"}[value] if ("off" if not value else "on") in args else value
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin in (list, tuple, List) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_hint = args[0] if args else Any
            items = [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Dict) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_hint, val_hint = args if args else (Any, Any)
        return {_coerce(k, key_hint, f"{key} key"): _coerce(v, val_hint, f"{key}.{k}") for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{key} must be a {hint.__name__}, got {value!r}")
    return value
