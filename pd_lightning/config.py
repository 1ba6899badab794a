"""One structured config tree for every command: dataclasses + OmegaConf, YAML composition, overrides.

A config file is YAML with the sections below. It may start with `defaults: [other.yaml, ...]`
(paths relative to the file, or names of the packaged configs in `pd_lightning/configs/`), merged
first in order, then the file itself, then `key=value` overrides from the command line.
Every value is type-checked by OmegaConf against the dataclasses and checked by `validate` before
any compute starts; errors are one line naming the field, the value and what is allowed.

Each field's allowed values are declared once, next to the field: `choice(default, NAMES)` or
`ranged(default, Range(...))`. The name tuples live here, and the modules that implement them
(losses, schedules, logits.processing, logits.codec, cost) import them from here, so this module
needs no torch: `pdl config show` and anything that only reads configs stay light. `check_field`
applies one field's declaration to a library function's argument (same one-line error); `validate`
applies all of them, then the rules that tie several fields together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pd_lightning.errors import ConfigError, choice_error, did_you_mean

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


# ----------------------------------------------------------------------------- field declarations


@dataclass(frozen=True)
class Choice:
    """A value that must be one of a fixed set of names."""

    allowed: tuple[str, ...]

    def __call__(self, name: str, value: Any) -> None:
        if value not in self.allowed:
            raise choice_error(name, value, self.allowed)


@dataclass(frozen=True)
class Range:
    """A finite number (an integer if `integer`) in an interval; open ends are excluded.

    The error says "allowed: " + `text`, or the interval in words ("an integer >= 1", "(0, 1]",
    "a number > 0"), then `why` in parentheses.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    why: str = ""
    text: str = ""

    def holds(self, value: Any) -> bool:
        """Whether `value` is a number of the right kind inside the interval."""
        if not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The allowed values in words, as the error message shows them."""
        if self.text:
            words = self.text
        elif self.high is not None:
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            words = f"an integer in {interval}" if self.integer else interval
        else:
            words = f"{'an integer' if self.integer else 'a number'} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{words} ({self.why})" if self.why else words

    def __call__(self, name: str, value: Any) -> None:
        if not self.holds(value):
            raise ConfigError(f"{name}={value!r} is out of range; allowed: {self.describe()}")


@dataclass(frozen=True)
class NonEmpty:
    """A string that is not blank; `text` says what it may name."""

    text: str

    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name}={value!r} is out of range; allowed: {self.text}")


POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
FRACTION = Range(0, 1)  # [0, 1]
OPEN_FRACTION = Range(0, 1, low_open=True)  # (0, 1]
BELOW_ONE = Range(0, 1, high_open=True)  # [0, 1)
POSITIVE = Range(0, low_open=True)  # a number > 0
NON_NEGATIVE = Range(0)


def choice(default: str, allowed: tuple[str, ...], *, added: bool = False) -> Any:
    """A dataclass field whose value must be one of `allowed` (checked by `validate` and `check_field`).

    `added`: a field introduced after runs and stores existed; at its default it is left out of
    `config_hash`, so the digests of every earlier configuration (sweep cache, resume) stay valid.
    """
    return field(default=default, metadata={"check": Choice(tuple(allowed)), "added": added})


def ranged(default: Any, check: Callable[[str, Any], None], *, added: bool = False) -> Any:
    """A dataclass field checked by `check(name, value)` (a Range, NonEmpty or function); null passes if Optional.
    `added`: as for `choice`."""
    return field(default=default, metadata={"check": check, "added": added})


def check_power_exponents(exponents) -> tuple[float, ...]:
    """Exponents a > 0 of the per-token log Σ_v q_v^a a store keeps, as an ascending, duplicate-free tuple."""
    out = []
    for a in exponents or ():
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not (0 < float(a) <= 64):
            raise ConfigError(f"logits.store_power_exponents={list(exponents)!r} holds {a!r}; expected numbers in (0, 64]")
        out.append(float(a))
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------- sections

DATA_SOURCES = ("builtin", "text", "jsonl", "parquet", "hf")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and where the packed shards go."""

    source: str = choice("builtin", DATA_SOURCES)
    path: Optional[str] = None  # file, directory or glob for text/jsonl/parquet; dataset name for hf
    text_field: str = "text"  # jsonl / parquet / hf column holding the document text
    hf_split: str = "train"
    heldout_fraction: float = ranged(0.02, FRACTION)  # for sources without their own held-out split
    corpus_seed: int = 0  # builtin corpus: which world and which document streams
    train_tokens: int = ranged(2_000_000, POSITIVE_INT)  # tokens to pack into the train split (upper bound for files)
    heldout_tokens: int = ranged(100_000, POSITIVE_INT)
    seq_len: int = ranged(128, Range(2, integer=True, why="next-token prediction needs two tokens"))
    tokenizer: Optional[str] = None  # an HF tokenizer dir (e.g. the teacher's); None = train a BPE
    # size of the BPE trained when `tokenizer` is None
    vocab_size: int = ranged(2048, Range(257, 2**32 - 1, integer=True, text="257 .. 4294967295",
                                         why="a byte-level BPE needs 256 byte tokens + specials"))
    tokenizer_train_chars: int = ranged(4_000_000, POSITIVE_INT)  # corpus sample the BPE is trained on
    sequences_per_shard: int = ranged(8192, POSITIVE_INT)
    out: str = "runs/data"


GLM4_VOCAB_SIZE = 151_552  # the paper's teacher vocabulary (GLM-4), used for Table 7 param counts


@dataclass(frozen=True)
class Preset:
    """One decoder size: the columns of the paper's Table 7 (built into a model by `pd_lightning.models`)."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    query_groups: int  # = key/value heads (GQA)
    tied_embeddings: bool
    max_seq_len: int = 4096
    nominal_params: float | None = None  # the size the name promises, at its reference vocabulary
    reference_vocab: int = GLM4_VOCAB_SIZE

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# The choices of model.preset and teacher.preset.
PRESETS: dict[str, Preset] = {
    # Tiny CPU sizes for tests and the quickstart; nominal sizes at the default 2,048-token BPE.
    "tiny-1m": Preset("tiny-1m", 128, 384, 4, 4, 2, True, 1024, 1.0e6, 2048),
    "tiny-2m": Preset("tiny-2m", 192, 576, 4, 6, 2, True, 1024, 2.0e6, 2048),
    "tiny-5m": Preset("tiny-5m", 256, 768, 6, 8, 4, True, 1024, 5.0e6, 2048),
    "tiny-20m": Preset("tiny-20m", 384, 1152, 11, 6, 2, False, 1024, 20.0e6, 2048),
    # The paper's Table 7 (all GQA, BF16 on GPU), nominal sizes at the GLM-4 vocabulary.
    "330M": Preset("330M", 1024, 4096, 12, 16, 2, True, 4096, 330e6),
    "670M": Preset("670M", 1024, 4096, 24, 16, 2, False, 4096, 670e6),
    "1.9B": Preset("1.9B", 2048, 6912, 24, 16, 2, False, 4096, 1.9e9),
    "3.8B": Preset("3.8B", 3072, 8192, 28, 24, 8, False, 4096, 3.8e9),
    "6.8B": Preset("6.8B", 4096, 12800, 28, 32, 8, False, 4096, 6.8e9),
}
PAPER_PRESETS = ("330M", "670M", "1.9B", "3.8B", "6.8B")


@dataclass
class ModelConfig:
    """The student: a preset from `PRESETS`."""

    preset: str = choice("tiny-1m", tuple(PRESETS))
    init_seed: int = 0


TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TeacherConfig:
    """A teacher: an existing HF causal-LM dir, or a preset that `pdl teacher train` pre-trains."""

    path: Optional[str] = None  # HF model dir; when set, it is the teacher and `preset` is unused
    preset: str = choice("tiny-5m", tuple(PRESETS))
    max_steps: int = ranged(1500, POSITIVE_INT)
    batch_size: int = ranged(32, POSITIVE_INT)
    lr: float = ranged(3.0e-3, POSITIVE)
    warmup_frac: float = ranged(0.02, FRACTION)
    seed: int = 0
    out: str = "runs/teacher"
    # dtype the teacher runs in for `pdl logits generate`: auto = the dir's own dtype (config.json) on CUDA,
    # float32 on CPU | float32 | bfloat16 | float16
    dtype: str = choice("auto", TEACHER_DTYPES)


TEMPERATURE_METHODS = ("none", "normkd", "wttm", "adakd_sd", "adakd_h")  # logits.processing implements them
# NormKD's student temperature: in the autograd graph (the method) or treated as a constant.
NORMKD_STUDENT_TAU = ("graph", "detached")
WTTM_WEIGHTS = ("full", "support")
STORE_ENCODINGS = ("ctxans", "egsqrt", "fixed")  # logits.codec implements them
SAMPLING_METHODS = ("topk", "sample")  # logits.processing (truncate_top_p_k, sample_teacher) implements them
SAMPLED_TAU_ESTIMATORS = ("exact", "self_normalised")  # logits.processing.sampled_targets implements them
MAX_SAMPLES = 255  # a draw count is stored in at most 8 bits' worth of Exp-Golomb code per entry
DISTILL_MODES = ("offline", "online_store", "cotrain")


def _power_exponents(name: str, value: Any) -> None:
    check_power_exponents(value)


@dataclass
class LogitsConfig:
    """Teacher logits: what the store keeps (store_p/store_k) and what training derives from it."""

    p: float = ranged(0.95, OPEN_FRACTION)  # top-p on the teacher's tau=1 probabilities ...
    k: int = ranged(100, POSITIVE_INT)  # ... then at most k entries (the paper's top-p-k)
    tau: float = ranged(1.0, POSITIVE)  # the temperature (method none), or the base temperature of AdaKD
    method: str = choice("none", TEMPERATURE_METHODS)  # none (fixed tau) | normkd | wttm | adakd_sd | adakd_h
    normkd_t: float = ranged(1.5, POSITIVE)  # NormKD's T_norm
    # NormKD's student temperature τ_s = normkd_t * std(z_s): graph = in the autograd graph, as in
    # Chi et al. 2023 | detached = a constant (the lab before issue 16; same loss, other gradient)
    normkd_student_tau: str = choice("graph", NORMKD_STUDENT_TAU)
    wttm_gamma: float = ranged(0.5, POSITIVE)  # WTTM's power transform exponent
    # WTTM's token weight U: full = Σ over the whole vocabulary of q^γ (the original method; needs the
    # store's power sums, see store_power_exponents) | support = Σ over the kept entries (a departure)
    wttm_weight: str = choice("full", WTTM_WEIGHTS)
    adakd_beta: float = ranged(1.0, POSITIVE)  # AdaKD: exponent of the statistic's ratio to its batch mean
    adakd_min_tau: Optional[float] = None  # AdaKD clip range; None = tau / 2 and 2 * tau
    adakd_max_tau: Optional[float] = None
    store: str = "runs/logits"  # the store directory
    store_p: float = ranged(0.95, OPEN_FRACTION)  # truncation the store is generated at (the loosest a sweep needs)
    store_k: int = ranged(100, POSITIVE_INT)
    # what the store keeps per token: topk = the top-p-k entries (the paper) | sample = the distinct ids of
    # `samples` draws from the teacher's tau=1 distribution with their draw counts (random-sampling KD,
    # arXiv 2503.16870: unbiased targets; formulas in pd_lightning.logits.processing.sample_teacher)
    sampling: str = choice("topk", SAMPLING_METHODS, added=True)
    # draws per position (sampling=sample); a token keeps at most this many distinct ids
    samples: int = ranged(12, Range(1, MAX_SAMPLES, integer=True), added=True)
    sample_seed: int = ranged(0, Range(0, 2**63 - 1, integer=True), added=True)  # position t of sequence i always gets the same draws
    # a sampled store at tau != 1: exact = importance weights q^(1/tau - 1) / Z with the store's power sum Z at
    # 1/tau (unbiased; generation keeps that sum) | self_normalised = the weights normalised over the drawn ids
    # (consistent, biased by O(1/samples); needs no power sum; the only choice for adaptive temperatures)
    sampled_tau: str = choice("exact", SAMPLED_TAU_ESTIMATORS, added=True)
    # exponents a of the per-token log Σ_v q_v^a the store keeps, beyond those this config's own method
    # needs (WTTM with wttm_weight=full: γ/τ and 1/τ, added by itself); sweeps fill in their rows' needs
    store_power_exponents: list[float] = field(default_factory=list, metadata={"check": _power_exponents})
    batch_size: int = ranged(16, POSITIVE_INT)  # sequences per teacher forward during generation
    # how a new store codes its entries: egsqrt (Exp-Golomb, fastest decode) | ctxans (the same entries
    # entropy-coded: 0.55x egsqrt's bytes on a real tiny-teacher store, decodes at ~0.75x egsqrt's
    # speed, encodes at ~0.35x) | fixed (plain). Reading needs no setting: the manifest names the encoding.
    encoding: str = choice("egsqrt", STORE_ENCODINGS)
    # encoder processes per generation rank (encode + write off the GIL); null = auto: 0 (a thread) on CPU,
    # min(4, CPU cores per local rank - 2) and at least 1 on CUDA
    encode_workers: Optional[int] = ranged(None, Range(0, 64, integer=True, text="null (auto) or an integer in [0, 64]",
                                                       why="0 = encode on a thread"))
    sequences_per_shard: int = ranged(1024, POSITIVE_INT)
    # offline | online_store | cotrain (the paper's Table 6: logits of a teacher in training)
    mode: str = choice("offline", DISTILL_MODES)
    # online_store: the share of teacher training after which its logits are kept...
    online_start_frac: float = ranged(0.5, FRACTION)
    online_end_frac: float = ranged(1.0, FRACTION)  # ... up to this share (early part: 0.0-0.5, late part: 0.5-1.0)


LOSS_KINDS = ("nll", "kld", "mse", "rkl", "jsd", "tvd")  # pd_lightning.losses implements them
ALPHA_SCHEDULES = ("constant", "linear_inc", "linear_dec", "period", "wsd_alpha", "wsd_beta")  # pd_lightning.schedules
WSD_ALPHA_SCHEDULES = ("wsd_alpha", "wsd_beta")  # the α schedules that take a peak (loss.wsd_peak)


@dataclass
class LossConfig:
    """L = (1 - alpha) * L_lm + alpha * L_kd (the paper's Eq. 1) and how alpha moves."""

    kind: str = choice("nll", LOSS_KINDS)  # nll | kld | mse | rkl | jsd | tvd
    # the schedule's alpha (formulas: pd_lightning.schedules); 0 is the LM-only baseline
    alpha: float = ranged(1.0, FRACTION)
    alpha_schedule: str = choice("constant", ALPHA_SCHEDULES)
    # Peak of the quantity the WSD shape scales (0 -> peak -> 0): alpha for wsd_alpha, beta = 1 - alpha for
    # wsd_beta; other schedules reject it. null: loss.alpha for wsd_alpha; 0.9 for wsd_beta (alpha 1 -> 0.1 -> 1,
    # the reading that fits Table 5's printed +1.1%; 0.1 = the other reading, alpha 1 -> 0.9 -> 1).
    # wsd_beta requires loss.alpha = 1 (alpha starts and ends at 1).
    wsd_peak: Optional[float] = ranged(None, FRACTION)
    alpha_warmup_frac: float = ranged(0.1, FRACTION)  # WSD on alpha / beta: warmup share of training
    alpha_decay_frac: float = ranged(0.1, FRACTION)  # WSD on alpha / beta: final decay share
    alpha_periods: int = ranged(4, POSITIVE_INT)  # periodic alpha: number of full periods over training
    jsd_beta: float = ranged(0.5, Range(0, 1, low_open=True, high_open=True))
    tau_sq_scale: bool = False  # multiply the KD term by tau^2 (Hinton); off in the paper's setting
    chunk_size: int = ranged(1024, POSITIVE_INT)  # tokens per chunk of the memory-flat loss
    fused: bool = False  # compute the LM head inside the chunk loop (never store [tokens, vocab])


LR_SCHEDULES = ("constant", "cosine", "wsd")  # pd_lightning.schedules implements them
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass
class OptimConfig:
    """AdamW and the LR schedule (multiplier of `lr` as a function of training progress)."""

    lr: float = ranged(3.0e-3, POSITIVE)
    min_lr_ratio: float = ranged(0.1, FRACTION)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    beta1: float = ranged(0.9, BELOW_ONE)
    beta2: float = ranged(0.95, BELOW_ONE)
    eps: float = ranged(1.0e-8, POSITIVE)
    grad_clip: float = ranged(1.0, Range(0, why="0 disables clipping"))
    lr_schedule: str = choice("cosine", LR_SCHEDULES)  # constant | cosine | wsd
    warmup_frac: float = ranged(0.02, FRACTION)
    decay_frac: float = ranged(0.2, FRACTION)  # WSD: final decay share
    decay_shape: str = choice("1-sqrt", DECAY_SHAPES)  # WSD decay: linear | 1-sqrt


PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed", "single_device")
BUDGET_UNITS = {"tokens": "tokens", "flops": "FLOPs", "wall": "seconds"}  # what trainer.budget counts, per kind
BUDGET_KINDS = ("none", *BUDGET_UNITS)  # pd_lightning.cost plans the steps of each


@dataclass
class TrainerConfig:
    """Engineering knobs passed to Lightning's Trainer."""

    max_steps: int = ranged(300, POSITIVE_INT)
    batch_size: int = ranged(16, POSITIVE_INT)  # sequences per device per step
    accumulate_grad_batches: int = ranged(1, POSITIVE_INT)
    precision: str = choice("32-true", PRECISIONS)
    accelerator: str = choice("auto", ACCELERATORS)
    strategy: str = choice("auto", STRATEGIES)
    devices: int = ranged(1, POSITIVE_INT)
    num_nodes: int = ranged(1, POSITIVE_INT)
    # decode the logit store in a worker process, overlapping the step (bench_train)
    num_workers: int = ranged(1, NON_NEGATIVE_INT)
    seed: int = 0
    log_every_n_steps: int = ranged(10, POSITIVE_INT)
    val_every_n_steps: int = ranged(100, POSITIVE_INT)
    val_batches: int = ranged(8, POSITIVE_INT)
    checkpoint_every_n_steps: int = ranged(100, POSITIVE_INT)
    # Stop every run at the same budget: tokens | flops (student + teacher, see pd_lightning.cost) set
    # max_steps (and so the schedules); wall stops on the clock (schedules keep max_steps).
    budget_kind: str = choice("none", BUDGET_KINDS)  # none | tokens | flops | wall
    budget: float = 0.0  # tokens, FLOPs or seconds; 0 = unused (its range depends on budget_kind: validate)
    # also export the student to out/exports/step-XXXXXXXX every n steps; 0 = off
    export_every_n_steps: int = ranged(0, Range(0, integer=True, why="0 = no intermediate exports"))
    out: str = "runs/train"


@dataclass
class TrackingConfig:
    """MLflow: an explicit tracking URI always (MLflow 3 refuses the old file store)."""

    config_file: str = "mlflow.yaml"  # read when tracking_uri is None
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # None: mlflow.yaml's experiment, else pd-lightning
    run_name: Optional[str] = None


def absolute_tracking_uri(uri: str) -> str:
    """A tracking URI with its sqlite path made absolute (relative to the working dir now); others as written."""
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def same_tracking_store(a: str, b: str) -> bool:
    """Whether two MLflow tracking URIs name one store: sqlite paths compared resolved, other URIs as written."""
    return absolute_tracking_uri(a).rstrip("/") == absolute_tracking_uri(b).rstrip("/")


@dataclass
class EvalConfig:
    """lm-eval on the exported model."""

    suite: str = "local"
    tasks: Optional[str] = None  # comma-separated task names; overrides the suite
    batch_size: int = ranged(16, POSITIVE_INT)
    device: str = "cpu"
    limit: Optional[int] = ranged(None, POSITIVE_INT)
    # Held-out token metrics (pd_lightning.metrics), computed by `pdl train` in the held-out loss's pass:
    # the teacher run beside the student for top-1 agreement and KL(teacher ‖ student): "auto" (the
    # store's teacher, the co-trained one, or for an LM-only run the teacher of an existing logits.store),
    # "none", or an HF model dir.
    heldout_teacher: str = ranged("auto", NonEmpty("auto, none or the path of an HF teacher dir"))
    # first held-out sequences scored (the held-out loss's, as before)
    heldout_sequences: int = ranged(256, POSITIVE_INT)
    ece_bins: int = ranged(15, POSITIVE_INT)  # equal-mass bins of eval.heldout.ece


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


def _field_checks() -> dict[str, tuple[Callable[[str, Any], None], bool]]:
    """`section.key -> (check, null allowed)` for every field declared with `choice` or `ranged`, in field order."""
    checks = {}
    for section, sf in PDLConfig.__dataclass_fields__.items():
        for f in dataclasses.fields(sf.default_factory):
            if "check" in f.metadata:
                # the annotations are strings (postponed evaluation): Optional[...] fields may be null
                checks[f"{section}.{f.name}"] = (f.metadata["check"], str(f.type).startswith("Optional["))
    return checks


FIELD_CHECKS = _field_checks()


def check_field(name: str, value: Any) -> Any:
    """Check `value` against what config field `name` ("loss.alpha") allows and return it; ConfigError if not.

    Library functions that take a config value as an argument call this, so a direct caller gets the
    same one-line error as a config file, from the one declaration next to the field.
    """
    check, nullable = FIELD_CHECKS[name]
    if value is not None or not nullable:
        check(name, value)
    return value


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


def _without_added_defaults(obj: Any, plain: Any) -> Any:
    """`plain` (the container of dataclass `obj`) without the `added` fields that sit at their defaults."""
    if not dataclasses.is_dataclass(obj) or not isinstance(plain, dict):
        return plain
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("added") and f.default is not dataclasses.MISSING and value == f.default:
            continue
        out[f.name] = _without_added_defaults(value, plain.get(f.name))
    return out


def config_hash(*parts: Any) -> str:
    """A short, stable content hash of JSON-able parts (dataclasses are converted; fields declared
    `added` are left out while at their defaults, so adding a knob does not change earlier digests)."""
    def plain(x: Any) -> Any:
        if hasattr(x, "__dataclass_fields__"):
            return _without_added_defaults(x, OmegaConf.to_container(OmegaConf.structured(x), resolve=True))
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is out of range; allowed: {allowed}")


def validate(cfg: PDLConfig) -> None:
    """Check every field against its declaration, then the rules across fields; one-line ConfigError on the first."""
    for name, (check, nullable) in FIELD_CHECKS.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is not None or not nullable:
            check(name, value)
    _check_across_fields(cfg)


def _check_across_fields(cfg: PDLConfig) -> None:
    """The rules that tie fields together (each field alone is already within its declaration)."""
    d = cfg.data
    if d.source != "builtin" and not d.path:
        raise ConfigError(f"data.path is required when data.source={d.source!r} (a file, directory, glob or dataset name)")

    lg = cfg.logits
    lo = lg.tau / 2 if lg.adakd_min_tau is None else lg.adakd_min_tau
    hi = 2 * lg.tau if lg.adakd_max_tau is None else lg.adakd_max_tau
    _require(0 < lo <= hi, "logits.adakd_min_tau", lg.adakd_min_tau, f"0 < adakd_min_tau <= adakd_max_tau ({hi})")
    if lg.method == "normkd" and lg.tau != 1.0:
        raise ConfigError(f"logits.tau={lg.tau!r} is not used by logits.method='normkd' (its temperature is "
                          "normkd_t * logit std); leave tau at 1.0")
    _require(lg.p <= lg.store_p, "logits.p", lg.p, f"<= logits.store_p ({lg.store_p}): a store serves only narrower truncations")
    _require(lg.k <= lg.store_k, "logits.k", lg.k, f"<= logits.store_k ({lg.store_k}): a store serves only narrower truncations")
    _require(lg.online_start_frac < lg.online_end_frac, "logits.online_end_frac", lg.online_end_frac,
             f"> logits.online_start_frac ({lg.online_start_frac})")
    _check_sampled(lg, cfg.loss)
    t = cfg.teacher
    if lg.mode == "online_store" and int(lg.online_end_frac * t.max_steps) <= int(lg.online_start_frac * t.max_steps):
        raise ConfigError(f"logits.online_start_frac={lg.online_start_frac} and online_end_frac={lg.online_end_frac} "
                          f"keep no step of teacher.max_steps={t.max_steps}")

    ls = cfg.loss
    _require(ls.alpha_warmup_frac + ls.alpha_decay_frac <= 1, "loss.alpha_decay_frac", ls.alpha_decay_frac,
             f"alpha_warmup_frac + alpha_decay_frac <= 1 (warmup is {ls.alpha_warmup_frac})")
    if ls.wsd_peak is not None:
        _require(ls.alpha_schedule in WSD_ALPHA_SCHEDULES, "loss.wsd_peak", ls.wsd_peak,
                 f"null unless loss.alpha_schedule is wsd_alpha or wsd_beta (it is {ls.alpha_schedule!r})")
    if ls.alpha_schedule == "wsd_beta":
        _require(ls.alpha == 1.0, "loss.alpha", ls.alpha, "1.0 with loss.alpha_schedule='wsd_beta' (alpha = 1 - beta "
                 "starts and ends at 1; beta's peak is loss.wsd_peak, default 0.9)")
    if ls.alpha_schedule == "wsd_alpha" and ls.wsd_peak is not None:
        _require(ls.alpha in (1.0, ls.wsd_peak), "loss.alpha", ls.alpha,
                 f"1.0 or loss.wsd_peak ({ls.wsd_peak}) with wsd_alpha: its peak alpha is loss.wsd_peak")
    # The fused loss never holds the student's [tokens, vocab] logits, which co-training and NormKD need.
    if ls.fused and lg.mode == "cotrain" and ls.alpha > 0:
        raise ConfigError("loss.fused=true is not available with logits.mode='cotrain'; set loss.fused=false")
    if ls.fused and lg.method == "normkd" and ls.alpha > 0:
        raise ConfigError("loss.fused=true cannot be combined with logits.method='normkd' (NormKD needs the student's "
                          "full logits for its temperature); set loss.fused=false")

    o = cfg.optim
    _require(o.warmup_frac + o.decay_frac <= 1, "optim.decay_frac", o.decay_frac,
             f"warmup_frac + decay_frac <= 1 (warmup is {o.warmup_frac})")

    tr = cfg.trainer
    if tr.budget_kind == "none":
        _require(tr.budget == 0, "trainer.budget", tr.budget, "0 while trainer.budget_kind='none' (set budget_kind to "
                 "tokens, flops or wall)")
    else:
        budget_range(tr.budget_kind)("trainer.budget", tr.budget)


SAMPLED_LOSS_KINDS = ("nll", "kld")  # the distances with an unbiased estimator on sampled targets


def _check_sampled(lg: LogitsConfig, ls: LossConfig) -> None:
    """What a sampled store (logits.sampling=sample) is defined for: offline stores in egsqrt or fixed; NLL / KLD
    (the distances whose sampled estimate is unbiased); a fixed temperature, or AdaKD's with self-normalised weights."""
    if lg.sampling != "sample":
        return
    if lg.mode != "offline":
        raise ConfigError(f"logits.sampling='sample' is available with logits.mode='offline' only (got {lg.mode!r}); "
                          "use sampling=topk for online stores")
    if lg.encoding == "ctxans":
        raise ConfigError("logits.encoding='ctxans' does not code sampled stores (their draw counts); use egsqrt or fixed")
    if ls.alpha == 0:
        return
    if ls.kind not in SAMPLED_LOSS_KINDS:
        raise ConfigError(f"loss.kind={ls.kind!r} has no unbiased estimator on sampled targets; allowed with "
                          f"logits.sampling='sample': {', '.join(SAMPLED_LOSS_KINDS)}")
    if lg.method in ("normkd", "wttm"):
        raise ConfigError(f"logits.method={lg.method!r} is not defined on sampled targets; allowed with "
                          "logits.sampling='sample': none, adakd_sd, adakd_h")
    if lg.method != "none" and lg.sampled_tau == "exact":
        raise ConfigError(f"logits.sampled_tau='exact' needs the power sum at one fixed 1/tau, which per-token "
                          f"temperatures (logits.method={lg.method!r}) do not have; set logits.sampled_tau=self_normalised")


def budget_range(kind: str) -> Range:
    """What trainer.budget allows for a budget kind other than none: a number > 0 in the kind's unit."""
    return Range(0, low_open=True, why=BUDGET_UNITS[kind])
