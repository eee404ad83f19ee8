"""The run's configuration: one frozen dataclass per section, presets, flags, JSON round trip.

Precedence, lowest first: dataclass defaults < preset TOML (`--config`) < command-line
overrides. The resolved config is written to the run folder as JSON and read back on
`--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

from model.config import LossConfig, ModelConfig, OptimConfig
from pipelines.config import CROPS, AugConfig, DataConfig

PIPELINES = ("ffcv", "dali", "synthetic")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """An impossible or unknown setting; the message names the option."""


@dataclass(frozen=True)
class RunConfig:
    """What the program does with the model and data: where, how long, how to log."""

    out: str = "runs/run"  # run folder: config, label split, checkpoints, metrics, plot
    epochs: int = 100
    seed: int = 0
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler, CUDA only)
    log_interval: int = 10  # steps between log lines (the only host reads of the losses)
    checkpoint_every: int = 10  # epochs between kept checkpoint-epXXXX.pt (0: none)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    monitor_every: int = 0  # epochs between SNN/kNN evaluations on rank 0 (0: off; needs val)
    monitor_val_subset: int = 1000  # val images the monitor classifies (0: the whole split)


@dataclass(frozen=True)
class TrainConfig:
    """All sections; each component receives only its own."""

    data: DataConfig = DataConfig()
    aug: AugConfig = AugConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


SECTIONS = tuple(f.name for f in fields(TrainConfig))


def section_types(cls: type) -> dict[str, typing.Any]:
    """Field name -> resolved type of a section dataclass."""
    return typing.get_type_hints(cls)


def section_class(section: str) -> type:
    return section_types(TrainConfig)[section]


def parse_value(text: str, kind: typing.Any, option: str) -> typing.Any:
    """Parses a command-line string into a field's type (bool, int, float, str, tuple)."""
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if typing.get_origin(kind) is tuple:
            args = typing.get_args(kind)
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(a(p) for a, p in zip(args, parts, strict=True))
        return kind(text)
    except ValueError as e:
        raise ConfigError(f"{option}: cannot read {text!r} as {kind} ({e})") from e


def coerce(value: typing.Any, kind: typing.Any, option: str) -> typing.Any:
    """Checks a TOML/JSON value against a field's type (lists become tuples)."""
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(typing.get_args(kind)):
            raise ConfigError(f"{option}: expected a list of {len(typing.get_args(kind))}")
        return tuple(a(v) for a, v in zip(typing.get_args(kind), value, strict=True))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (bool, int, float, str) and type(value) is not kind:
        raise ConfigError(f"{option}: expected {kind.__name__}, got {value!r}")
    return value


def apply(cfg: TrainConfig, updates: dict[str, dict[str, typing.Any]], origin: str) -> TrainConfig:
    """Returns cfg with `{section: {field: value}}` applied; unknown names raise ConfigError."""
    for section, values in updates.items():
        if section not in SECTIONS and not isinstance(values, dict):
            owner = next((s for s in SECTIONS if section in section_types(section_class(s))), None)
            where = f"under [{owner}]" if owner else f"under its section ({SECTIONS})"
            raise ConfigError(
                f"{origin}: {section} = {values!r} is outside any section; put it {where}"
            )
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{section}]; sections: {SECTIONS}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        types = section_types(section_class(section))
        for name in values:
            if name not in types:
                known = ", ".join(types)
                raise ConfigError(f"{origin}: unknown option {section}.{name}; known: {known}")
        checked = {k: coerce(v, types[k], f"{origin}: {section}.{k}") for k, v in values.items()}
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **checked)})
    return cfg


def load_preset(path: str | Path, cfg: TrainConfig | None = None) -> TrainConfig:
    """Reads a preset TOML file (sections data, aug, model, loss, optim, run)."""
    return apply(cfg or TrainConfig(), read_preset(path), str(path))


def read_preset(path: str | Path) -> dict:
    """A preset file's table, `{section: {field: value}}` as written (not yet checked)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a folder; name a preset TOML file in it")
    if not path.is_file():
        raise ConfigError(f"--config: preset {path} does not exist")
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config: {path} is not valid TOML ({e})") from e
    return table


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, origin: str = "config") -> TrainConfig:
    return apply(TrainConfig(), d, origin)


def save_json(cfg: TrainConfig, path: str | Path) -> None:
    from runner.metrics import write_json

    write_json(path, to_dict(cfg))


def load_json(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ConfigError(f"--resume: cannot read the saved config {path} ({e})") from e
    return from_dict(d, str(path))


def flag_names() -> dict[str, tuple[str, str]]:
    """Command-line flag -> (section, field): `--batch-size` where the field name is unique
    across sections, `--section-field` where it is not."""
    seen: dict[str, list[str]] = {}
    for section in SECTIONS:
        for name in section_types(section_class(section)):
            seen.setdefault(name, []).append(section)
    out = {}
    for name, sections in seen.items():
        for section in sections:
            flag = name if len(sections) == 1 else f"{section}_{name}"
            out["--" + flag.replace("_", "-")] = (section, name)
    return out


def flag_of(section: str, name: str) -> str:
    """The command-line flag that sets a field (train.py's `--pipeline` for data.backend)."""
    if (section, name) == ("data", "backend"):
        return "--pipeline"
    return next(flag for flag, key in flag_names().items() if key == (section, name))


def parse_set(items: list[str]) -> dict[str, dict[str, str]]:
    """`["data.batch_size=64"]` -> `{"data": {"batch_size": "64"}}` (values still strings)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set: expected SECTION.FIELD=VALUE, got {item!r}")
        out.setdefault(section, {})[name] = value
    return out


def apply_strings(cfg: TrainConfig, updates: dict[str, dict[str, str]], origin: str) -> TrainConfig:
    """Applies string values from the command line, parsed with each field's type."""
    parsed: dict[str, dict] = {}
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {section!r}; sections: {SECTIONS}")
        types = section_types(section_class(section))
        for name, text in values.items():
            if name not in types:
                raise ConfigError(f"{origin}: unknown option {section}.{name}")
            parsed.setdefault(section, {})[name] = parse_value(
                text, types[name], f"{section}.{name}"
            )
    return apply(cfg, parsed, origin)


def validate(cfg: TrainConfig, cuda_available: bool, world_size: int = 1) -> None:
    """Rejects impossible settings before any work starts; the message names the option.

    Checks that need the labeled split (C x K against it) live in `check_split`.
    """
    d, r, a = cfg.data, cfg.run, cfg.aug
    if d.backend not in PIPELINES:
        raise ConfigError(f"--pipeline: unknown pipeline {d.backend!r}; choose from {PIPELINES}")
    if d.crops not in CROPS:
        raise ConfigError(f"--crops: unknown {d.crops!r}; choose from {CROPS}")
    if d.crops != "auto" and d.backend == "dali":
        raise ConfigError(
            f"--crops {d.crops}: chooses where the ffcv pipeline cuts its views; the dali "
            "pipeline cuts them in its own operators (leave --crops auto)"
        )
    if r.device not in DEVICES:
        raise ConfigError(f"--device: unknown device {r.device!r}; choose from {DEVICES}")
    if r.device == "cuda" and not cuda_available:
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if r.precision not in PRECISIONS:
        raise ConfigError(f"--precision: unknown {r.precision!r}; choose from {PRECISIONS}")
    if r.precision == "fp16" and r.device != "cuda":
        raise ConfigError("--precision fp16 needs --device cuda (use fp32 or bf16 on a CPU)")
    if d.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1 per rank, got {d.batch_size}")
    if d.batch_size * world_size < max(2, world_size):
        raise ConfigError(
            f"--batch-size: the global batch {d.batch_size} x {world_size} ranks is smaller "
            "than 2 images; NT-Xent needs negatives"
        )
    if d.classes_per_batch < 1 or d.images_per_class < 1:
        raise ConfigError("--classes-per-batch and --images-per-class must be >= 1")
    if d.n_supervised_views < 1:
        raise ConfigError("--n-supervised-views: must be >= 1")
    if d.num_workers < 1:
        raise ConfigError(f"--num-workers: must be >= 1, got {d.num_workers}")
    # SuNCEt pulls each labeled view towards the others of its class in the global labeled
    # batch: with one image per class and one view, and no other rank sharing the classes,
    # there are none, and the loss is 0 at every step.
    shared = world_size if not d.per_rank_classes else 1
    if cfg.loss.sup_weight > 0 and d.images_per_class * d.n_supervised_views * shared < 2:
        raise ConfigError(
            f"--images-per-class {d.images_per_class} with --n-supervised-views "
            f"{d.n_supervised_views}: SuNCEt needs a second view of each class in the labeled "
            "batch (its positives); use --images-per-class >= 2 or --n-supervised-views >= 2"
        )
    if a.n_large + a.n_small < 2:
        raise ConfigError("--n-large/--n-small: NT-Xent needs at least 2 unlabeled views")
    if not cfg.loss.small_pairs and a.n_large < 1:
        raise ConfigError("--no-small-pairs: a positive pair needs a large crop; --n-large is 0")
    check_views(a)
    check_model_and_loss(cfg)
    check_optim(cfg.optim, r.seed)
    for name in ("epochs", "log_interval", "max_nonfinite"):
        if getattr(r, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
    if r.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every: must be >= 0")
    if r.monitor_every < 0 or r.monitor_val_subset < 0:
        raise ConfigError("--monitor-every and --monitor-val-subset: must be >= 0")
    if r.monitor_every and d.backend == "synthetic":
        raise ConfigError(
            "--monitor-every: the synthetic pipeline has no validation images; use ffcv or "
            "dali data with a val split, or --monitor-every 0"
        )


MIN_CROP = 8  # pixels: the smallest view side every network here accepts


def check_views(a) -> None:
    """Crop sides, scales, probabilities and normalisation the augmentation can use."""
    for name, n, side in (("large", a.n_large, a.large_size), ("small", a.n_small, a.small_size)):
        if n and side < MIN_CROP:
            raise ConfigError(f"--{name}-size: must be >= {MIN_CROP} pixels, got {side}")
    for name in ("large_scale", "small_scale", "blur_sigma"):
        lo, hi = getattr(a, name)
        top = 1.0 if name != "blur_sigma" else float("inf")
        if not 0 < lo <= hi <= top:
            bound = "1" if top == 1.0 else "infinity"
            raise ConfigError(
                f"--{name.replace('_', '-')}: needs 0 < min <= max <= {bound}, got {lo},{hi}"
            )
    for name in ("color_p", "gray_p", "blur_p_large", "blur_p_small"):
        if not 0 <= getattr(a, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')}: a probability in 0..1")
    if a.n_large and a.n_small and a.small_size > a.large_size:
        raise ConfigError(
            f"--small-size {a.small_size} is above --large-size {a.large_size}: the small crops "
            "would be the larger ones (large crops come first in every batch)"
        )
    if a.eval_size < MIN_CROP or a.eval_resize < a.eval_size:
        raise ConfigError(
            f"--eval-size {a.eval_size} / --eval-resize {a.eval_resize}: the centre crop must be "
            f">= {MIN_CROP} pixels and no larger than the resized shorter side"
        )
    if not 0 <= a.color_strength < math.inf:  # NaN fails both comparisons
        raise ConfigError(f"--color-strength: must be finite and >= 0, got {a.color_strength}")
    if not all(0 < v < math.inf for v in a.std):
        raise ConfigError(f"--std: every channel's std must be finite and > 0, got {a.std}")
    if not all(math.isfinite(v) for v in a.mean):
        raise ConfigError(f"--mean: every channel's mean must be finite, got {a.mean}")


def check_model_and_loss(cfg: TrainConfig) -> None:
    """The network's name and sizes, and the losses' temperatures."""
    from model.encoder import check_arch

    m, loss = cfg.model, cfg.loss
    try:
        check_arch(m.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("hidden_dim", "out_dim", "head_layers"):
        if getattr(m, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
    for name in ("temperature", "sup_temperature"):
        if not 0 < getattr(loss, name) < math.inf:
            raise ConfigError(
                f"--{name.replace('_', '-')}: must be finite and > 0, got {getattr(loss, name)}"
            )
    if not 0 <= loss.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing: must be in [0, 1), got {loss.label_smoothing}")
    if not 0 <= loss.sup_weight < math.inf:
        raise ConfigError(f"--sup-weight: must be finite and >= 0, got {loss.sup_weight}")
    if loss.supervised_epochs < 0:
        raise ConfigError(f"--supervised-epochs: must be >= 0, got {loss.supervised_epochs}")


def check_optim(o, seed: int) -> None:
    """The optimizer's and schedule's numbers (named as the flags that set them)."""
    ranges = {  # name: (low, whether low itself is allowed, high (never allowed))
        "base_lr": (0, False, math.inf),
        "final_lr": (0, True, math.inf),
        "warmup_epochs": (0, True, math.inf),
        "momentum": (0, True, 1),
        "weight_decay": (0, True, math.inf),
        "trust_coefficient": (0, False, math.inf),
    }
    for name, (lo, lo_allowed, hi) in ranges.items():
        v = getattr(o, name)  # NaN fails every comparison, so it is refused too
        if not ((v >= lo if lo_allowed else v > lo) and v < hi):
            left = "[" if lo_allowed else "("
            raise ConfigError(f"--{name.replace('_', '-')}: must be in {left}{lo}, {hi}), got {v}")
    if o.lr_batch_ref < 1:
        raise ConfigError(f"--lr-batch-ref: must be >= 1, got {o.lr_batch_ref}")
    if not 0 <= seed < 2**63:  # torch.manual_seed takes a 64-bit integer
        raise ConfigError(f"--seed: must be in [0, 2**63), got {seed}")


def check_split(cfg: TrainConfig, n_labeled: int, n_classes: int, world_size: int = 1) -> None:
    """Rejects a labeled batch the chosen split cannot fill (C x K, C)."""
    d = cfg.data
    if d.classes_per_batch > n_classes:
        raise ConfigError(
            f"--classes-per-batch {d.classes_per_batch}: the labeled split ({d.labels}) holds "
            f"only {n_classes} classes"
        )
    need = d.classes_per_batch * d.images_per_class
    if need > n_labeled:
        raise ConfigError(
            f"--classes-per-batch x --images-per-class = {d.classes_per_batch} x "
            f"{d.images_per_class} = {need} exceeds the {n_labeled} labeled images of the "
            f"split ({d.labels})"
        )
