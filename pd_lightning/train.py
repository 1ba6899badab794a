"""Training entry points: `pdl teacher train` (pre-train a teacher) and `pdl train` (one LM or PD run).

A `pdl train` run is a complete MLflow record: params = the flattened resolved config, tags = the
design-space coordinates, per-step metrics, and the resolved config and exported student as
artifacts. It checkpoints every `trainer.checkpoint_every_n_steps` steps and on exceptions; running
the same command again after a kill resumes from the last checkpoint in the same MLflow run and,
on CPU, ends with the weights an uninterrupted run would have.

Cost (issue 11): every run also logs what it cost (`pd_lightning.cost` FLOP convention), as metrics
at its last step:

    cost.student_flops            student training FLOPs: (6·N + 6·d_model·V + 6·n_layers·seq_len·d_attn)
                                  × tokens (LM head included; pd_lightning.cost)
    cost.teacher_flops            teacher FLOPs charged to this run: offline / online-store logits =
                                  the store's generation FLOPs × (sequences this run read / sequences
                                  in the store), i.e. the teacher's forward over the tokens consumed
                                  (a run that reads the store twice is charged twice); co-training =
                                  the teacher's own training FLOPs; LM-only = 0
    cost.teacher_flops_undivided  the store's whole generation FLOPs (co-training: = teacher_flops).
                                  Analysis may divide it by the number of runs sharing the store
                                  instead; that number is unknown when a run ends.
    cost.total_flops              student + teacher_flops
    cost.store_bytes_read         estimate: the store's mean bytes per sequence × sequences read
    cost.wall_seconds             time inside the training loop (validation, checkpoints and periodic
                                  exports included; model build and final export not), summed over
                                  resumed sessions (kept in the checkpoints)
    cost.tokens_per_second        tokens / cost.wall_seconds
    cost.heldout_seconds          the final held-out pass (loss + eval.heldout.* metrics, the teacher's
                                  forward and load included; pd_lightning.metrics), outside wall_seconds
    store.entries_per_token, store.bytes_per_token   the store's, at its own (loosest) truncation

the tag `cost.device` ("cpu", "cuda:<GPU name>", " x<world size>" when distributed) and the tag
`cost.flops_convention` (pd_lightning.cost.FLOP_CONVENTION; absent on runs costed without the LM head).

Budgets: `trainer.budget_kind=tokens|flops` turns `trainer.budget` into max_steps (replacing
`trainer.max_steps`, so the LR and α schedules span the budget): the largest step count whose
tokens, or student + teacher FLOPs, fit. PD and LM runs at one FLOP budget therefore stop at equal
total FLOPs, within one step's FLOPs. `budget_kind=wall` stops the run when its wall seconds reach
the budget; its schedules still span `trainer.max_steps`, so a wall-stopped run ends mid-schedule
(LR not decayed): set max_steps near the steps the budget allows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pd_lightning import cost
from pd_lightning.config import LossConfig, OptimConfig, PDLConfig, config_hash, flatten, to_yaml
from pd_lightning.data.shards import read_manifest
from pd_lightning.data.tokenizer import load_tokenizer
from pd_lightning.errors import ConfigError, DataError, UserError
from pd_lightning.logits.processing import missing_power_exponents, power_exponents_for
from pd_lightning.models import build_model
from pd_lightning.module import (DistillationDataModule, DistillationModule, ProgressLines, TargetSpec, heldout_loss,
                                 heldout_metrics)

TEACHER_INFO = "pdl_teacher.json"
RUN_INFO = "pdl_run.json"
SEQUENCE_MAP = "sequence_map.npy"
EXCEPTION_CHECKPOINT = "on_exception.ckpt"
EXPORTS = "exports"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint (periodic or written on an exception), or None."""
    found = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def check_checkpoint(path: Path) -> None:
    """Refuse, before the fit, a checkpoint that torch.load(weights_only=True) rejects: pickled code or a torn file.

    Inside the fit the failure would be a traceback, and its exception checkpoint (untrained weights)
    would become the next resume point.
    """
    try:
        torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (torn zip), EOFError, ...
        text = " ".join(str(exc).split())
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        why = (f"it holds a pickled object ({found.group(1)}) that weights_only=True refuses to load" if found
               else f"{type(exc).__name__}: {text[:160]}")
        raise DataError(f"checkpoint {str(path)!r} cannot be loaded safely: {why}; delete it to resume from an "
                        "earlier checkpoint, or delete trainer.out to start over") from None


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run is marked FAILED."""

    exit_code = 3


def check_devices(cfg: PDLConfig) -> None:
    """Refuse engineering settings this machine cannot run, before any run or file is created."""
    tr = cfg.trainer
    if tr.strategy == "fsdp" and (tr.accelerator == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(f"trainer.strategy='fsdp' needs CUDA GPUs (Lightning's FSDP runs on GPUs only) and none is "
                          f"visible here (trainer.accelerator={tr.accelerator!r}); use ddp or auto on CPU")
    if tr.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={tr.accelerator!r} but no CUDA GPU is visible; use auto or cpu")


def build_trainer(cfg: PDLConfig, max_steps: int, *, callbacks: list | None = None, logger=False,
                  validate: bool = False, checkpoints: bool = True, description: str = "train") -> pl.Trainer:
    """A Lightning Trainer from the engineering section of the config (strategy, precision, devices)."""
    tr = cfg.trainer
    callbacks = list(callbacks or [])
    if not sys.stderr.isatty():  # a bar on a terminal; plain lines in logs and CI
        callbacks.append(ProgressLines(description))
    strategy = tr.strategy
    if strategy == "fsdp":
        check_devices(cfg)
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # Shard each decoder layer as one FSDP unit: the standard wrapping for Llama-shaped models.
        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
                                sharding_strategy="FULL_SHARD", state_dict_type="full")
    return pl.Trainer(
        max_steps=max_steps,
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=strategy,
        precision=tr.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=tr.accumulate_grad_batches,
        log_every_n_steps=tr.log_every_n_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpoints and any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=tr.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=tr.val_batches if validate else 0,
        deterministic=False,
        use_distributed_sampler=False,  # DistillationDataModule shards its endless stream by rank
    )


def _save_hf_dir(model: torch.nn.Module, tokenizer, out: Path, info: dict, state_dict: dict | None = None) -> None:
    """Export an HF model dir (weights + tokenizer + our info JSON) atomically; `state_dict` overrides the weights."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    (tmp / info.pop("_file")).write_text(json.dumps(info, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _model_for_data(preset: str, manifest: dict, vocab_size: int, seed: int) -> torch.nn.Module:
    eos = int(manifest["eos_token_id"])
    return build_model(preset, vocab_size, seed=seed, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                       max_seq_len=max(int(manifest["seq_len"]), 1024))


def train_teacher(cfg: PDLConfig, *, quiet: bool = False) -> Path:
    """Pre-train `teacher.preset` on `data.out` for `teacher.max_steps` steps; save an HF dir to `teacher.out`."""
    t = cfg.teacher
    check_devices(cfg)
    data_dir = Path(cfg.data.out)
    manifest = read_manifest(data_dir)
    out = Path(t.out)
    lg = cfg.logits
    online = (lg.mode, lg.store, lg.store_p, lg.store_k, lg.online_start_frac, lg.online_end_frac,
              lg.sequences_per_shard) if lg.mode == "online_store" else None
    if online and power_exponents_for(lg):  # (appended only when set: earlier online teachers keep their hash)
        online += (power_exponents_for(lg),)
    digest = config_hash(t.preset, t.max_steps, t.batch_size, t.lr, t.warmup_frac, t.seed, manifest["config_hash"],
                         cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps,
                         cfg.optim.min_lr_ratio, cfg.optim.grad_clip, online)
    info_path = out / TEACHER_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("config_hash") == digest:
            if not quiet:
                print(f"teacher: {out} is already trained (config {digest}); nothing to do")
            return out
        raise ConfigError(f"teacher.out={str(out)!r} already holds a different teacher (config {info.get('config_hash')}); "
                          "choose another teacher.out or delete it")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"teacher.out={str(out)!r} is a non-empty directory without {TEACHER_INFO}; choose an empty one")

    tokenizer = load_tokenizer(data_dir / "tokenizer", what="data tokenizer")
    seq_len = int(manifest["seq_len"])
    pl.seed_everything(t.seed, workers=True, verbose=False)
    model = _model_for_data(t.preset, manifest, int(manifest["vocab_size"]), t.seed)
    params = sum(p.numel() for p in model.parameters())
    before = heldout_loss(model, data_dir)
    module = DistillationModule(model, loss=LossConfig(alpha=0.0), optim=teacher_optim(cfg), max_steps=t.max_steps)
    data = DistillationDataModule(data_dir, t.batch_size, t.seed, num_workers=cfg.trainer.num_workers)
    callbacks = []
    if cfg.logits.mode == "online_store":
        callbacks.append(_online_store_writer(cfg, manifest, out, digest))
    if not quiet:
        print(f"teacher: pre-training {t.preset} ({params / 1e6:.2f}M params) for {t.max_steps} steps x "
              f"{t.batch_size} x {seq_len} tokens on {data_dir}; held-out loss before {before:.4f}")
        if callbacks:
            w = callbacks[0]
            print(f"teacher: writing its top-{cfg.logits.store_p}-{cfg.logits.store_k} logits of steps "
                  f"[{w.start_step}, {w.end_step}) into {cfg.logits.store} (online logits)")
    started = time.perf_counter()
    build_trainer(cfg, t.max_steps, callbacks=callbacks, checkpoints=False, description="teacher").fit(module, datamodule=data)
    if callbacks:
        w = callbacks[0]
        shape = cost.model_cost_shape(module.model)
        # Charged to students: the teacher's forward over the saved window (paid inside its own training,
        # so this is what an offline pass over the same sequences would cost); its whole training beside it.
        w.async_writer.writer.finalize(meta={
            "online": True, "teacher_steps": [w.start_step, w.end_step],
            **cost.store_cost_meta(shape, w.async_writer.writer.num_sequences, seq_len),
            "teacher_training_flops": shape.training_flops(seq_len, t.max_steps * t.batch_size * seq_len),
            "sequence_map": SEQUENCE_MAP, "data": str(data_dir.resolve()), "data_hash": manifest["config_hash"]})
    seconds = time.perf_counter() - started
    model = module.model.to(torch.float32).cpu()
    after = heldout_loss(model, data_dir)
    tokens = t.max_steps * t.batch_size * seq_len
    _save_hf_dir(model, tokenizer, out, {
        "_file": TEACHER_INFO, "config_hash": digest, "preset": t.preset, "params": params, "steps": t.max_steps,
        "tokens": tokens, "data": str(data_dir.resolve()), "data_hash": manifest["config_hash"],
        "tokenizer_hash": manifest["tokenizer_hash"], "heldout_loss_before": before, "heldout_loss_after": after,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
    })
    if not quiet:
        print(f"teacher: {tokens:,} tokens in {seconds:.0f}s ({tokens / seconds:,.0f} tokens/s); held-out loss "
              f"{before:.4f} -> {after:.4f}; saved to {out}")
    return out


def teacher_optim(cfg: PDLConfig) -> OptimConfig:
    """The teacher's optimiser: the optim section with the teacher's LR and warmup, cosine decay."""
    return dataclasses.replace(cfg.optim, lr=cfg.teacher.lr, warmup_frac=cfg.teacher.warmup_frac, lr_schedule="cosine")


def _online_store_writer(cfg: PDLConfig, manifest: dict, teacher_out: Path, teacher_hash: str):
    """The callback that writes an online store while the teacher trains (fresh store, sequence map saved)."""
    import numpy as np

    from pd_lightning.logits.store import LogitStoreWriter, store_write_error
    from pd_lightning.module import BatchStepSampler, OnlineLogitWriter

    t, lg = cfg.teacher, cfg.logits
    store = Path(lg.store)
    # a full disk or an unwritable store: one line, as for `pdl logits generate` (the same command starts over)
    rerun = "the teacher trains again from its first step and rewrites this online store"
    if store.exists():
        if any(p for p in store.iterdir() if not p.name.startswith(("shard-", "manifest", SEQUENCE_MAP))):
            raise ConfigError(f"logits.store={str(store)!r} holds files that are not a logit store; choose another dir")
        try:
            shutil.rmtree(store)  # a partial online store from an interrupted teacher run: the teacher restarts too
        except OSError as e:
            raise store_write_error(store, e, "removing the partial online store", rerun) from None
    start, end = int(lg.online_start_frac * t.max_steps), int(lg.online_end_frac * t.max_steps)
    if end <= start:
        raise ConfigError(f"logits.online_start_frac={lg.online_start_frac} and online_end_frac={lg.online_end_frac} "
                          f"keep no step of teacher.max_steps={t.max_steps}")
    n_train = int(manifest["splits"]["train"]["num_sequences"])
    stream = iter(BatchStepSampler(n_train, t.batch_size, t.seed, start_batch=start))
    sequence_map = np.array([next(stream) for _ in range(end - start)], dtype=np.int64).reshape(-1)
    try:
        store.mkdir(parents=True)
        np.save(store / SEQUENCE_MAP, sequence_map, allow_pickle=False)
    except OSError as e:
        raise store_write_error(store, e, f"writing {SEQUENCE_MAP}", rerun) from None
    writer = LogitStoreWriter(
        store, vocab_size=int(manifest["vocab_size"]), p=lg.store_p, k=lg.store_k,
        positions_per_sequence=int(manifest["seq_len"]) - 1, num_sequences=len(sequence_map),
        sequences_per_shard=lg.sequences_per_shard, teacher=str(teacher_out.resolve()), teacher_config_hash=teacher_hash,
        tokenizer_hash=manifest["tokenizer_hash"], rerun=rerun, power_exponents=power_exponents_for(lg),
        encoding=lg.encoding)
    return OnlineLogitWriter(writer, start, end, t.batch_size)


def load_sequence_map(store: Path):
    """An online store's map from store sequence to token-shard sequence (None for offline stores)."""
    import numpy as np

    path = store / SEQUENCE_MAP
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _check_store(cfg: PDLConfig, data_manifest: dict) -> tuple[dict, int]:
    """Open the store's manifest and refuse one that does not fit the shards or the requested truncation."""
    from pd_lightning.logits.store import LogitStore, check_compatible

    store = Path(cfg.logits.store)
    if not (store / "manifest.json").is_file():
        raise DataError(f"logits.store={str(store)!r} is not a finished logit store; run `pdl logits generate` "
                        "first (or set loss.alpha=0 for the LM-only baseline)")
    m = LogitStore(store).manifest  # also refuses a missing or truncated shard before any run exists
    check_compatible(m, int(m["vocab_size"]), data_manifest["tokenizer_hash"])
    if int(m["vocab_size"]) < int(data_manifest["vocab_size"]):
        raise DataError(f"logit store vocab_size={m['vocab_size']} is smaller than the shards' vocabulary "
                        f"({data_manifest['vocab_size']}); regenerate the store with the student's tokenizer")
    if int(m["vocab_size"]) > int(data_manifest["vocab_size"]):  # students are built at the tokenizer's ids
        raise DataError(f"logit store vocab_size={m['vocab_size']} is larger than the shards' vocabulary "
                        f"({data_manifest['vocab_size']} token ids): it was generated from a padded teacher vocabulary "
                        "before padded rows were masked, so its entries carry their probability mass; regenerate it "
                        "with `pdl logits generate`")
    missing = missing_power_exponents(cfg.logits, m.get("power_exponents", []))
    if missing:
        a = ", ".join(f"{x:g}" for x in missing)
        raise ConfigError(f"logits.method=wttm (wttm_gamma={cfg.logits.wttm_gamma:g}, tau={cfg.logits.tau:g}) needs "
                          f"log Σ q^a for a = {a} per token, which logits.store={str(store)!r} does not keep "
                          f"(it keeps {m.get('power_exponents') or 'none'}); regenerate the store with "
                          f"logits.store_power_exponents=[{a}] or set logits.wttm_weight=support")
    meta = m.get("meta") or {}
    wrong_data = meta.get("data_hash") not in (None, data_manifest["config_hash"])
    if wrong_data or int(m["positions_per_sequence"]) != int(data_manifest["seq_len"]) - 1:
        raise DataError(f"logits.store={str(store)!r} was generated over other token shards (data {meta.get('data_hash')}, "
                        f"these are {data_manifest['config_hash']}); regenerate it for data.out={cfg.data.out!r}")
    online = load_sequence_map(store)
    if online is not None:
        if len(online) != int(m["num_sequences"]) or online.max(initial=0) >= int(data_manifest["splits"]["train"]["num_sequences"]):
            raise DataError(f"logits.store={str(store)!r} has a sequence map that does not fit its shards or data.out")
    elif int(m["num_sequences"]) != int(data_manifest["splits"]["train"]["num_sequences"]):
        raise DataError(f"logits.store={str(store)!r} has {m['num_sequences']} sequences but data.out has "
                        f"{data_manifest['splits']['train']['num_sequences']}; regenerate the store")
    if cfg.logits.p > float(m["p"]) or cfg.logits.k > int(m["k"]):
        raise ConfigError(f"logits.p={cfg.logits.p}, logits.k={cfg.logits.k} exceed the store's top-{m['p']}-{m['k']}; "
                          "a store serves only narrower truncations: generate a looser one")
    return m, int(m["vocab_size"])


def _mlflow_run(cfg: PDLConfig, out: Path, digest: str, teacher: str | None, extra_tags: dict[str, str] | None = None):
    """Create (or reopen, on resume) the run's MLflow logger; returns (logger, resumed)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from pd_lightning.tracking import design_tags, tracking_settings

    s = tracking_settings(cfg)
    client = MlflowClient(tracking_uri=s["tracking_uri"])
    if client.get_experiment_by_name(s["experiment"]) is None:
        client.create_experiment(s["experiment"], artifact_location=s["artifact_location"])
    state_path = out / "run.json"
    run_id = None
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("config_hash") != digest:
            raise ConfigError(f"trainer.out={str(out)!r} holds a run of another config ({state.get('config_hash')}, this "
                              f"one is {digest}); choose another trainer.out or delete it")
        run_id = state["run_id"]
    tags = design_tags(cfg, teacher=teacher) | {"pd.config_hash": digest} | dict(extra_tags or {})
    logger = MLFlowLogger(experiment_name=s["experiment"], run_name=cfg.tracking.run_name, tracking_uri=s["tracking_uri"],
                          tags=tags, run_id=run_id, artifact_location=s["artifact_location"])
    if run_id is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"run_id": logger.run_id, "config_hash": digest}))
        logger.log_hyperparams(flatten(cfg))
    return logger, run_id is not None


class WallClock(pl.Callback):
    """Seconds spent in the training loop, carried across resumes in the checkpoint; stops a wall budget.

    With a budget, every rank stops once any rank's clock reaches it (a collective each step).
    """

    def __init__(self, budget_seconds: float | None = None):
        self.budget_seconds = budget_seconds
        self.before = 0.0  # seconds of earlier sessions, restored from the checkpoint
        self._started: float | None = None

    def elapsed(self) -> float:
        """Training-loop seconds so far, earlier sessions included."""
        return self.before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_start(self, trainer, module) -> None:
        self._started = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self.before, self._started = self.elapsed(), None  # stop: the held-out loss and export are not training

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.budget_seconds is not None:
            over = trainer.strategy.reduce_boolean_decision(self.elapsed() >= self.budget_seconds, all=False)
            trainer.should_stop = trainer.should_stop or over

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict.get("elapsed", 0.0))


class PeriodicExport(pl.Callback):
    """Every `every` steps, export the student as an HF dir to `<out>/exports/step-XXXXXXXX` (Table 12 checkpoints).

    Every rank gathers the weights (a collective under FSDP); rank 0 writes, atomically.
    """

    def __init__(self, every: int, out: Path, tokenizer, info: dict, tokens_per_step: int):
        self.every, self.out, self.tokenizer = every, out, tokenizer
        self.info, self.tokens_per_step = info, tokens_per_step

    def on_train_start(self, trainer, module) -> None:
        self._last = trainer.global_step  # a resumed run: the export of its checkpoint's step exists already

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step == self._last:
            return
        self._last = step  # with gradient accumulation the hook fires on every micro-batch of the step
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in trainer.strategy.lightning_module_state_dict().items()
                 if k.startswith(prefix)}  # the student only: a co-trained teacher sits under "teacher."
        if trainer.is_global_zero:
            _save_hf_dir(module.model, self.tokenizer, export_dir(self.out, step),
                         {**self.info, "_file": RUN_INFO, "step": step, "tokens": step * self.tokens_per_step},
                         state_dict=state)


def export_dir(out: Path, step: int) -> Path:
    """Where the periodic export of step `step` of the run in `out` goes."""
    return out / EXPORTS / f"step-{step:08d}"


def list_exports(out: Path) -> list[dict]:
    """The finished periodic exports of the run in `out`: [{step, tokens, path}], by step."""
    found = []
    for d in sorted((out / EXPORTS).glob("step-*")) if (out / EXPORTS).is_dir() else []:
        info_file = d / RUN_INFO
        if info_file.is_file():  # temp dirs of an interrupted export have no final name, so never match
            info = json.loads(info_file.read_text())
            found.append({"step": int(info["step"]), "tokens": int(info["tokens"]), "path": str(d)})
    return found


def _device_tag(trainer: pl.Trainer) -> str:
    """"cpu" or "cuda:<GPU name>", with " x<world size>" for a distributed run."""
    device = trainer.strategy.root_device
    name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    return name + (f" x{trainer.world_size}" if trainer.world_size > 1 else "")


def _teacher_cost(cfg: PDLConfig, store_manifest: dict | None, vocab: int, seq_len: int,
                  sequences_per_step: int) -> tuple[float, float | None]:
    """(teacher FLOPs charged per step, the store's whole generation FLOPs or None without a store)."""
    if store_manifest is not None:
        generation = cost.store_generation_flops(store_manifest)
        return generation / int(store_manifest["num_sequences"]) * sequences_per_step, generation
    if cfg.logits.mode == "cotrain" and cfg.loss.alpha > 0:
        shape = cost.preset_cost_shape(cfg.teacher.preset, vocab)
        return shape.training_flops(seq_len, sequences_per_step * seq_len), None
    return 0.0, None


def _run_cost(steps: int, sequences_per_step: int, tokens: int, student_step_flops: float, teacher_step_flops: float,
              store_flops: float | None, store_manifest: dict | None, wall_seconds: float) -> dict[str, float]:
    """The cost metrics of a run that took `steps` optimizer steps (names and meaning: the module docstring)."""
    student, teacher = student_step_flops * steps, teacher_step_flops * steps
    metrics = {"cost.student_flops": student, "cost.teacher_flops": teacher,
               "cost.teacher_flops_undivided": teacher if store_flops is None else store_flops,
               "cost.total_flops": student + teacher, "cost.store_bytes_read": 0.0,
               "cost.wall_seconds": wall_seconds, "cost.tokens_per_second": tokens / max(wall_seconds, 1e-9)}
    if store_manifest is not None:
        m = store_manifest
        metrics["cost.store_bytes_read"] = int(m["total_bytes"]) / int(m["num_sequences"]) * steps * sequences_per_step
        metrics["store.entries_per_token"] = int(m["num_entries"]) / max(int(m["num_tokens"]), 1)
        metrics["store.bytes_per_token"] = int(m["total_bytes"]) / max(int(m["num_tokens"]), 1)
    return metrics


COTRAIN_TEACHER = "cotrain"  # resolve_heldout_teacher: the teacher trained in the same run


def _is_hf_dir(path: str | Path | None) -> bool:
    return bool(path) and (Path(path) / "config.json").is_file()


def resolve_heldout_teacher(cfg: PDLConfig, data_manifest: dict, store_manifest: dict | None,
                            override: str | Path | None = None) -> Path | str | None:
    """The teacher a run's held-out agreement and KL are measured against: an HF dir, COTRAIN_TEACHER or None.

    `eval.heldout_teacher`: "none" -> None; a path -> that dir (refused here, before any training, if
    it is no HF dir); "auto" -> the store's teacher (offline and online logits), the co-trained
    teacher, or for an LM-only run `override` (a sweep passes its PD rows' teacher) or else the
    teacher of an existing `logits.store` made with the shards' tokenizer; None when there is none.
    """
    choice = cfg.eval.heldout_teacher
    if choice == "none":
        return None
    if choice != "auto":
        if not _is_hf_dir(choice):
            raise ConfigError(f"eval.heldout_teacher={choice!r} is not an HF model dir (no config.json); expected auto, "
                              "none or the path of a teacher dir")
        return Path(choice)
    if cfg.logits.mode == "cotrain" and cfg.loss.alpha > 0:
        return COTRAIN_TEACHER
    if store_manifest is not None:
        candidates = [store_manifest.get("teacher")]
    else:
        candidates = [override]
        try:  # an LM-only run beside an existing store: measure it against that store's teacher
            m = json.loads((Path(cfg.logits.store) / "manifest.json").read_text())
            if m.get("tokenizer_hash") == data_manifest["tokenizer_hash"]:
                candidates.append(m.get("teacher"))
        except (OSError, ValueError, AttributeError):
            pass
    return next((Path(c) for c in candidates if _is_hf_dir(c)), None)


def _load_heldout_teacher(reference: Path | str | None, module: DistillationModule, vocab: int, quiet: bool):
    """The teacher model for the held-out pass (float32, CPU), or None (none, or one of another vocabulary size)."""
    if reference is None:
        return None
    if reference == COTRAIN_TEACHER:
        teacher = module.teacher.to(torch.float32).cpu()
    else:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32)
    if int(teacher.config.vocab_size) != int(vocab):
        if not quiet:
            print(f"train: held-out teacher {reference} has vocab_size={teacher.config.vocab_size}, the student {vocab}; "
                  "no agreement or KL measured", file=sys.stderr)
        return None
    return teacher


def train(cfg: PDLConfig, *, quiet: bool = False, tags: dict[str, str] | None = None,
          callbacks: list | None = None, heldout_teacher: str | Path | None = None) -> dict:
    """One training run (α = 0: the LM-only baseline); returns its summary (run id, held-out loss, paths).

    `tags` are added to the MLflow run (a sweep passes its study, trial and `mlflow.parentRunId`);
    `callbacks` are extra Lightning callbacks (a sweep worker's core sharing). `heldout_teacher`:
    the teacher an LM-only run's held-out metrics are measured against when `eval.heldout_teacher`
    is auto (a sweep passes its PD rows' teacher, so the baseline row has agreement and KL too).
    """
    extra_callbacks = list(callbacks or [])
    tr = cfg.trainer
    check_devices(cfg)
    data_dir, out = Path(cfg.data.out), Path(tr.out)
    data_manifest = read_manifest(data_dir)
    cotrain = cfg.logits.mode == "cotrain" and cfg.loss.alpha > 0
    use_store = cfg.loss.alpha > 0 and not cotrain
    vocab, store_manifest, teacher = int(data_manifest["vocab_size"]), None, None
    if cotrain:
        teacher = f"cotrain:{cfg.teacher.preset}"
        if cfg.loss.fused:
            raise ConfigError("loss.fused=true is not available with logits.mode='cotrain'; set loss.fused=false")
    if use_store:
        store_manifest, vocab = _check_store(cfg, data_manifest)
        teacher = store_manifest.get("teacher")
    reference = resolve_heldout_teacher(cfg, data_manifest, store_manifest, heldout_teacher)
    if cfg.loss.fused and cfg.logits.method == "normkd" and use_store:
        raise ConfigError("loss.fused=true cannot be combined with logits.method='normkd' (NormKD needs the student's "
                          "full logits for its temperature); set loss.fused=false")
    digest = config_hash(cfg, data_manifest["config_hash"],
                         store_manifest["shards"][0]["checksum"] if store_manifest and store_manifest["shards"] else None)
    finished = out / "model" / RUN_INFO
    if finished.is_file():
        info = json.loads(finished.read_text())
        if info.get("config_hash") == digest:
            if not quiet:
                print(f"train: {out} is finished (run {info['run_id']}); nothing to do")
            return info | {"exports": list_exports(out)}
    logger, resumed = _mlflow_run(cfg, out, digest, teacher, tags)
    run_id = logger.run_id
    client = logger.experiment

    pl.seed_everything(tr.seed, workers=True, verbose=False)
    model = _model_for_data(cfg.model.preset, data_manifest, vocab, cfg.model.init_seed)
    seq_len = int(data_manifest["seq_len"])
    sequences_per_step = tr.batch_size * tr.accumulate_grad_batches * tr.devices * tr.num_nodes
    tokens_per_step = sequences_per_step * seq_len
    student_step_flops = cost.model_cost_shape(model).training_flops(seq_len, tokens_per_step)
    teacher_step_flops, store_flops = _teacher_cost(cfg, store_manifest if use_store else None, vocab, seq_len,
                                                    sequences_per_step)
    max_steps = tr.max_steps
    if tr.budget_kind in ("tokens", "flops"):
        max_steps = cost.steps_for_budget(tr.budget_kind, tr.budget, student_flops_per_step=student_step_flops,
                                          teacher_flops_per_step=teacher_step_flops, tokens_per_step=tokens_per_step)
    if tr.budget_kind != "none":  # tags as well as the trainer.budget* params: sweeps and analysis filter on them
        client.set_tag(run_id, "budget.kind", tr.budget_kind)
        client.set_tag(run_id, "budget.value", repr(tr.budget))
        if tr.budget_kind != "wall":  # a wall budget's steps are known only at the end (metric budget.steps)
            client.set_tag(run_id, "budget.steps", str(max_steps))
    targets = TargetSpec.from_config(cfg.logits, float(store_manifest["p"]), int(store_manifest["k"])) if use_store else None
    tau_sq = cfg.logits.tau if cfg.loss.tau_sq_scale and cfg.logits.method != "normkd" else None
    cotrain_kwargs = {}
    if cotrain:  # the teacher trains from scratch beside the student, on the same batches
        cotrain_kwargs = {"teacher": _model_for_data(cfg.teacher.preset, data_manifest, vocab, cfg.teacher.seed),
                          "teacher_optim": teacher_optim(cfg),
                          "cotrain_targets": TargetSpec.from_config(cfg.logits, cfg.logits.store_p, cfg.logits.store_k)}
    kd = use_store or cotrain
    module = DistillationModule(model, loss=cfg.loss, optim=cfg.optim, max_steps=max_steps,
                                normkd_t=cfg.logits.normkd_t if kd and cfg.logits.method == "normkd" else None,
                                normkd_student_tau=cfg.logits.normkd_student_tau,
                                tau_sq=tau_sq, **cotrain_kwargs)
    data = DistillationDataModule(data_dir, tr.batch_size, tr.seed, store_root=cfg.logits.store if use_store else None,
                                  targets=targets, num_workers=tr.num_workers, val_batches=tr.val_batches,
                                  accumulate_grad_batches=tr.accumulate_grad_batches,
                                  sequence_map=load_sequence_map(Path(cfg.logits.store)) if use_store else None)
    ckpt_dir = out / "checkpoints"
    # monitor=None with save_top_k=1 keeps only the newest periodic checkpoint.
    clock = WallClock(tr.budget if tr.budget_kind == "wall" else None)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                 every_n_train_steps=tr.checkpoint_every_n_steps, save_top_k=1), clock, *extra_callbacks]
    tokenizer = load_tokenizer(data_dir / "tokenizer", what="data tokenizer")
    info = {"run_id": run_id, "config_hash": digest, "preset": cfg.model.preset, "teacher": teacher,
            "seq_len": seq_len, "data": str(data_dir.resolve())}
    if tr.export_every_n_steps:
        callbacks.append(PeriodicExport(tr.export_every_n_steps, out, tokenizer, info, tokens_per_step))
    last = latest_checkpoint(ckpt_dir) if resumed else None
    if last is not None:
        check_checkpoint(last)
    ckpt_path = str(last) if last else None
    if not quiet:
        kind = "LM-only" if not kd else (f"PD ({cfg.loss.kind}, alpha={cfg.loss.alpha} {cfg.loss.alpha_schedule}, "
                                          f"{cfg.logits.mode} logits)")
        where = f"resuming from {last}" if ckpt_path else "from scratch"
        budget = f" (budget {tr.budget:.4g} {tr.budget_kind})" if tr.budget_kind != "none" else ""
        print(f"train: {kind} {cfg.model.preset} for {max_steps} steps{budget} x {tr.batch_size} x {seq_len} "
              f"tokens, {where}; MLflow run {run_id}")
    if not resumed:
        client.log_text(run_id, to_yaml(cfg), "config.yaml")
    trainer = build_trainer(cfg, max_steps, callbacks=callbacks, logger=logger, validate=True)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except FloatingPointError as exc:
        trainer.save_checkpoint(ckpt_dir / EXCEPTION_CHECKPOINT)  # weights are still finite: the step was not taken
        client.set_terminated(run_id, "FAILED")
        raise TrainingDiverged(f"training diverged: {exc}; the run {run_id} is marked FAILED (lower optim.lr or "
                               "check the data)") from None
    except Exception:
        trainer.save_checkpoint(ckpt_dir / EXCEPTION_CHECKPOINT)  # resume point for the re-run
        client.set_terminated(run_id, "FAILED")
        raise
    seconds = time.perf_counter() - started
    if trainer.global_rank != 0:
        return {"run_id": run_id}
    steps = trainer.global_step  # below max_steps when a wall budget stopped the run
    model = module.model.to(torch.float32).cpu()
    # One pass over the held-out stream: the loss and the metrics beside it (pd_lightning.metrics), with
    # the teacher run live on the same batches; timed, since it adds to every trial.
    heldout_started = time.perf_counter()
    reference_model = _load_heldout_teacher(reference, module, vocab, quiet)
    held = heldout_metrics(model, data_dir, teacher=reference_model, max_sequences=cfg.eval.heldout_sequences,
                           bins=cfg.eval.ece_bins)
    del reference_model
    heldout_seconds = time.perf_counter() - heldout_started
    loss = held.loss
    reference_name = None if reference is None else teacher if reference == COTRAIN_TEACHER else str(reference)
    tokens = steps * tokens_per_step
    run_cost = _run_cost(steps, sequences_per_step, tokens, student_step_flops, teacher_step_flops, store_flops,
                         store_manifest if use_store else None, clock.elapsed())
    info = {**info, "_file": RUN_INFO, "heldout_loss": loss, "tokens": tokens, "steps": steps,
            "seconds_this_session": round(seconds, 2), "cost": run_cost, "heldout": held.mlflow_metrics(),
            "heldout_teacher": reference_name if held.teacher_kl is not None else None,
            "heldout_seconds": round(heldout_seconds, 3)}
    _save_hf_dir(model, tokenizer, out / "model", dict(info))
    if cotrain:
        _save_hf_dir(module.teacher.to(torch.float32).cpu(), tokenizer, out / "teacher",
                     {"_file": TEACHER_INFO, "preset": cfg.teacher.preset, "cotrained_with": run_id,
                      "heldout_loss_after": heldout_loss(module.teacher, data_dir)})
    client.log_metric(run_id, "heldout_loss", loss, step=steps)
    from pd_lightning.evaluation import log_heldout

    log_heldout(client, run_id, held.as_dict(), teacher=reference_name if held.teacher_kl is not None else None,
                step=steps)
    client.log_metric(run_id, "cost.heldout_seconds", heldout_seconds, step=steps)
    client.log_metric(run_id, "tokens", tokens, step=steps)
    if tr.budget_kind != "none":
        client.log_metric(run_id, "budget.steps", steps, step=steps)
    for key, value in run_cost.items():
        client.log_metric(run_id, key, value, step=steps)
    client.set_tag(run_id, "cost.device", _device_tag(trainer))
    client.set_tag(run_id, "cost.flops_convention", cost.FLOP_CONVENTION)  # runs costed before the head counted lack it
    client.log_artifacts(run_id, str(out / "model"), "model")
    client.set_terminated(run_id, "FINISHED")
    info.pop("_file")
    info["exports"] = list_exports(out)
    if not quiet:
        from pd_lightning.metrics import format_heldout

        print(f"train: held-out {format_heldout(held)} in {heldout_seconds:.1f}s")
        print(f"train: done; held-out loss {loss:.4f}; student exported to {out / 'model'}; MLflow run {run_id}")
    return info
