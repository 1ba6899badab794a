"""Evaluation of an exported model through lm-evaluation-harness, by suite, optionally into MLflow.

A *suite* (``pd_lightning/eval_tasks/suites/<name>.yaml``) lists tasks with their shot count and
primary metric; ``local`` runs offline on tasks made from the built-in corpus, ``paper`` names the
paper's benchmarks. Our own task YAMLs live in ``pd_lightning/eval_tasks/tasks`` and are
registered with the harness through ``TaskManager(include_path=...)``, so they work from the
shell too (see ``pd_lightning/eval_tasks/README.md``).

Scores: accuracy-like metrics are reported in percent; the suite's ``average`` is the mean of the
tasks marked ``in_average`` (all percentages). Perplexity-like metrics keep their own unit and
stay out of the average. Tasks run one at a time on one loaded model, so a task whose dataset is
missing offline fails alone with a one-line message while the others run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml

from pd_lightning.errors import ConfigError, DataError, UserError, choice_error, did_you_mean

EVAL_TASKS_DIR = Path(__file__).parent / "eval_tasks"
TASKS_DIR = EVAL_TASKS_DIR / "tasks"  # what `--include_path` points at
SUITES_DIR = EVAL_TASKS_DIR / "suites"
RESULTS_ARTIFACT_DIR = "eval"
RESULTS_ARTIFACT_NAME = "lm_eval_results.json"

# Harness metrics that are fractions in [0, 1] and reported x100; anything else keeps its unit.
PERCENT_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2", "mcc"})
HELDOUT_FEWSHOT_ITEMS = 50  # extra items of the same stream, after the test items, for few-shot use
# In-context learning tasks (`icl_<name>`) log as `eval.icl.<name>`, so `eval.<task>` stays the Average's tasks.
ICL_TASK_PREFIX, ICL_METRIC_PREFIX = "icl_", "eval.icl."
# few-shot task -> its 0-shot twin: `eval.icl.fewshot_gain` = few-shot score − 0-shot score (points)
FEWSHOT_PAIRS = {"icl_facts_5shot": "synth_facts"}
FEWSHOT_GAIN = ICL_METRIC_PREFIX + "fewshot_gain"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Datasets of our own tasks (called by the harness through `custom_dataset: !function ...`)


def synth_mc_dataset(synth_task: str, n: int, corpus_seed: int = 0, **_: Any):
    """Items 0..n-1 of a synthworld multiple-choice task as the test split, the next 50 as train."""
    import datasets

    from pd_lightning.data.corpus import make_eval_items

    # Item i is a pure function of (task, i, seed), so items past n are disjoint few-shot examples.
    items = make_eval_items(synth_task, int(n) + HELDOUT_FEWSHOT_ITEMS, seed=int(corpus_seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items[: int(n)]),
                                 "train": datasets.Dataset.from_list(items[int(n):])})


def synth_heldout_dataset(n: int, corpus_seed: int = 0, **_: Any):
    """The first n held-out documents of the built-in corpus as the test split ({"text": ...})."""
    import datasets

    from pd_lightning.data.corpus import heldout_texts

    texts = heldout_texts(int(n), seed=int(corpus_seed))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in texts])})


def icl_copy_dataset(kind: str, n: int, corpus_seed: int = 0, **_: Any):
    """The copying probe's docs for n sequences (`make_copy_items`) as the test split."""
    import datasets

    from pd_lightning.data.corpus import make_copy_items

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(make_copy_items(kind, int(n), seed=int(corpus_seed)))})


# ----------------------------------------------------------------------------------------------
# Suites


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: its harness name, shots and primary metric."""

    task: str
    metric: Optional[str] = None  # None: the first metric the harness reports for the task
    filter: str = "none"  # harness filter the metric is read under (e.g. gsm8k's "strict-match")
    num_fewshot: Optional[int] = None  # None: the task's own default
    in_average: Optional[bool] = None  # None: True exactly when the metric is a percentage


def available_suites() -> list[str]:
    """Names of the packaged suites."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> list[TaskSpec]:
    """The task specs of a packaged suite (or of a suite YAML file given by path)."""
    path = Path(name)
    if not (path.suffix == ".yaml" and path.is_file()):
        path = SUITES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise choice_error("eval.suite", name, available_suites())
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite {str(path)!r} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    entries = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"suite {str(path)!r} must have a non-empty list under 'tasks'")
    allowed = set(TaskSpec.__dataclass_fields__)
    specs = []
    for entry in entries:
        entry = {"task": entry} if isinstance(entry, str) else entry
        unknown = set(entry) - allowed if isinstance(entry, dict) else {"?"}
        if unknown or "task" not in entry:
            raise ConfigError(f"suite {str(path)!r}: entry {entry!r} must be a task name or a mapping with keys "
                              f"{', '.join(sorted(allowed))} (task required)")
        spec = TaskSpec(**entry)
        _check_spec_types(spec, path)
        specs.append(spec)
    return specs


def _check_spec_types(spec: TaskSpec, path: Path) -> None:
    """One-line errors for suite entries whose values have the wrong type."""
    expected = {
        "task": (lambda v: isinstance(v, str), "a string"),
        "metric": (lambda v: v is None or isinstance(v, str), "a metric name"),
        "filter": (lambda v: isinstance(v, str), "a filter name"),
        "num_fewshot": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                        "a non-negative integer"),
        "in_average": (lambda v: v is None or isinstance(v, bool), "true or false"),
    }
    for key, (ok, what) in expected.items():
        value = getattr(spec, key)
        if not ok(value):
            raise ConfigError(f"suite {str(path)!r}: task {spec.task!r} has {key}={value!r}; expected {what}")


def _suite_specs_by_task() -> dict[str, TaskSpec]:
    """Every packaged suite's spec by task name: a task given with --tasks keeps its suite settings."""
    specs: dict[str, TaskSpec] = {}
    for name in available_suites():
        for spec in load_suite(name):
            specs.setdefault(spec.task, spec)
    return specs


def resolve_tasks(suite: str = "local", tasks: str | list[str] | None = None) -> list[TaskSpec]:
    """The specs to run: the suite's, or the named tasks (which override the suite) if given."""
    if tasks is None:
        return load_suite(suite)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"eval.tasks={tasks!r} names no task; give comma-separated harness task names")
    known = _suite_specs_by_task()
    return [known.get(n, TaskSpec(task=n)) for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------------------------
# The harness


@lru_cache(maxsize=4)
def task_manager(include_defaults: bool = True, corpus_seed: int = 0):
    """A harness TaskManager that knows our tasks (cached: indexing the harness's own takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults,
                       metadata={"corpus_seed": int(corpus_seed)})


def our_task_names() -> list[str]:
    """The tasks defined in our task dir."""
    return sorted(task_manager(False).all_tasks)


def _task_manager_for(names: list[str], corpus_seed: int):
    """Only our tasks -> a TaskManager without the harness's ~13k YAMLs; else the full one."""
    ours = set(our_task_names())
    return task_manager(not set(names) <= ours, corpus_seed)


def _check_task_names(specs: list[TaskSpec], tm) -> None:
    """Refuse unknown task names before any model is loaded."""
    known = set(tm.all_tasks)
    for spec in specs:
        if spec.task not in known:
            raise ConfigError(f"eval.tasks: task {spec.task!r} is unknown to lm-evaluation-harness and to "
                              f"{TASKS_DIR}{did_you_mean(spec.task, known)}; `lm_eval ls tasks` lists the harness's")


# Info files our exports write beside the weights (train.py); the first that tells a seq_len wins.
MODEL_INFO_FILES = ("pdl_run.json", "pdl_teacher.json")


def trained_seq_len(model_dir: str | Path) -> int | None:
    """The sequence length a pd-lightning export was trained at, if its info file tells (else None).

    An info file may carry `seq_len` itself or name its prepared `data` dir, whose manifest has it.
    """
    for info in _export_infos(model_dir):
        try:
            if info.get("seq_len"):
                return int(info["seq_len"])
            if info.get("data"):
                manifest = json.loads((Path(info["data"]) / "manifest.json").read_text(encoding="utf-8"))
                return int(manifest["seq_len"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue  # a moved data dir or an older info file: fall back to the model's own limit
    return None


def _export_infos(model_dir: str | Path):
    """The readable info files (`MODEL_INFO_FILES`, in order) of an export, parsed; unreadable ones are skipped."""
    for name in MODEL_INFO_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            yield info


def _check_model_dir(model_dir: Path) -> None:
    """An exported HF model dir must exist and hold config.json (and a tokenizer)."""
    if not model_dir.is_dir():
        raise DataError(f"model_dir={str(model_dir)!r} is not a directory; expected an exported HF model dir")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"model_dir={str(model_dir)!r} holds no config.json; expected an exported HF model dir "
                        "(save_pretrained of the model and its tokenizer)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:  # cheap (no weights): an unreadable config or a non-causal architecture fails here, in one line
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise DataError(f"model_dir={str(model_dir)!r} has an unreadable config.json: {str(exc).splitlines()[0][:200]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DataError(f"model_dir={str(model_dir)!r} holds a {config.model_type!r} model, which is not a causal LM; "
                        "lm-eval scores causal LMs (AutoModelForCausalLM)")


BACKENDS = ("auto", "hf", "pdl")


def hf_backend_available() -> bool:
    """Whether the harness's own `hf` model can be imported (its module imports accelerate; peft is lazy)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def load_lm(model_dir: str | Path, *, backend: str = "auto", batch_size: int = 16, device: str = "cpu",
            dtype: str = "float32", max_length: int | None = None):
    """The harness model for an exported dir, loaded once for all tasks: (lm, backend name, model_args).

    `hf` is the harness's own HFLM; `pdl` is `PDLCausalLM` below (torch + transformers only);
    `auto` takes `hf` when accelerate is installed (a dependency of pd-lightning), else `pdl`.
    """
    if backend not in BACKENDS:
        raise choice_error("eval.backend", backend, BACKENDS)
    if backend == "auto":
        backend = "hf" if hf_backend_available() else "pdl"
    args = f"pretrained={Path(model_dir).resolve()},dtype={dtype}"
    if max_length is not None:
        args += f",max_length={int(max_length)}"
    if backend == "hf":
        if not hf_backend_available():
            raise ConfigError("eval.backend='hf' needs accelerate (lm-eval's hf extra): pip install 'lm-eval[hf]'; "
                              "or use backend 'pdl'")
        import lm_eval.api.registry
        import lm_eval.models  # noqa: F401  (registers "hf")

        lm = lm_eval.api.registry.get_model("hf").create_from_arg_string(
            args, {"batch_size": batch_size, "device": device})
    else:
        lm = make_pdl_lm(model_dir, batch_size=batch_size, device=device, dtype=dtype, max_length=max_length)
    return lm, backend, args


def make_pdl_lm(model_dir: str | Path, *, batch_size: int = 16, device: str = "cpu", dtype: str = "float32",
                max_length: int | None = None):
    """A `PDLCausalLM` on an exported dir (the class is built on first use: lm_eval imports are slow)."""
    return _pdl_lm_class()(model_dir, batch_size=batch_size, device=device, dtype=dtype, max_length=max_length)


@lru_cache(maxsize=1)
def _pdl_lm_class():
    """Define PDLCausalLM, a harness LM with HFLM's request semantics that needs only torch + transformers."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix, resolve_max_length
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class PDLCausalLM(TemplateLM):
        """A causal HF model dir behind the harness's LM interface.

        Same requests, tokenization (TemplateLM._encode_pair), left truncation to `max_length + 1`
        tokens, rolling windows and prefix token as the harness's HFLM, so scores match it; only the
        log-softmax is restricted to the positions that are scored (no [batch, length, vocab]
        log-probability tensor at large vocabularies).
        """

        def __init__(self, pretrained: str | Path, *, batch_size: int = 16, device: str = "cpu",
                     dtype: str = "float32", max_length: int | None = None):
            super().__init__()
            self.tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
            self.model = AutoModelForCausalLM.from_pretrained(str(pretrained), dtype=getattr(torch, dtype))
            self.model.to(device).eval()
            self._device = torch.device(device)
            self.batch_size = int(batch_size)
            self._max_length = max_length or resolve_max_length(self.model.config, self.tokenizer)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            special = _add_special_kwargs(add_special_tokens, None)
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            ids = self.tokenizer.encode(string, **special)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            # Longest first (like HFLM), so padding per batch is small; results go back in request order.
            order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
            out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                inps, conts = [], []
                for i in idx:
                    _, ctx, cont = requests[i]
                    inps.append((ctx + cont)[-(self._max_length + 1):][:-1])
                    conts.append(cont)
                width = max(len(x) for x in inps)
                batch = torch.full((len(inps), width), self.eot_token_id, dtype=torch.long)
                for row, x in enumerate(inps):
                    batch[row, :len(x)] = torch.tensor(x, dtype=torch.long)  # right padding: causal, no mask needed
                logits = self.model(batch.to(self._device)).logits
                for row, (i, inp, cont) in enumerate(zip(idx, inps, conts)):
                    span = logits[row, len(inp) - len(cont):len(inp)].float()
                    logp = F.log_softmax(span, dim=-1)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                    greedy = bool((logp.argmax(dim=-1) == target).all())
                    out[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (string,) in [req.args for req in requests]:
                windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            results = []
            for req in requests:
                context, gen_kwargs = req.args
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                ids = self.tok_encode(context, left_truncate_len=max(1, self._max_length - max_new))
                generated = self.model.generate(
                    torch.tensor([ids], dtype=torch.long, device=self._device),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self._device),
                    max_new_tokens=max_new, do_sample=do_sample and temperature > 0,
                    **({"temperature": temperature} if do_sample and temperature > 0 else {}),
                    pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id,
                    stop_strings=until or None, tokenizer=self.tokenizer if until else None)
                text = self.tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
                for stop in until:  # generation stops at a stop string; the harness wants it cut off
                    text = text.split(stop)[0]
                results.append(text)
            return results

    return PDLCausalLM


# ----------------------------------------------------------------------------------------------
# Held-out token metrics (pd_lightning.metrics) of an exported model


HELDOUT_ARTIFACT_NAME = "heldout.json"  # beside lm_eval_results.json: metrics, token count, reliability bins


def _is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def heldout_defaults(model_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(data dir, teacher dir) an export's info file names for its held-out metrics, each None if unknown or gone.

    The data dir is the `data` of `pdl_run.json` / `pdl_teacher.json` when it still holds held-out
    shards; the teacher is the run's `heldout_teacher` (what `pdl train` measured against), else its
    store's `teacher`, when that is an HF dir here.
    """
    for info in _export_infos(model_dir):
        data = info.get("data")
        data = Path(data) if data and (Path(data) / "manifest.json").is_file() else None
        teacher = next((Path(t) for t in (info.get("heldout_teacher"), info.get("teacher"))
                        if isinstance(t, str) and _is_hf_dir(t)), None)
        return data, teacher
    return None, None


def check_heldout_sources(data: str | Path, teacher: str | Path | None, sequences: int, bins: int) -> None:
    """One-line errors for a held-out data dir without held-out shards, a teacher that is no HF dir, bad counts."""
    from pd_lightning.data.shards import read_manifest

    if not (Path(data) / "manifest.json").is_file():
        raise DataError(f"heldout data={str(data)!r} is not a prepared data dir (no manifest.json); give the "
                        "data.out of `pdl data prepare`, or --heldout none")
    if int(read_manifest(data).get("splits", {}).get("heldout", {}).get("num_sequences", 0)) < 1:
        raise DataError(f"heldout data={str(data)!r} has no held-out sequences; prepare it with data.heldout_tokens > 0")
    if teacher is not None and not _is_hf_dir(teacher):
        raise DataError(f"heldout teacher={str(teacher)!r} is not an HF model dir (no config.json); give the "
                        "teacher's dir, or --teacher none")
    for name, value in (("eval.heldout_sequences", sequences), ("eval.ece_bins", bins)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def heldout_for_dir(model_dir: str | Path, data: str | Path, teacher: str | Path | None = None, *,
                    device: str = "cpu", max_sequences: int = 256, bins: int = 15) -> dict[str, Any]:
    """The held-out metrics (HeldoutMetrics as a dict) of an exported model on a data dir's held-out shards."""
    import torch
    from transformers import AutoModelForCausalLM

    from pd_lightning.module import heldout_metrics

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()

    model = load(model_dir)
    teacher_model = load(teacher) if teacher is not None else None
    if teacher_model is not None and teacher_model.config.vocab_size != model.config.vocab_size:
        raise DataError(f"heldout teacher={str(teacher)!r} has vocab_size={teacher_model.config.vocab_size}, the model "
                        f"{model.config.vocab_size}; KL and agreement need one vocabulary (or --teacher none)")
    return heldout_metrics(model, data, teacher=teacher_model, max_sequences=max_sequences, bins=bins).as_dict()


def _is_unavailable_dataset(exc: BaseException) -> bool:
    """True when an exception (or its cause) says a dataset could not be found locally or fetched.

    Only errors of the download stack count (so a broken task YAML or a model error still raises):
    connection errors, the datasets / huggingface_hub libraries' own errors, and the datasets
    library's plain FileNotFoundError for a dataset that is not cached.
    """
    while exc is not None:
        module = type(exc).__module__
        if (isinstance(exc, ConnectionError) or module.startswith(("datasets", "huggingface_hub", "requests", "urllib3"))
                or (isinstance(exc, FileNotFoundError) and re.search(r"[Dd]ataset|[Hh]ub|not cached", str(exc)))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _dataset_name(exc: BaseException, task: str, tm) -> str:
    """The hub dataset an availability error is about, from its message or the task's YAML."""
    seen = exc
    while seen is not None:
        match = re.search(r"Couldn't reach '([^']+)'|Dataset '?([\w./-]+?)'? (?:is not cached|doesn't exist)", str(seen))
        if match:
            return match.group(1) or match.group(2)
        seen = seen.__cause__ or seen.__context__
    entry = tm.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    if path:
        try:
            from lm_eval.tasks._yaml_loader import load_yaml

            cfg = load_yaml(path, resolve_func=False)
            if cfg.get("dataset_path"):
                return str(cfg["dataset_path"])
        except Exception:  # the name is only for the message; never fail on it
            pass
    return "its dataset"


def unavailable_message(task: str, dataset: str, exc: BaseException) -> str:
    """One line: which task, which dataset, why, and how to make it available."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"task {task!r}: dataset {dataset!r} is not available locally ({reason}); run once with network access "
            f"(HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) to cache it, or set HF_DATASETS_CACHE / HF_HOME to a cache "
            f"that holds it")


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class TaskScore:
    """The primary metric of one task as reported (percent for accuracy-like metrics)."""

    task: str
    metric: str
    value: float
    stderr: Optional[float]
    percent: bool
    in_average: bool
    num_fewshot: Optional[int]
    samples: Optional[int]
    higher_is_better: Optional[bool]
    extra: dict[str, float] = field(default_factory=dict)  # the task's other metrics, same scaling

    @property
    def unit(self) -> str:
        """'%' or the metric's own name (e.g. bits_per_byte)."""
        return "%" if self.percent else self.metric


def _metric_keys(row: dict[str, Any], filt: str) -> list[str]:
    """Metric names of a harness result row under one filter, in the harness's order."""
    keys = []
    for key in row:
        name, _, f = key.partition(",")
        if f == filt and not name.endswith("_stderr") and name != "alias" and isinstance(row[key], (int, float)):
            keys.append(name)
    return keys


def _number(x: Any) -> Optional[float]:
    """A finite float, or None for the harness's "N/A" and friends."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def score_task(spec: TaskSpec, results: dict[str, Any]) -> TaskScore:
    """Read a task's primary metric (and the others) out of one harness result dict."""
    row = results["results"].get(spec.task)
    if row is None:
        raise DataError(f"lm-eval returned no results for task {spec.task!r}")
    metrics = _metric_keys(row, spec.filter)
    if not metrics:
        filters = sorted({k.partition(",")[2] for k in row if "," in k})
        raise ConfigError(f"task {spec.task!r}: no metric under filter {spec.filter!r}; the harness reported filters "
                          f"{', '.join(filters)}")
    metric = spec.metric or metrics[0]
    if metric not in metrics:
        raise choice_error(f"metric of task {spec.task!r}", metric, metrics)
    percent = metric in PERCENT_METRICS
    scale = 100.0 if percent else 1.0

    def scaled(name: str) -> Optional[float]:
        value = _number(row.get(f"{name},{spec.filter}"))
        return None if value is None else value * (100.0 if name in PERCENT_METRICS else 1.0)

    stderr = _number(row.get(f"{metric}_stderr,{spec.filter}"))
    n = results.get("n-samples", {}).get(spec.task, {}).get("effective")
    if n is None:  # groups: the sum over their subtasks
        subtasks = results.get("group_subtasks", {}).get(spec.task, [])
        counts = [results.get("n-samples", {}).get(s, {}).get("effective") for s in subtasks]
        n = sum(counts) if counts and None not in counts else None
    return TaskScore(
        task=spec.task, metric=metric, value=float(row[f"{metric},{spec.filter}"]) * scale,
        stderr=None if stderr is None else stderr * scale, percent=percent,
        in_average=percent if spec.in_average is None else bool(spec.in_average),
        num_fewshot=_single(ran) if (ran := effective_shots(results)) else spec.num_fewshot, samples=n,
        higher_is_better=results.get("higher_is_better", {}).get(spec.task, {}).get(metric),
        extra={m: v for m in metrics if m != metric and (v := scaled(m)) is not None},
    )


def effective_shots(results: dict[str, Any]) -> dict[str, int]:
    """The shot count each leaf task of one harness call ran at, from the configs the harness built.

    One `simple_evaluate` call per suite task, so every config in `results` belongs to that task (a
    group such as mmlu has one per subject).
    """
    return {name: cfg.get("num_fewshot") for name, cfg in results.get("configs", {}).items()}


def _single(shots: dict[str, int]) -> Optional[int]:
    """The one shot count all leaves ran at (None if they differ or none is known)."""
    values = set(shots.values())
    return values.pop() if len(values) == 1 else None


def _merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One harness-shaped result dict out of several single-task ones."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "samples":
                continue
            if isinstance(value, dict) and key != "config":
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    return merged


def evaluate(
    model_dir: str | Path,
    *,
    suite: str = "local",
    tasks: str | list[str] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    limit: int | float | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    tracking_config_file: str | Path = "mlflow.yaml",
    corpus_seed: int = 0,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    backend: str = "auto",
    quiet: bool = False,
    heldout_data: str | Path | None = None,
    heldout_teacher: str | Path | None = None,
    heldout_sequences: int = 256,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Run a suite (or `tasks`) with lm-eval on an exported HF model dir; log to MLflow if run_id is given.

    Returns {"model_dir", "suite", "tasks": {name: TaskScore as dict}, "average", "failed": {name: message},
    "lm_eval": the merged raw harness results, "heldout": HeldoutMetrics as dict or None,
    "heldout_sources": {"data", "teacher"}}. `limit` caps items per task (harness semantics:
    a fraction if < 1); `num_fewshot` overrides every task's shot count; `max_length` is the
    harness's context window (None: the training seq_len recorded in the export, else the model's).
    `heldout_data`: a prepared data dir whose held-out shards to compute the held-out token metrics
    on (`pd_lightning.metrics`; first `heldout_sequences` sequences, `ece_bins` equal-mass bins),
    with `heldout_teacher` (an HF dir) run live beside the model for agreement and KL; None: skip.
    """
    model_dir = Path(model_dir)
    if limit is not None and not (limit > 0):
        raise ConfigError(f"eval.limit={limit!r} must be positive (items per task, or a fraction < 1)")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size!r} must be a positive integer")
    if backend not in BACKENDS:
        raise choice_error("eval.backend", backend, BACKENDS)
    if max_length is not None and max_length < 2:
        raise ConfigError(f"eval.max_length={max_length!r} must be at least 2 tokens")
    if heldout_data is not None:
        check_heldout_sources(heldout_data, heldout_teacher, heldout_sequences, ece_bins)
    specs = resolve_tasks(suite, tasks)
    tm = _task_manager_for([s.task for s in specs], corpus_seed)
    _check_task_names(specs, tm)
    _check_model_dir(model_dir)
    if run_id is not None:
        _check_run(run_id, tracking_uri, tracking_config_file)  # a bad run id fails before the work

    import lm_eval

    if max_length is None:
        # Our small models extrapolate badly past their training length (measured on a tiny-1m
        # trained on 64-token windows: held-out bits per byte 0.66 with the config's 1024-position
        # window vs 0.47 with 64), so score within the training window when the export records it.
        max_length = trained_seq_len(model_dir)
    from safetensors import SafetensorError

    try:
        lm, backend, model_args = load_lm(model_dir, backend=backend, batch_size=batch_size, device=device,
                                          max_length=max_length)
    except (OSError, SafetensorError) as exc:  # missing, truncated or corrupt weight files
        raise DataError(f"model_dir={str(model_dir)!r} has no loadable weights: {str(exc).splitlines()[0][:200]}") from None
    heldout = None
    if heldout_data is not None:
        heldout = heldout_for_dir(model_dir, heldout_data, heldout_teacher, device=device,
                                  max_sequences=heldout_sequences, bins=ece_bins)
        if not quiet:
            from pd_lightning.metrics import HeldoutMetrics, format_heldout

            print(f"eval: held-out {format_heldout(HeldoutMetrics(**heldout))}", flush=True)
    parts: list[dict[str, Any]] = []
    scores: dict[str, TaskScore] = {}
    failed: dict[str, str] = {}
    for spec in specs:
        shots = num_fewshot if num_fewshot is not None else spec.num_fewshot
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[spec.task], num_fewshot=shots, batch_size=batch_size,
                                          device=device, limit=limit, task_manager=tm, log_samples=False)
        except Exception as exc:
            if not _is_unavailable_dataset(exc):
                raise
            failed[spec.task] = unavailable_message(spec.task, _dataset_name(exc, spec.task, tm), exc)
            log.warning(failed[spec.task])
            continue
        parts.append(out)
        # Per-task shots are the `num_fewshot` of this task's own harness call. The harness never
        # overrides a task whose YAML pins `num_fewshot: 0` (it only logs that), so say so if a
        # leaf ran at another count than asked.
        ran = {leaf: k for leaf, k in effective_shots(out).items() if shots is not None and k != shots}
        if ran:
            log.warning(f"task {spec.task!r}: asked for {shots}-shot, but the harness ran "
                        + ", ".join(f"{leaf} {k}-shot" for leaf, k in sorted(ran.items())[:3])
                        + (f" and {len(ran) - 3} more" if len(ran) > 3 else "")
                        + " (a task config that pins num_fewshot: 0 is never overridden)")
        scores[spec.task] = score_task(spec, out)
        if not quiet:
            print(f"eval: {format_score(scores[spec.task])}", flush=True)

    raw = _merge_results(parts)
    if raw:
        raw.setdefault("config", {}).update(model=backend, model_args=model_args)
    in_avg = [s.value for s in scores.values() if s.in_average]
    result = {
        "model_dir": str(model_dir),
        "suite": None if tasks is not None else suite,
        "backend": backend,
        "max_length": getattr(lm, "max_length", max_length),
        "tasks": {name: {**vars(s), "unit": s.unit} for name, s in scores.items()},
        # Only over tasks that ran; a failed task leaves a smaller average, flagged by `failed`.
        "average": sum(in_avg) / len(in_avg) if in_avg else None,
        "failed": failed,
        "lm_eval": raw,
        "heldout": heldout,
        "heldout_sources": {"data": None if heldout_data is None else str(heldout_data),
                            "teacher": None if heldout_teacher is None else str(heldout_teacher)},
    }
    if run_id is not None:
        log_to_mlflow(result, run_id, tracking_uri=tracking_uri, tracking_config_file=tracking_config_file)
    return result


def evaluate_with_config(model_dir: str | Path, cfg, *, run_id: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """`evaluate` with the `eval` and `tracking` sections of a PDLConfig (for train and sweep code)."""
    e, t = cfg.eval, cfg.tracking
    # The local tasks must come from the same corpus world the model was trained on.
    corpus_seed = cfg.data.corpus_seed if cfg.data.source == "builtin" else 0
    return evaluate(model_dir, suite=e.suite, tasks=e.tasks, batch_size=e.batch_size, device=e.device, limit=e.limit,
                    run_id=run_id, tracking_uri=t.tracking_uri, tracking_config_file=t.config_file,
                    corpus_seed=corpus_seed, quiet=quiet)


def format_score(score: TaskScore) -> str:
    """`task  metric  value ± stderr unit` on one line."""
    err = f" ± {score.stderr:.2f}" if score.stderr is not None else ""
    unit = "%" if score.percent else ""
    shots = f"{score.num_fewshot}-shot, " if score.num_fewshot is not None else ""
    return f"{score.task}: {score.metric} {score.value:.2f}{err}{unit} ({shots}n={score.samples})"


# ----------------------------------------------------------------------------------------------
# MLflow


def resolve_tracking_uri(tracking_uri: str | None = None, config_file: str | Path = "mlflow.yaml") -> str:
    """The explicit URI, else the config file's `tracking_uri`, else a sqlite file in the working dir."""
    from pd_lightning.config import PDLConfig, TrackingConfig
    from pd_lightning.tracking import tracking_settings

    cfg = PDLConfig(tracking=TrackingConfig(config_file=str(config_file), tracking_uri=tracking_uri))
    return tracking_settings(cfg)["tracking_uri"]


def _mlflow_client(tracking_uri: str | None, config_file: str | Path = "mlflow.yaml"):
    """An MlflowClient on an explicit URI."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri, config_file))


def task_key(task: str) -> str:
    """The MLflow name of a task's primary score: `eval.<task>`, or `eval.icl.<name>` for a task `icl_<name>`."""
    if task.startswith(ICL_TASK_PREFIX):
        return ICL_METRIC_PREFIX + task[len(ICL_TASK_PREFIX):]
    return f"eval.{task}"


def fewshot_gains(result: dict[str, Any]) -> dict[str, float]:
    """`eval.icl.fewshot_gain`: few-shot minus 0-shot score (points), when both tasks of a FEWSHOT_PAIRS entry ran."""
    tasks = result["tasks"]
    return {FEWSHOT_GAIN: tasks[few]["value"] - tasks[zero]["value"]
            for few, zero in FEWSHOT_PAIRS.items() if few in tasks and zero in tasks}


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of an evaluation result.

    Percent tasks: `eval.<task>` and `eval.<task>.stderr`. Other metrics (perplexities) carry their
    name, `eval.<task>.<metric>`, so every `eval.<task>` is a percentage. Plus `eval.average`.
    In-context learning tasks `icl_<name>` go under `eval.icl.<name>` (they are not in the Average),
    with `eval.icl.fewshot_gain`; held-out token metrics, when computed, are `eval.heldout.<name>`.
    """
    items: dict[str, float] = {}
    for name, s in result["tasks"].items():
        key = task_key(name) if s["percent"] else f"{task_key(name)}.{s['metric']}"
        items[key] = s["value"]
        if s["stderr"] is not None:
            items[f"{key}.stderr"] = s["stderr"]
        if not s["percent"]:
            items.update({f"{task_key(name)}.{m}": v for m, v in s["extra"].items()})
    items.update(fewshot_gains(result))
    if result["average"] is not None:
        items["eval.average"] = result["average"]
    if result.get("heldout"):
        from pd_lightning.metrics import HeldoutMetrics

        items.update(HeldoutMetrics(**result["heldout"]).mlflow_metrics())
    return items


def _check_run(run_id: str, tracking_uri: str | None, config_file: str | Path) -> None:
    """Refuse a run id the tracking store does not know, in one line."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri, config_file)
    try:
        _mlflow_client(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run_id={run_id!r} is not a run in the MLflow store {uri}; give the training run's id "
                          "(printed by `pdl train`, or in the MLflow UI)") from None


def log_to_mlflow(result: dict[str, Any], run_id: str, *, tracking_uri: str | None = None,
                  tracking_config_file: str | Path = "mlflow.yaml", step: int = 0) -> None:
    """Log an evaluation's metrics to an existing MLflow run, and the raw harness JSON as an artifact.

    `step` is the training step the scores belong to (a run scored at several checkpoints keeps a
    history; MLflow's latest value is the one of the highest step).
    """
    from lm_eval.utils import handle_non_serializable

    client = _mlflow_client(tracking_uri, tracking_config_file)
    for key, value in metric_items(result).items():
        client.log_metric(run_id, key, value, step=step)
    # Tags say what the eval.* numbers mean: which suite and backend, and which tasks are missing
    # from eval.average because their data could not be loaded.
    client.set_tag(run_id, "eval.suite", result["suite"] or "custom")
    client.set_tag(run_id, "eval.backend", result["backend"])
    client.set_tag(run_id, "eval.failed", ",".join(result["failed"]))
    with tempfile.TemporaryDirectory(prefix="pdl-eval-") as tmp:
        path = Path(tmp) / RESULTS_ARTIFACT_NAME
        path.write_text(json.dumps(result["lm_eval"], indent=2, default=handle_non_serializable, ensure_ascii=False),
                        encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=RESULTS_ARTIFACT_DIR)
    if result.get("heldout"):
        log_heldout(client, run_id, result["heldout"], teacher=result["heldout_sources"]["teacher"], step=step,
                    metrics=False)


def log_heldout(client, run_id: str, heldout: dict[str, Any], *, teacher: str | None, step: int = 0,
                metrics: bool = True) -> None:
    """Held-out metrics to a run: `eval.heldout.*` metrics, the tag `eval.heldout.teacher` (the teacher they
    were measured against, "none" without one) and `eval/heldout.json` (metrics, tokens, reliability bins)."""
    from pd_lightning.metrics import HeldoutMetrics

    if metrics:
        for key, value in HeldoutMetrics(**heldout).mlflow_metrics().items():
            client.log_metric(run_id, key, value, step=step)
    client.set_tag(run_id, "eval.heldout.teacher", str(teacher) if teacher else "none")
    with tempfile.TemporaryDirectory(prefix="pdl-eval-") as tmp:
        path = Path(tmp) / HELDOUT_ARTIFACT_NAME
        path.write_text(json.dumps({**heldout, "teacher": str(teacher) if teacher else None, "step": step}, indent=2),
                        encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=RESULTS_ARTIFACT_DIR)


# ----------------------------------------------------------------------------------------------
# CLI (`pdl eval`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pdl eval`."""
    from pd_lightning.config import EvalConfig

    d = EvalConfig()
    parser.add_argument("model_dir", help="an exported HF model dir (model + tokenizer)")
    parser.add_argument("--suite", default=d.suite,
                        help=f"task suite: {', '.join(available_suites())} (default {d.suite}) or a suite YAML file")
    parser.add_argument("--tasks", default=d.tasks,
                        help="comma-separated lm-eval task names; overrides --suite (e.g. synth_facts,hellaswag)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:0, ... (default cpu)")
    parser.add_argument("--limit", type=float, default=d.limit,
                        help="items per task (a fraction if < 1); for smoke tests, scores are then noisier")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override every task's shot count")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in tokens (default: the seq_len the export was trained at if "
                             "recorded, else the model's max_position_embeddings)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="harness model: hf (lm-eval's HFLM, needs accelerate), pdl (torch + transformers "
                             "only, same scores), auto (hf if accelerate is installed, else pdl)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="world of the built-in corpus for the local tasks")
    parser.add_argument("--run-id", default=None, help="MLflow run to log eval.* metrics and the results JSON to")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: tracking_uri of ./mlflow.yaml, else sqlite:///mlflow.db)")
    parser.add_argument("--output", default=None, help="also write the result (scores + raw lm-eval JSON) here")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    parser.add_argument("--heldout", default="auto",
                        help="held-out token metrics (loss, top-1 acc, ECE, Brier; pd_lightning.metrics) on this "
                             "prepared data dir's held-out shards; auto (default): the data dir the export's info "
                             "file names, skipped if it has none; none: skip")
    parser.add_argument("--teacher", default="auto",
                        help="teacher HF dir run beside the model on the held-out stream for top-1 agreement and "
                             "KL(teacher || student); auto (default): the teacher the run measured against or its "
                             "store's teacher, if present; none: skip")
    parser.add_argument("--heldout-sequences", type=int, default=256, help="held-out sequences to score (default 256)")
    parser.add_argument("--ece-bins", type=int, default=15, help="equal-mass bins of the ECE (default 15)")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`pdl eval`: evaluate, print, write; missing datasets -> UserError (exit 2) after the rest ran."""
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise ConfigError(f"--limit={limit!r} must be a whole number of items or a fraction below 1")
        limit = int(limit)
    data, teacher = resolve_heldout_args(args.model_dir, args.heldout, args.teacher)
    result = evaluate(args.model_dir, suite=args.suite, tasks=args.tasks, batch_size=args.batch_size,
                      device=args.device, limit=limit, run_id=args.run_id, tracking_uri=args.tracking_uri,
                      corpus_seed=args.corpus_seed, max_length=args.max_length, num_fewshot=args.num_fewshot,
                      backend=args.backend, quiet=args.json, heldout_data=data, heldout_teacher=teacher,
                      heldout_sequences=args.heldout_sequences, ece_bins=args.ece_bins)
    if args.output:
        from lm_eval.utils import handle_non_serializable

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=handle_non_serializable, ensure_ascii=False),
                       encoding="utf-8")
    if args.json:
        keys = ("model_dir", "suite", "backend", "max_length", "tasks", "average", "failed", "heldout",
                "heldout_sources")
        print(json.dumps({k: result[k] for k in keys}, indent=2))
    else:
        print(format_table(result))
    if result["failed"]:
        raise UserError(f"{len(result['failed'])} task(s) could not run: " + "; ".join(result["failed"].values()))
    return result


def resolve_heldout_args(model_dir: str | Path, heldout: str, teacher: str) -> tuple[Path | None, Path | None]:
    """`--heldout` / `--teacher` (auto, none or a path) -> (data dir or None, teacher dir or None)."""
    data_auto, teacher_auto = heldout_defaults(model_dir)
    data = {"auto": data_auto, "none": None}.get(heldout, Path(heldout))
    if data is None:
        return None, None
    return data, {"auto": teacher_auto, "none": None}.get(teacher, Path(teacher))


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the scores, the average, the failures and the held-out and in-context metrics."""
    rows = [("task", "metric", "shots", "n", "value", "stderr")]
    for name, s in result["tasks"].items():
        rows.append((name, s["metric"] + (" (%)" if s["percent"] else ""), str(s["num_fewshot"]), str(s["samples"]),
                     f"{s['value']:.2f}", "" if s["stderr"] is None else f"{s['stderr']:.2f}"))
    for name in result["failed"]:
        rows.append((name, "-", "-", "-", "failed", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    avg = result["average"]
    lines.append(f"average (accuracy tasks, %): {'-' if avg is None else f'{avg:.2f}'}")
    for key, gain in fewshot_gains(result).items():
        pairs = ", ".join(f"{few} - {zero}" for few, zero in FEWSHOT_PAIRS.items())
        lines.append(f"{key} ({pairs}): {gain:+.2f} points")
    if result.get("heldout"):
        from pd_lightning.metrics import HeldoutMetrics

        lines.append("")
        lines.append(format_heldout_block(HeldoutMetrics(**result["heldout"]), result["heldout_sources"]))
    return "\n".join(lines)


def format_heldout_block(m, sources: dict[str, Any]) -> str:
    """The held-out token metrics as `name  value` lines under a header naming the data and the teacher."""
    rows = [("eval.heldout.loss", f"{m.loss:.4f}", "nats/token"), ("eval.heldout.top1_acc", f"{100 * m.top1_acc:.2f}", "%"),
            ("eval.heldout.ece", f"{m.ece:.4f}", f"top-1, {len(m.bins)} equal-mass bins"),
            ("eval.heldout.brier", f"{m.brier:.4f}", "full vocabulary")]
    if m.teacher_kl is not None:
        rows += [("eval.heldout.teacher_top1_agree", f"{100 * m.teacher_top1_agree:.2f}", "%"),
                 ("eval.heldout.teacher_kl", f"{m.teacher_kl:.4f}", "nats/token, KL(teacher || model)")]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    head = f"held-out token metrics ({m.tokens:,} tokens of {sources.get('data')}; teacher {sources.get('teacher') or 'none'}):"
    return "\n".join([head] + [f"  {a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}" for a, b, c in rows])
