"""One structured config tree for every command: dataclasses + OmegaConf, YAML composition, overrides.

A config file is YAML with the sections below. It may start with `defaults: [other.yaml, ...]`
(paths relative to the file, or names of the packaged configs in `pd_lightning/configs/`), merged
first in order, then the file itself, then `key=value` overrides from the command line.
Every value is type-checked by OmegaConf against the dataclasses and range-checked by `validate`
before any compute starts; errors are one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pd_lightning.cost import BUDGET_KINDS
from pd_lightning.errors import ConfigError, choice_error, did_you_mean
from pd_lightning.logits.processing import METHODS as TEMPERATURE_METHODS
from pd_lightning.logits.codec import ENCODINGS as STORE_ENCODINGS
from pd_lightning.logits.processing import WTTM_WEIGHTS, check_power_exponents
from pd_lightning.losses import LOSS_KINDS, NORMKD_STUDENT_TAU
from pd_lightning.schedules import ALPHA_SCHEDULES, DECAY_SHAPES, LR_SCHEDULES, WSD_ALPHA_SCHEDULES

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

# Names the config accepts come from the modules that implement them.
DATA_SOURCES = ("builtin", "text", "jsonl", "parquet", "hf")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed", "single_device")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
DISTILL_MODES = ("offline", "online_store", "cotrain")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and where the packed shards go."""

    source: str = "builtin"  # builtin | text | jsonl | parquet | hf
    path: Optional[str] = None  # file, directory or glob for text/jsonl/parquet; dataset name for hf
    text_field: str = "text"  # jsonl / parquet / hf column holding the document text
    hf_split: str = "train"
    heldout_fraction: float = 0.02  # for sources without their own held-out split
    corpus_seed: int = 0  # builtin corpus: which world and which document streams
    train_tokens: int = 2_000_000  # tokens to pack into the train split (upper bound for files)
    heldout_tokens: int = 100_000
    seq_len: int = 128
    tokenizer: Optional[str] = None  # an HF tokenizer dir (e.g. the teacher's); None = train a BPE
    vocab_size: int = 2048  # size of the BPE trained when `tokenizer` is None
    tokenizer_train_chars: int = 4_000_000  # corpus sample the BPE is trained on
    sequences_per_shard: int = 8192
    out: str = "runs/data"


@dataclass
class ModelConfig:
    """The student: a preset from `pd_lightning.models.PRESETS`."""

    preset: str = "tiny-1m"
    init_seed: int = 0


@dataclass
class TeacherConfig:
    """A teacher: an existing HF causal-LM dir, or a preset that `pdl teacher train` pre-trains."""

    path: Optional[str] = None  # HF model dir; when set, it is the teacher and `preset` is unused
    preset: str = "tiny-5m"
    max_steps: int = 1500
    batch_size: int = 32
    lr: float = 3.0e-3
    warmup_frac: float = 0.02
    seed: int = 0
    out: str = "runs/teacher"
    # dtype the teacher runs in for `pdl logits generate`: auto = the dir's own dtype (config.json) on CUDA,
    # float32 on CPU | float32 | bfloat16 | float16
    dtype: str = "auto"


@dataclass
class LogitsConfig:
    """Teacher logits: what the store keeps (store_p/store_k) and what training derives from it."""

    p: float = 0.95  # top-p on the teacher's tau=1 probabilities ...
    k: int = 100  # ... then at most k entries (the paper's top-p-k)
    tau: float = 1.0  # the temperature (method none), or the base temperature of AdaKD
    method: str = "none"  # none (fixed tau) | normkd | wttm | adakd_sd | adakd_h
    normkd_t: float = 1.5  # NormKD's T_norm
    # NormKD's student temperature τ_s = normkd_t * std(z_s): graph = in the autograd graph, as in
    # Chi et al. 2023 | detached = a constant (the lab before issue 16; same loss, other gradient)
    normkd_student_tau: str = "graph"
    wttm_gamma: float = 0.5  # WTTM's power transform exponent
    # WTTM's token weight U: full = Σ over the whole vocabulary of q^γ (the original method; needs the
    # store's power sums, see store_power_exponents) | support = Σ over the kept entries (a departure)
    wttm_weight: str = "full"
    adakd_beta: float = 1.0  # AdaKD: exponent of the statistic's ratio to its batch mean
    adakd_min_tau: Optional[float] = None  # AdaKD clip range; None = tau / 2 and 2 * tau
    adakd_max_tau: Optional[float] = None
    store: str = "runs/logits"  # the store directory
    store_p: float = 0.95  # truncation the store is generated at (the loosest a sweep needs)
    store_k: int = 100
    # exponents a of the per-token log Σ_v q_v^a the store keeps, beyond those this config's own method
    # needs (WTTM with wttm_weight=full: γ/τ and 1/τ, added by itself); sweeps fill in their rows' needs
    store_power_exponents: list[float] = field(default_factory=list)
    batch_size: int = 16  # sequences per teacher forward during generation
    # how a new store codes its entries: egsqrt (Exp-Golomb, fast decode) | ctxans (the same entries
    # entropy-coded: 0.61x egsqrt's bytes on a real tiny-teacher store, decodes at ~0.5x egsqrt's
    # speed) | fixed (plain). Reading needs no setting: the manifest names the encoding.
    encoding: str = "egsqrt"
    # encoder processes per generation rank (encode + write off the GIL); null = auto: 0 (a thread) on CPU,
    # min(4, CPU cores per local rank - 2) and at least 1 on CUDA
    encode_workers: Optional[int] = None
    sequences_per_shard: int = 1024
    mode: str = "offline"  # offline | online_store | cotrain (the paper's Table 6: logits of a teacher in training)
    online_start_frac: float = 0.5  # online_store: the share of teacher training after which its logits are kept...
    online_end_frac: float = 1.0  # ... up to this share (early part: 0.0-0.5, late part: 0.5-1.0)


@dataclass
class LossConfig:
    """L = (1 - alpha) * L_lm + alpha * L_kd (the paper's Eq. 1) and how alpha moves."""

    kind: str = "nll"  # nll | kld | mse | rkl | jsd | tvd
    alpha: float = 1.0  # the schedule's alpha (formulas: pd_lightning.schedules); 0 is the LM-only baseline
    alpha_schedule: str = "constant"
    # Peak of the quantity the WSD shape scales (0 -> peak -> 0): alpha for wsd_alpha, beta = 1 - alpha for
    # wsd_beta; other schedules reject it. null: loss.alpha for wsd_alpha; 0.9 for wsd_beta (alpha 1 -> 0.1 -> 1,
    # the reading that fits Table 5's printed +1.1%; 0.1 = the other reading, alpha 1 -> 0.9 -> 1).
    # wsd_beta requires loss.alpha = 1 (alpha starts and ends at 1).
    wsd_peak: Optional[float] = None
    alpha_warmup_frac: float = 0.1  # WSD on alpha / beta: warmup share of training
    alpha_decay_frac: float = 0.1  # WSD on alpha / beta: final decay share
    alpha_periods: int = 4  # periodic alpha: number of full periods over training
    jsd_beta: float = 0.5
    tau_sq_scale: bool = False  # multiply the KD term by tau^2 (Hinton); off in the paper's setting
    chunk_size: int = 1024  # tokens per chunk of the memory-flat loss
    fused: bool = False  # compute the LM head inside the chunk loop (never store [tokens, vocab])


@dataclass
class OptimConfig:
    """AdamW and the LR schedule (multiplier of `lr` as a function of training progress)."""

    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"  # constant | cosine | wsd
    warmup_frac: float = 0.02
    decay_frac: float = 0.2  # WSD: final decay share
    decay_shape: str = "1-sqrt"  # WSD decay: linear | 1-sqrt


@dataclass
class TrainerConfig:
    """Engineering knobs passed to Lightning's Trainer."""

    max_steps: int = 300
    batch_size: int = 16  # sequences per device per step
    accumulate_grad_batches: int = 1
    precision: str = "32-true"
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 1  # decode the logit store in a worker process, overlapping the step (bench_train)
    seed: int = 0
    log_every_n_steps: int = 10
    val_every_n_steps: int = 100
    val_batches: int = 8
    checkpoint_every_n_steps: int = 100
    # Stop every run at the same budget: tokens | flops (student + teacher, see pd_lightning.cost) set
    # max_steps (and so the schedules); wall stops on the clock (schedules keep max_steps).
    budget_kind: str = "none"  # none | tokens | flops | wall
    budget: float = 0.0  # tokens, FLOPs or seconds; 0 = unused
    export_every_n_steps: int = 0  # also export the student to out/exports/step-XXXXXXXX every n steps; 0 = off
    out: str = "runs/train"


@dataclass
class TrackingConfig:
    """MLflow: an explicit tracking URI always (MLflow 3 refuses the old file store)."""

    config_file: str = "mlflow.yaml"  # read when tracking_uri is None
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # None: mlflow.yaml's experiment, else pd-lightning
    run_name: Optional[str] = None


@dataclass
class EvalConfig:
    """lm-eval on the exported model."""

    suite: str = "local"
    tasks: Optional[str] = None  # comma-separated task names; overrides the suite
    batch_size: int = 16
    device: str = "cpu"
    limit: Optional[int] = None
    # Held-out token metrics (pd_lightning.metrics), computed by `pdl train` in the held-out loss's pass:
    # the teacher run beside the student for top-1 agreement and KL(teacher ‖ student): "auto" (the
    # store's teacher, the co-trained one, or for an LM-only run the teacher of an existing logits.store),
    # "none", or an HF model dir.
    heldout_teacher: str = "auto"
    heldout_sequences: int = 256  # first held-out sequences scored (the held-out loss's, as before)
    ece_bins: int = 15  # equal-mass bins of eval.heldout.ece


@dataclass
class PDLConfig:
    """The whole tree."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = tuple(PDLConfig.__dataclass_fields__)


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping safely, with a one-line error for anything malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """Find a config: a path (relative to `relative_to` first) or the name of a packaged config."""
    candidate = Path(name)
    search = []
    if relative_to is not None and not candidate.is_absolute():
        search.append(relative_to / candidate)
    search.append(candidate)
    stem = candidate.name[:-5] if candidate.name.endswith(".yaml") else candidate.name
    search.append(PACKAGED_CONFIGS / f"{stem}.yaml")
    for path in search:
        if path.is_file():
            return path
    packaged = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(
        f"config {str(name)!r} is neither a file nor a packaged config; packaged configs are "
        f"{', '.join(packaged)}{did_you_mean(stem, packaged)}"
    )


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Return the chain of raw mappings for a file: its defaults (recursively), then itself."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config defaults form a cycle: {chain}")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"defaults={defaults!r} in {str(path)!r} must be a list of config files or names")
    layers: list[dict[str, Any]] = []
    for name in defaults:
        layers.extend(_compose(resolve_config_path(name, path.parent), (*seen, path)))
    layers.append(raw)
    return layers


def _check_keys(raw: dict[str, Any], source: str) -> None:
    """Refuse unknown sections and keys with a "did you mean" before OmegaConf sees them."""
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section {section!r} in {source}; expected one of "
                f"{', '.join(SECTIONS)}{did_you_mean(section, SECTIONS)}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config section {section!r} in {source} must be a mapping, got {body!r}")
        known = tuple(getattr(PDLConfig(), section).__dataclass_fields__)
        for key in body:
            if key not in known:
                raise ConfigError(
                    f"unknown config key {section}.{key} in {source}; {section} has "
                    f"{', '.join(known)}{did_you_mean(key, known)}"
                )


def _parse_override(item: str) -> tuple[str, Any]:
    """Split `section.key=value`; the value is parsed as YAML (so 0.9 is a float, null is None)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. loss.alpha=0.9")
    key, _, value = item.partition("=")
    key = key.strip()
    if key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. loss.alpha")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _merge(base: DictConfig, layer: dict[str, Any], source: str) -> DictConfig:
    """Merge one raw mapping into the structured config, turning OmegaConf errors into one line."""
    _check_keys(layer, source)
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except ValidationError as exc:
        key = exc.full_key or "?"
        expected = _declared_type(key) or getattr(exc, "ref_type_str", None) or "the declared type"
        raise ConfigError(
            f"{key}={_offending_value(layer, key)!r} in {source} has the wrong type; expected {expected}"
        ) from None
    except (ConfigKeyError, ConfigAttributeError, OmegaConfBaseException) as exc:
        raise ConfigError(f"config error in {source}: {str(exc).splitlines()[0]}") from None


def _declared_type(dotted: str) -> str | None:
    """The annotation of `section.key` in the dataclasses ("int", "Optional[str]"), for error messages."""
    section, _, key = dotted.partition(".")
    fields = getattr(PDLConfig.__dataclass_fields__.get(section), "default_factory", None)
    found = getattr(fields, "__dataclass_fields__", {}).get(key) if fields else None
    return str(found.type) if found is not None else None


def _offending_value(layer: dict[str, Any], dotted: str) -> Any:
    node: Any = layer
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "?"
        node = node[part]
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PDLConfig:
    """Compose a config file (or the defaults) with `key=value` overrides and validate it."""
    cfg: DictConfig = OmegaConf.structured(PDLConfig)
    if path is not None:
        file = resolve_config_path(path)
        for layer in _compose(file):
            cfg = _merge(cfg, layer, repr(str(file)))
    for item in overrides:
        key, value = _parse_override(item)
        section, name = key.split(".")
        cfg = _merge(cfg, {section: {name: value}}, f"override {item!r}")
    obj: PDLConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def to_dict(cfg: PDLConfig) -> dict[str, Any]:
    """The resolved config as plain nested dicts (for YAML dumps, hashing and MLflow params)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: PDLConfig) -> str:
    """The resolved config as YAML text, loadable again with `load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: PDLConfig) -> dict[str, Any]:
    """`section.key -> value` for every field (MLflow params)."""
    return {f"{s}.{k}": v for s, body in to_dict(cfg).items() for k, v in body.items()}


def config_hash(*parts: Any) -> str:
    """A short, stable content hash of JSON-able parts (dataclasses are converted)."""
    def plain(x: Any) -> Any:
        if hasattr(x, "__dataclass_fields__"):
            return OmegaConf.to_container(OmegaConf.structured(x), resolve=True)
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is out of range; allowed: {allowed}")


def _choice(field_name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise choice_error(field_name, value, allowed)


def _positive_int(field_name: str, value: int) -> None:
    _require(isinstance(value, int) and value >= 1, field_name, value, "an integer >= 1")


def _fraction(field_name: str, value: float, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    _require(ok, field_name, value, "(0, 1]" if low_open else "[0, 1]")


def validate(cfg: PDLConfig) -> None:
    """Range- and name-check every field; raise ConfigError (one line) on the first problem."""
    from pd_lightning.models import PRESETS, TEACHER_DTYPES  # late import: models imports transformers

    d = cfg.data
    _choice("data.source", d.source, DATA_SOURCES)
    if d.source != "builtin" and not d.path:
        raise ConfigError(f"data.path is required when data.source={d.source!r} (a file, directory, glob or dataset name)")
    _fraction("data.heldout_fraction", d.heldout_fraction)
    for name in ("train_tokens", "heldout_tokens", "seq_len", "sequences_per_shard", "tokenizer_train_chars"):
        _positive_int(f"data.{name}", getattr(d, name))
    _require(d.seq_len >= 2, "data.seq_len", d.seq_len, "an integer >= 2 (next-token prediction needs two tokens)")
    _require(256 + 1 <= d.vocab_size <= 2**32 - 1, "data.vocab_size", d.vocab_size, "257 .. 4294967295 (a byte-level BPE needs 256 byte tokens + specials)")

    _choice("model.preset", cfg.model.preset, tuple(PRESETS))
    t = cfg.teacher
    _choice("teacher.preset", t.preset, tuple(PRESETS))
    _choice("teacher.dtype", t.dtype, TEACHER_DTYPES)
    for name in ("max_steps", "batch_size"):
        _positive_int(f"teacher.{name}", getattr(t, name))
    _require(t.lr > 0 and math.isfinite(t.lr), "teacher.lr", t.lr, "a number > 0")
    _fraction("teacher.warmup_frac", t.warmup_frac)

    lg = cfg.logits
    _fraction("logits.p", lg.p, low_open=True)
    _fraction("logits.store_p", lg.store_p, low_open=True)
    _positive_int("logits.k", lg.k)
    _positive_int("logits.store_k", lg.store_k)
    _require(lg.tau > 0 and math.isfinite(lg.tau), "logits.tau", lg.tau, "a number > 0")
    _choice("logits.method", lg.method, TEMPERATURE_METHODS)
    _require(lg.normkd_t > 0, "logits.normkd_t", lg.normkd_t, "a number > 0")
    _choice("logits.normkd_student_tau", lg.normkd_student_tau, NORMKD_STUDENT_TAU)
    _require(lg.wttm_gamma > 0, "logits.wttm_gamma", lg.wttm_gamma, "a number > 0")
    _choice("logits.wttm_weight", lg.wttm_weight, WTTM_WEIGHTS)
    check_power_exponents(lg.store_power_exponents)
    _require(lg.adakd_beta > 0, "logits.adakd_beta", lg.adakd_beta, "a number > 0")
    lo = lg.tau / 2 if lg.adakd_min_tau is None else lg.adakd_min_tau
    hi = 2 * lg.tau if lg.adakd_max_tau is None else lg.adakd_max_tau
    _require(0 < lo <= hi, "logits.adakd_min_tau", lg.adakd_min_tau, f"0 < adakd_min_tau <= adakd_max_tau ({hi})")
    if lg.method == "normkd" and lg.tau != 1.0:
        raise ConfigError(f"logits.tau={lg.tau!r} is not used by logits.method='normkd' (its temperature is "
                          "normkd_t * logit std); leave tau at 1.0")
    _require(lg.p <= lg.store_p, "logits.p", lg.p, f"<= logits.store_p ({lg.store_p}): a store serves only narrower truncations")
    _require(lg.k <= lg.store_k, "logits.k", lg.k, f"<= logits.store_k ({lg.store_k}): a store serves only narrower truncations")
    _positive_int("logits.batch_size", lg.batch_size)
    _choice("logits.encoding", lg.encoding, STORE_ENCODINGS)
    if lg.encode_workers is not None:
        _require(isinstance(lg.encode_workers, int) and 0 <= lg.encode_workers <= 64, "logits.encode_workers",
                 lg.encode_workers, "null (auto) or an integer in [0, 64] (0 = encode on a thread)")
    _positive_int("logits.sequences_per_shard", lg.sequences_per_shard)
    _choice("logits.mode", lg.mode, DISTILL_MODES)
    _fraction("logits.online_start_frac", lg.online_start_frac)
    _fraction("logits.online_end_frac", lg.online_end_frac)
    _require(lg.online_start_frac < lg.online_end_frac, "logits.online_end_frac", lg.online_end_frac,
             f"> logits.online_start_frac ({lg.online_start_frac})")

    ls = cfg.loss
    _choice("loss.kind", ls.kind, LOSS_KINDS)
    _fraction("loss.alpha", ls.alpha)
    _choice("loss.alpha_schedule", ls.alpha_schedule, ALPHA_SCHEDULES)
    _fraction("loss.alpha_warmup_frac", ls.alpha_warmup_frac)
    _fraction("loss.alpha_decay_frac", ls.alpha_decay_frac)
    _require(ls.alpha_warmup_frac + ls.alpha_decay_frac <= 1, "loss.alpha_decay_frac", ls.alpha_decay_frac,
             f"alpha_warmup_frac + alpha_decay_frac <= 1 (warmup is {ls.alpha_warmup_frac})")
    _positive_int("loss.alpha_periods", ls.alpha_periods)
    if ls.wsd_peak is not None:
        _require(ls.alpha_schedule in WSD_ALPHA_SCHEDULES, "loss.wsd_peak", ls.wsd_peak,
                 f"null unless loss.alpha_schedule is wsd_alpha or wsd_beta (it is {ls.alpha_schedule!r})")
        _fraction("loss.wsd_peak", ls.wsd_peak)
    if ls.alpha_schedule == "wsd_beta":
        _require(ls.alpha == 1.0, "loss.alpha", ls.alpha, "1.0 with loss.alpha_schedule='wsd_beta' (alpha = 1 - beta "
                 "starts and ends at 1; beta's peak is loss.wsd_peak, default 0.9)")
    if ls.alpha_schedule == "wsd_alpha" and ls.wsd_peak is not None:
        _require(ls.alpha in (1.0, ls.wsd_peak), "loss.alpha", ls.alpha,
                 f"1.0 or loss.wsd_peak ({ls.wsd_peak}) with wsd_alpha: its peak alpha is loss.wsd_peak")
    _require(0 < ls.jsd_beta < 1, "loss.jsd_beta", ls.jsd_beta, "(0, 1)")
    _positive_int("loss.chunk_size", ls.chunk_size)

    o = cfg.optim
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a number > 0")
    _fraction("optim.min_lr_ratio", o.min_lr_ratio)
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "[0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "[0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "a number >= 0 (0 disables clipping)")
    _choice("optim.lr_schedule", o.lr_schedule, LR_SCHEDULES)
    _fraction("optim.warmup_frac", o.warmup_frac)
    _fraction("optim.decay_frac", o.decay_frac)
    _require(o.warmup_frac + o.decay_frac <= 1, "optim.decay_frac", o.decay_frac,
             f"warmup_frac + decay_frac <= 1 (warmup is {o.warmup_frac})")
    _choice("optim.decay_shape", o.decay_shape, DECAY_SHAPES)

    tr = cfg.trainer
    for name in ("max_steps", "batch_size", "accumulate_grad_batches", "devices", "num_nodes",
                 "log_every_n_steps", "val_every_n_steps", "val_batches", "checkpoint_every_n_steps"):
        _positive_int(f"trainer.{name}", getattr(tr, name))
    _require(tr.num_workers >= 0, "trainer.num_workers", tr.num_workers, "an integer >= 0")
    _choice("trainer.precision", tr.precision, PRECISIONS)
    _choice("trainer.accelerator", tr.accelerator, ACCELERATORS)
    _choice("trainer.strategy", tr.strategy, STRATEGIES)
    _choice("trainer.budget_kind", tr.budget_kind, BUDGET_KINDS)
    if tr.budget_kind == "none":
        _require(tr.budget == 0, "trainer.budget", tr.budget, "0 while trainer.budget_kind='none' (set budget_kind to "
                 "tokens, flops or wall)")
    else:
        unit = {"tokens": "tokens", "flops": "FLOPs", "wall": "seconds"}[tr.budget_kind]
        _require(math.isfinite(tr.budget) and tr.budget > 0, "trainer.budget", tr.budget, f"a number > 0 ({unit})")
    _require(isinstance(tr.export_every_n_steps, int) and tr.export_every_n_steps >= 0, "trainer.export_every_n_steps",
             tr.export_every_n_steps, "an integer >= 0 (0 = no intermediate exports)")

    e = cfg.eval
    _positive_int("eval.batch_size", e.batch_size)
    _positive_int("eval.heldout_sequences", e.heldout_sequences)
    _positive_int("eval.ece_bins", e.ece_bins)
    _require(isinstance(e.heldout_teacher, str) and e.heldout_teacher.strip() != "", "eval.heldout_teacher",
             e.heldout_teacher, "auto, none or the path of an HF teacher dir")
    if e.limit is not None:
        _positive_int("eval.limit", e.limit)
