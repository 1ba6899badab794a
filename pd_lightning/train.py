"""Training entry points: `pdl teacher train` (pre-train a teacher) and `pdl train` (one LM or PD run).

A `pdl train` run is a complete MLflow record: params = the flattened resolved config, tags = the
design-space coordinates and the code version (`mlflow.source.git.commit`, `pd.version`), per-step
metrics, the resolved config as an artifact and the exported student as the run's MLflow logged model
(`student_model`; optionally registered, `--register`). It checkpoints every
`trainer.checkpoint_every_n_steps` steps and on exceptions; running the same command again after a
kill resumes from the last checkpoint in the same MLflow run and, on CPU, ends with the weights an
uninterrupted run would have.

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
    store.target_entries_per_token, store.target_bytes_per_token   what a store of this run's own targets
                                  would take (its top-p-k re-encoded from the first 256 sequences, or the
                                  sampled store itself): the x axis of the equal-bytes comparison

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
import logging
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pd_lightning import cost
from pd_lightning.artifacts import EXPORTS, MODEL_DIR, RUN_INFO, RUN_STATE, TEACHER_INFO, teacher_digest
from pd_lightning.callbacks import (PeriodicExport, TrainingProgress, WallClock, export_dir, list_exports,
                                    online_store_writer, save_hf_dir)
from pd_lightning.config import LogitsConfig, LossConfig, OptimConfig, PDLConfig, flatten, to_yaml, validate
from pd_lightning.data.shards import read_manifest
from pd_lightning.data.tokenizer import load_tokenizer
from pd_lightning.errors import ConfigError, DataError, UserError
from pd_lightning.logits.processing import power_exponents_for
from pd_lightning.models import build_model
from pd_lightning.module import DistillationDataModule, DistillationModule, TargetSpec, heldout_loss, heldout_metrics
from pd_lightning.plan import (COTRAIN_TEACHER, SEQUENCE_MAP, RunKind, RunPlan, load_sequence_map, plan_run,
                               resolve_heldout_teacher)

log = logging.getLogger(__name__)

# The public names, with those that live in artifacts, plan and callbacks and stay importable from here.
__all__ = ["COTRAIN_TEACHER", "EXPORTS", "RUN_INFO", "SEQUENCE_MAP", "TEACHER_INFO", "PeriodicExport", "RunSummary",
           "TrainingDiverged", "WallClock", "build_trainer", "check_checkpoint", "check_devices", "export_dir",
           "latest_checkpoint", "list_exports", "load_sequence_map", "online_store_identity", "resolve_heldout_teacher",
           "teacher_optim", "train", "train_teacher"]

CHECKPOINTS = "checkpoints"
EXCEPTION_CHECKPOINT = "on_exception.ckpt"


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
    """A Lightning Trainer from the engineering section of the config (strategy, precision, devices).

    Progress is ours (`callbacks.TrainingProgress`: a bar on a terminal, log lines otherwise), not Lightning's bar.
    """
    tr = cfg.trainer
    callbacks = [*(callbacks or []), TrainingProgress(description)]
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
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=tr.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=tr.val_batches if validate else 0,
        deterministic=False,
        use_distributed_sampler=False,  # DistillationDataModule shards its endless stream by rank
    )


def _model_for_data(preset: str, manifest: dict, vocab_size: int, seed: int) -> torch.nn.Module:
    eos = int(manifest["eos_token_id"])
    return build_model(preset, vocab_size, seed=seed, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                       max_seq_len=max(int(manifest["seq_len"]), 1024))


# ------------------------------------------------------------------------------------------------ the teacher


def train_teacher(cfg: PDLConfig) -> Path:
    """Pre-train `teacher.preset` on `data.out` for `teacher.max_steps` steps; save an HF dir to `teacher.out`."""
    t = cfg.teacher
    validate(cfg)  # as in train(): the online window's rule among them
    check_devices(cfg)
    data_dir = Path(cfg.data.out)
    manifest = read_manifest(data_dir)
    out = Path(t.out)
    digest = teacher_digest(cfg, manifest["config_hash"], online_store_identity(cfg.logits))
    info_path = out / TEACHER_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("config_hash") == digest:
            log.info(f"teacher: {out} is already trained (config {digest}); nothing to do")
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
    writer = online_store_writer(cfg, manifest, out, digest) if cfg.logits.mode == "online_store" else None
    log.info(f"teacher: pre-training {t.preset} ({params / 1e6:.2f}M params) for {t.max_steps} steps x "
             f"{t.batch_size} x {seq_len} tokens on {data_dir}; held-out loss before {before:.4f}")
    if writer is not None:
        log.info(f"teacher: writing its top-{cfg.logits.store_p}-{cfg.logits.store_k} logits of steps "
                 f"[{writer.start_step}, {writer.end_step}) into {cfg.logits.store} (online logits)")
    started = time.perf_counter()
    build_trainer(cfg, t.max_steps, callbacks=[writer] if writer else [], checkpoints=False,
                  description="teacher").fit(module, datamodule=data)
    if writer is not None:
        shape = cost.model_cost_shape(module.model)
        # Charged to students: the teacher's forward over the saved window (paid inside its own training,
        # so this is what an offline pass over the same sequences would cost); its whole training beside it.
        writer.async_writer.writer.finalize(meta={
            "online": True, "teacher_steps": [writer.start_step, writer.end_step],
            **cost.store_cost_meta(shape, writer.async_writer.writer.num_sequences, seq_len),
            "teacher_training_flops": shape.training_flops(seq_len, t.max_steps * t.batch_size * seq_len),
            "sequence_map": SEQUENCE_MAP, "data": str(data_dir.resolve()), "data_hash": manifest["config_hash"]})
    seconds = time.perf_counter() - started
    model = module.model.to(torch.float32).cpu()
    after = heldout_loss(model, data_dir)
    tokens = t.max_steps * t.batch_size * seq_len
    save_hf_dir(model, tokenizer, out, TEACHER_INFO, {
        "config_hash": digest, "preset": t.preset, "params": params, "steps": t.max_steps,
        "tokens": tokens, "data": str(data_dir.resolve()), "data_hash": manifest["config_hash"],
        "tokenizer_hash": manifest["tokenizer_hash"], "heldout_loss_before": before, "heldout_loss_after": after,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
    })
    log.info(f"teacher: {tokens:,} tokens in {seconds:.0f}s ({tokens / seconds:,.0f} tokens/s); held-out loss "
             f"{before:.4f} -> {after:.4f}; saved to {out}")
    return out


def teacher_optim(cfg: PDLConfig) -> OptimConfig:
    """The teacher's optimiser: the optim section with the teacher's LR and warmup, cosine decay."""
    return dataclasses.replace(cfg.optim, lr=cfg.teacher.lr, warmup_frac=cfg.teacher.warmup_frac, lr_schedule="cosine")


def online_store_identity(lg: LogitsConfig) -> tuple | None:
    """The online-store settings that are part of a teacher's identity (its run writes the store); None offline."""
    if lg.mode != "online_store":
        return None
    online = (lg.mode, lg.store, lg.store_p, lg.store_k, lg.online_start_frac, lg.online_end_frac, lg.sequences_per_shard)
    if power_exponents_for(lg):  # (appended only when set: earlier online teachers keep their hash)
        online += (power_exponents_for(lg),)
    return online


# ------------------------------------------------------------------------------------------------ a run's summary


@dataclasses.dataclass(frozen=True)
class RunSummary(Mapping):
    """What a finished run was: its RUN_INFO (model/pdl_run.json) plus its periodic exports.

    Reads as a mapping too (`summary["run_id"]`, `summary.get("exports", [])`), as the dict it replaced.
    Fields an older RUN_INFO lacks are None.
    """

    run_id: str
    config_hash: str
    preset: str
    teacher: str | None  # the store's teacher, "cotrain:<preset>", or None (LM-only)
    seq_len: int
    data: str  # the token shards' directory, resolved
    heldout_loss: float
    tokens: int
    steps: int
    seconds_this_session: float
    cost: dict[str, float]  # the cost.* and store.* metrics (module docstring)
    heldout: dict[str, float]  # the eval.heldout.* metrics
    heldout_teacher: str | None  # what agreement and KL were measured against (None: not measured)
    heldout_seconds: float
    exports: list[dict] = dataclasses.field(default_factory=list)  # [{step, tokens, path}] (list_exports)

    @classmethod
    def from_info(cls, info: dict[str, Any], exports: list[dict]) -> RunSummary:
        """The summary of a finished run from its RUN_INFO file's contents."""
        return cls(**{f.name: info.get(f.name) for f in dataclasses.fields(cls) if f.name != "exports"},
                   exports=exports)

    def info(self) -> dict[str, Any]:
        """What RUN_INFO records: every field but the exports (they have their own RUN_INFO files)."""
        return {k: v for k, v in self.as_dict().items() if k != "exports"}

    def as_dict(self) -> dict[str, Any]:
        """The summary as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        if key not in _SUMMARY_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_SUMMARY_FIELDS)

    def __len__(self) -> int:
        return len(_SUMMARY_FIELDS)


_SUMMARY_FIELDS = tuple(f.name for f in dataclasses.fields(RunSummary))


def _finished_run(out: Path, digest: str) -> RunSummary | None:
    """The summary of the run of this config already finished in `out`, or None."""
    finished = out / MODEL_DIR / RUN_INFO
    if finished.is_file():
        info = json.loads(finished.read_text())
        if info.get("config_hash") == digest:
            return RunSummary.from_info(info, list_exports(out))
    return None


# ------------------------------------------------------------------------------------------------ a run's steps


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What one optimizer step of a run takes and costs (all ranks and accumulated micro-batches together)."""

    sequences: int
    tokens: int
    student_flops: float
    teacher_flops: float  # charged to this run per step (module docstring: cost.teacher_flops)
    store_flops: float | None  # the store's whole generation FLOPs; None without a store

    def max_steps(self, cfg: PDLConfig) -> int:
        """trainer.max_steps, or the steps a tokens/flops budget allows."""
        tr = cfg.trainer
        if tr.budget_kind not in ("tokens", "flops"):
            return tr.max_steps
        return cost.steps_for_budget(tr.budget_kind, tr.budget, student_flops_per_step=self.student_flops,
                                     teacher_flops_per_step=self.teacher_flops, tokens_per_step=self.tokens)


def _step_cost(cfg: PDLConfig, plan: RunPlan, student: torch.nn.Module) -> StepCost:
    tr = cfg.trainer
    sequences = tr.batch_size * tr.accumulate_grad_batches * tr.devices * tr.num_nodes
    tokens = sequences * plan.seq_len
    student_flops = cost.model_cost_shape(student).training_flops(plan.seq_len, tokens)
    teacher_flops, store_flops = 0.0, None
    if plan.reads_store:
        store_flops = cost.store_generation_flops(plan.store_manifest)
        teacher_flops = store_flops / int(plan.store_manifest["num_sequences"]) * sequences
    elif plan.kind is RunKind.COTRAIN:
        teacher_flops = cost.preset_cost_shape(cfg.teacher.preset, plan.vocab).training_flops(plan.seq_len, tokens)
    return StepCost(sequences, tokens, student_flops, teacher_flops, store_flops)


def _distillation_module(cfg: PDLConfig, plan: RunPlan, student: torch.nn.Module, max_steps: int) -> DistillationModule:
    """Eq. 1 for the plan: a co-training run also builds its teacher, from scratch, beside the student."""
    lg = cfg.logits
    cotrain = {}
    if plan.kind is RunKind.COTRAIN:  # the teacher trains from scratch beside the student, on the same batches
        cotrain = {"teacher": _model_for_data(cfg.teacher.preset, plan.data_manifest, plan.vocab, cfg.teacher.seed),
                   "teacher_optim": teacher_optim(cfg),
                   "cotrain_targets": TargetSpec.from_config(lg, lg.store_p, lg.store_k)}
    return DistillationModule(student, loss=cfg.loss, optim=cfg.optim, max_steps=max_steps,
                              normkd_t=lg.normkd_t if plan.distills and lg.method == "normkd" else None,
                              normkd_student_tau=lg.normkd_student_tau,
                              tau_sq=lg.tau if cfg.loss.tau_sq_scale and lg.method != "normkd" else None, **cotrain)


def _data_module(cfg: PDLConfig, plan: RunPlan) -> DistillationDataModule:
    """Batches for the plan: the store's targets beside the shards for a store run, in an online store's order."""
    tr, m = cfg.trainer, plan.store_manifest
    targets = TargetSpec.from_config(cfg.logits, float(m["p"]), int(m["k"])) if plan.reads_store else None
    return DistillationDataModule(plan.data_dir, tr.batch_size, tr.seed,
                                  store_root=cfg.logits.store if plan.reads_store else None, targets=targets,
                                  num_workers=tr.num_workers, val_batches=tr.val_batches,
                                  accumulate_grad_batches=tr.accumulate_grad_batches, sequence_map=plan.sequence_map)


def _mlflow_run(cfg: PDLConfig, out: Path, digest: str, teacher: str | None, extra_tags: dict[str, str] | None = None):
    """Create (or reopen, on resume) the run's MLflow logger; returns (logger, resumed)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from pd_lightning._source import source_tags
    from pd_lightning.tracking import design_tags, ensure_experiment, tracking_settings

    s = tracking_settings(cfg)
    client = MlflowClient(tracking_uri=s["tracking_uri"])
    ensure_experiment(client, s["experiment"], s["artifact_location"])  # tagged for MLflow's training view
    state_path = out / RUN_STATE
    run_id = None
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("config_hash") != digest:
            raise ConfigError(f"trainer.out={str(out)!r} holds a run of another config ({state.get('config_hash')}, this "
                              f"one is {digest}); choose another trainer.out or delete it")
        run_id = state["run_id"]
    # the code that trains it (MLflow's source commit and the package version): a resumed run gets the latest
    source = source_tags()
    tags = design_tags(cfg, teacher=teacher) | {"pd.config_hash": digest} | source | dict(extra_tags or {})
    logger = MLFlowLogger(experiment_name=s["experiment"], run_name=cfg.tracking.run_name, tracking_uri=s["tracking_uri"],
                          tags=tags, run_id=run_id, artifact_location=s["artifact_location"])
    if run_id is None:
        out.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps({"run_id": logger.run_id, "config_hash": digest}))
        logger.log_hyperparams(flatten(cfg))
    else:
        for key, value in source.items():
            client.set_tag(run_id, key, value)
    return logger, run_id is not None


def _tag_budget(client, run_id: str, cfg: PDLConfig, max_steps: int) -> None:
    """Budget tags as well as the trainer.budget* params: sweeps and analysis filter on them."""
    tr = cfg.trainer
    if tr.budget_kind != "none":
        client.set_tag(run_id, "budget.kind", tr.budget_kind)
        client.set_tag(run_id, "budget.value", repr(tr.budget))
        if tr.budget_kind != "wall":  # a wall budget's steps are known only at the end (metric budget.steps)
            client.set_tag(run_id, "budget.steps", str(max_steps))


def _fit(trainer: pl.Trainer, module: DistillationModule, data: DistillationDataModule, ckpt_path: Path | None,
         client, run_id: str, ckpt_dir: Path) -> float:
    """Run the fit (from `ckpt_path` when resuming); returns its seconds. A failure leaves a resume point and a
    FAILED run; a non-finite loss becomes TrainingDiverged."""
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except FloatingPointError as exc:
        trainer.save_checkpoint(ckpt_dir / EXCEPTION_CHECKPOINT)  # weights are still finite: the step was not taken
        client.set_terminated(run_id, "FAILED")
        raise TrainingDiverged(f"training diverged: {exc}; the run {run_id} is marked FAILED (lower optim.lr or "
                               "check the data)") from None
    except Exception:
        trainer.save_checkpoint(ckpt_dir / EXCEPTION_CHECKPOINT)  # resume point for the re-run
        client.set_terminated(run_id, "FAILED")
        raise
    return time.perf_counter() - started


def _load_heldout_teacher(reference: Path | str | None, module: DistillationModule, vocab: int):
    """The teacher model for the held-out pass (float32, CPU), or None (none, or one of another vocabulary size)."""
    if reference is None:
        return None
    if reference == COTRAIN_TEACHER:
        teacher = module.teacher.to(torch.float32).cpu()
    else:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32)
    if int(teacher.config.vocab_size) != int(vocab):
        log.warning(f"train: held-out teacher {reference} has vocab_size={teacher.config.vocab_size}, the student "
                    f"{vocab}; no agreement or KL measured")
        return None
    return teacher


def _finish(cfg: PDLConfig, plan: RunPlan, trainer: pl.Trainer, module: DistillationModule, tokenizer, run: dict,
            step: StepCost, clock: WallClock, seconds: float, client) -> RunSummary:
    """Rank 0 after the fit: the held-out pass, the exports (student, co-trained teacher), the MLflow record."""
    out, run_id = Path(cfg.trainer.out), run["run_id"]
    steps = trainer.global_step  # below max_steps when a wall budget stopped the run
    model = module.model.to(torch.float32).cpu()
    # One pass over the held-out stream: the loss and the metrics beside it (pd_lightning.metrics), with
    # the teacher run live on the same batches; timed, since it adds to every trial.
    heldout_started = time.perf_counter()
    reference_model = _load_heldout_teacher(plan.heldout_teacher, module, plan.vocab)
    held = heldout_metrics(model, plan.data_dir, teacher=reference_model, max_sequences=cfg.eval.heldout_sequences,
                           bins=cfg.eval.ece_bins)
    del reference_model
    heldout_seconds = time.perf_counter() - heldout_started
    reference = plan.heldout_teacher
    reference_name = None if reference is None else plan.teacher if reference == COTRAIN_TEACHER else str(reference)
    measured_against = reference_name if held.teacher_kl is not None else None
    tokens = steps * step.tokens
    run_cost = _run_cost(steps, step, tokens, plan.store_manifest if plan.reads_store else None, clock.elapsed())
    run_cost |= target_storage(cfg, plan.store_manifest if plan.reads_store else None)
    summary = RunSummary(**run, heldout_loss=held.loss, tokens=tokens, steps=steps,
                         seconds_this_session=round(seconds, 2), cost=run_cost, heldout=held.mlflow_metrics(),
                         heldout_teacher=measured_against, heldout_seconds=round(heldout_seconds, 3))
    save_hf_dir(model, tokenizer, out / MODEL_DIR, RUN_INFO, summary.info())
    if plan.kind is RunKind.COTRAIN:
        save_hf_dir(module.teacher.to(torch.float32).cpu(), tokenizer, out / "teacher", TEACHER_INFO,
                    {"preset": cfg.teacher.preset, "cotrained_with": run_id, "seq_len": plan.seq_len,
                     "heldout_loss_after": heldout_loss(module.teacher, plan.data_dir)})
    client.log_metric(run_id, "heldout_loss", held.loss, step=steps)
    from pd_lightning.evaluation import log_heldout

    log_heldout(client, run_id, held.as_dict(), teacher=measured_against, step=steps)
    client.log_metric(run_id, "cost.heldout_seconds", heldout_seconds, step=steps)
    client.log_metric(run_id, "tokens", tokens, step=steps)
    if cfg.trainer.budget_kind != "none":
        client.log_metric(run_id, "budget.steps", steps, step=steps)
    for key, value in run_cost.items():
        client.log_metric(run_id, key, value, step=steps)
    client.set_tag(run_id, "cost.device", _device_tag(trainer))
    client.set_tag(run_id, "cost.flops_convention", cost.FLOP_CONVENTION)  # runs costed before the head counted lack it
    # the student as the run's MLflow logged model (Models tab, mlflow.pyfunc.load_model), its weights stored once
    from pd_lightning.student_model import log_student
    from pd_lightning.tracking import design_tags

    log_student(client, run_id, out / MODEL_DIR, step=steps, name=cfg.tracking.run_name,
                tags=design_tags(cfg, teacher=plan.teacher))
    client.set_terminated(run_id, "FINISHED")
    from pd_lightning.metrics import format_heldout

    log.info(f"train: held-out {format_heldout(held)} in {heldout_seconds:.1f}s")
    log.info(f"train: done; held-out loss {held.loss:.4f}; student exported to {out / MODEL_DIR}; MLflow run {run_id}")
    return dataclasses.replace(summary, exports=list_exports(out))


def train(cfg: PDLConfig, *, tags: dict[str, str] | None = None, callbacks: list | None = None,
          heldout_teacher: str | Path | None = None, register: str | None = None) -> RunSummary | None:
    """One training run (α = 0: the LM-only baseline); returns its summary (run id, held-out loss, paths).

    `tags` are added to the MLflow run (a sweep passes its study, trial and `mlflow.parentRunId`);
    `callbacks` are extra Lightning callbacks (a sweep worker's heartbeat stop). `heldout_teacher`:
    the teacher an LM-only run's held-out metrics are measured against when `eval.heldout_teacher`
    is auto (a sweep passes its PD rows' teacher, so the baseline row has agreement and KL too).
    `register`: also make the student (the run's logged model) a version of this registered model,
    `pdl train --register` (not part of the run's identity: a finished run is registered as it is).
    A finished run of the same config is returned as it is. None on ranks other than 0 of a
    distributed run: only rank 0 measures, exports and records.
    """
    from pd_lightning.student_model import check_registered_name

    tr = cfg.trainer
    validate(cfg)  # a config built in code gets the checks a loaded one had (cross-field rules included)
    check_devices(cfg)
    check_registered_name(register)
    plan = plan_run(cfg, heldout_teacher)
    out = Path(tr.out)
    finished = _finished_run(out, plan.digest)
    if finished is not None:
        log.info(f"train: {out} is finished (run {finished.run_id}); nothing to do")
        _register(cfg, finished.run_id, register)
        return finished
    logger, resumed = _mlflow_run(cfg, out, plan.digest, plan.teacher, tags)
    run_id, client = logger.run_id, logger.experiment

    pl.seed_everything(tr.seed, workers=True, verbose=False)
    model = _model_for_data(cfg.model.preset, plan.data_manifest, plan.vocab, cfg.model.init_seed)
    step = _step_cost(cfg, plan, model)
    max_steps = step.max_steps(cfg)
    _tag_budget(client, run_id, cfg, max_steps)
    module = _distillation_module(cfg, plan, model, max_steps)
    data = _data_module(cfg, plan)
    ckpt_dir = out / CHECKPOINTS
    clock = WallClock(tr.budget if tr.budget_kind == "wall" else None)
    # monitor=None with save_top_k=1 keeps only the newest periodic checkpoint.
    run_callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                     every_n_train_steps=tr.checkpoint_every_n_steps, save_top_k=1),
                     clock, *(callbacks or [])]
    tokenizer = load_tokenizer(plan.data_dir / "tokenizer", what="data tokenizer")
    run = {"run_id": run_id, "config_hash": plan.digest, "preset": cfg.model.preset, "teacher": plan.teacher,
           "seq_len": plan.seq_len, "data": str(plan.data_dir.resolve())}  # RUN_INFO of the run and of every export
    if tr.export_every_n_steps:
        run_callbacks.append(PeriodicExport(tr.export_every_n_steps, out, tokenizer, run, step.tokens))
    last = latest_checkpoint(ckpt_dir) if resumed else None
    if last is not None:
        check_checkpoint(last)
    where = f"resuming from {last}" if last else "from scratch"
    budget = f" (budget {tr.budget:.4g} {tr.budget_kind})" if tr.budget_kind != "none" else ""
    log.info(f"train: {plan.describe(cfg)} {cfg.model.preset} for {max_steps} steps{budget} x {tr.batch_size} x "
             f"{plan.seq_len} tokens, {where}; MLflow run {run_id}")
    if not resumed:
        client.log_text(run_id, to_yaml(cfg), "config.yaml")
    trainer = build_trainer(cfg, max_steps, callbacks=run_callbacks, logger=logger, validate=True)
    seconds = _fit(trainer, module, data, last, client, run_id, ckpt_dir)
    if trainer.global_rank != 0:
        return None
    summary = _finish(cfg, plan, trainer, module, tokenizer, run, step, clock, seconds, client)
    _register(cfg, run_id, register)
    return summary


def _register(cfg: PDLConfig, run_id: str, name: str | None) -> None:
    """`--register NAME`: the run's student as a version of registered model NAME (once; see student_model)."""
    if name is None:
        return
    from mlflow.tracking import MlflowClient

    from pd_lightning.student_model import register_student
    from pd_lightning.tracking import tracking_settings

    register_student(MlflowClient(tracking_uri=tracking_settings(cfg)["tracking_uri"]), run_id, name)


def _device_tag(trainer: pl.Trainer) -> str:
    """"cpu" or "cuda:<GPU name>", with " x<world size>" for a distributed run."""
    device = trainer.strategy.root_device
    name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    return name + (f" x{trainer.world_size}" if trainer.world_size > 1 else "")


def _run_cost(steps: int, step: StepCost, tokens: int, store_manifest: dict | None,
              wall_seconds: float) -> dict[str, float]:
    """The cost metrics of a run that took `steps` optimizer steps (names and meaning: the module docstring)."""
    student, teacher = step.student_flops * steps, step.teacher_flops * steps
    metrics = {"cost.student_flops": student, "cost.teacher_flops": teacher,
               "cost.teacher_flops_undivided": teacher if step.store_flops is None else step.store_flops,
               "cost.total_flops": student + teacher, "cost.store_bytes_read": 0.0,
               "cost.wall_seconds": wall_seconds, "cost.tokens_per_second": tokens / max(wall_seconds, 1e-9)}
    if store_manifest is not None:
        m = store_manifest
        metrics["cost.store_bytes_read"] = int(m["total_bytes"]) / int(m["num_sequences"]) * steps * step.sequences
        metrics["store.entries_per_token"] = int(m["num_entries"]) / max(int(m["num_tokens"]), 1)
        metrics["store.bytes_per_token"] = int(m["total_bytes"]) / max(int(m["num_tokens"]), 1)
    return metrics


def target_storage(cfg: PDLConfig, store_manifest: dict | None) -> dict[str, float]:
    """store.target_bytes_per_token / target_entries_per_token: what a store of exactly this run's targets would
    take (its own top-p-k, or the sampled store itself), so families are compared at equal bytes."""
    if store_manifest is None or cfg.logits.mode != "offline":
        return {}
    from pd_lightning.logits.writer import bytes_at_truncation

    b, e = bytes_at_truncation(cfg.logits.store, cfg.logits.p, cfg.logits.k)
    return {"store.target_bytes_per_token": b, "store.target_entries_per_token": e}
