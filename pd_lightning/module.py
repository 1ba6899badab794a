"""Lightning modules: the science lives here (model, loss, schedules); the Trainer holds the engineering.

`DistillationModule` trains a causal LM with the paper's Eq. 1, `L = (1-α)·L_lm + α·L_kd`, where the
KD term is a sparse distance to the teacher's top-p-k distribution decoded from the logit store.
α = 0 (no store) is plain LM pre-training: the paper's LLM-LM baseline, and the teacher's own
pre-training. `DistillationDataModule` aligns token shards and the store by sequence index and
decodes, truncates and tempers the teacher entries in DataLoader workers, so the step never waits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pd_lightning.config import LogitsConfig, LossConfig, OptimConfig
from pd_lightning.data.shards import TokenShards
from pd_lightning.errors import ConfigError
from pd_lightning.logits.processing import needed_power_exponents, teacher_targets, truncate_top_p_k
from pd_lightning.losses import distillation_loss
from pd_lightning.metrics import DEFAULT_BINS, HeldoutMetrics, TokenMetricAccumulator
from pd_lightning.schedules import alpha_at, lr_multiplier


@dataclass(frozen=True)
class TargetSpec:
    """How stored teacher entries become KD targets: truncation, temperature or adaptive method."""

    p: float
    k: int
    tau: float
    method: str
    store_p: float
    store_k: int
    params: dict = field(default_factory=dict)
    sampled_tau: str = "exact"  # a sampled store's estimator at tau != 1 (logits.sampled_tau)

    @staticmethod
    def from_config(lg: LogitsConfig, store_p: float, store_k: int) -> TargetSpec:
        """Targets for a config, given the truncation the store was generated at."""
        params: dict = {}
        if lg.method == "normkd":
            params = {"t_norm": lg.normkd_t}
        elif lg.method == "wttm":
            params = {"gamma": lg.wttm_gamma, "weight": lg.wttm_weight}
        elif lg.method in ("adakd_sd", "adakd_h"):
            params = {"beta": lg.adakd_beta, "tau_min": lg.adakd_min_tau, "tau_max": lg.adakd_max_tau}
        return TargetSpec(lg.p, lg.k, lg.tau, lg.method, store_p, store_k, params, lg.sampled_tau)

    @property
    def power_exponents(self) -> tuple[float, ...]:
        """The power sums these targets need from the teacher's full distribution (WTTM's U)."""
        return needed_power_exponents(self.method, self.params.get("gamma", 0.5), self.tau,
                                      self.params.get("weight", "full"))


class StepSampler(Sampler[int]):
    """An endless stream of sequence indices: seeded permutations, one per pass over the data.

    Position n of the stream is a pure function of (seed, n), so a run resumed at step s can
    continue at n = s * batch_size and see exactly the sequences an uninterrupted run would.
    """

    def __init__(self, num_sequences: int, seed: int, start: int = 0):
        self.num_sequences, self.seed, self.start = num_sequences, seed, start

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_sequences)
        while True:
            for i in self._permutation(epoch)[offset:]:
                yield int(i)
            epoch, offset = epoch + 1, 0


class BatchStepSampler(Sampler[list[int]]):
    """Groups a StepSampler stream into batches of sequence indices (one dataset call per batch).

    With `world_size` > 1 (DDP) global batch b is stream items [b·B·W, (b+1)·B·W) and rank r takes
    its r-th block of B: ranks see disjoint sequences, and W = 1 is the single-process stream.
    """

    def __init__(self, num_sequences: int, batch_size: int, seed: int, start_batch: int = 0, *,
                 rank: int = 0, world_size: int = 1):
        self.stream = StepSampler(num_sequences, seed, start=start_batch * batch_size * world_size)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.stream)
        lo = self.rank * self.batch_size
        while True:
            block = [next(it) for _ in range(self.batch_size * self.world_size)]
            yield block[lo : lo + self.batch_size]


class SequentialBatchSampler(Sampler[list[int]]):
    """Consecutive blocks of store indices, wrapping around: a student replays an online teacher's batches in order.

    With `world_size` > 1 rank r takes the r-th block of B within each global block of B·W (as BatchStepSampler).
    """

    def __init__(self, num_sequences: int, batch_size: int, start_batch: int = 0, *, rank: int = 0, world_size: int = 1):
        self.num_sequences, self.batch_size, self.start_batch = num_sequences, batch_size, start_batch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            first = (b * self.world_size + self.rank) * self.batch_size
            yield [(first + i) % self.num_sequences for i in range(self.batch_size)]
            b += 1


class DistillationBatches(Dataset):
    """Batch = token ids [B, L] plus, with a store, KD targets for the B·(L-1) predicting positions."""

    def __init__(self, data_root: str | Path, split: str, store_root: str | Path | None = None,
                 targets: TargetSpec | None = None, sequence_map: np.ndarray | None = None):
        self.data_root, self.split = Path(data_root), split
        self.store_root = Path(store_root) if store_root else None
        self.targets = targets
        # Online stores hold the teacher's batches in training order: store index -> shard sequence.
        self.sequence_map = sequence_map
        self._shards: TokenShards | None = None
        self._store = None  # opened lazily: each DataLoader worker memory-maps its own files
        n_shard = len(TokenShards(self.data_root, split))
        self.num_sequences = len(sequence_map) if sequence_map is not None else n_shard

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None, "_store": None}

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self._shards is None:
            self._shards = TokenShards(self.data_root, self.split)
        rows = self.sequence_map[indices] if self.sequence_map is not None else indices
        batch = {"input_ids": torch.from_numpy(self._shards.batch(rows))}
        if self.store_root is not None and self.targets is not None:
            if self._store is None:
                from pd_lightning.logits.store import LogitStore, keep_freed_memory_for_reuse

                # this process (the trainer's, or a DataLoader worker's) decodes a batch per step: a glibc
                # setting for the whole process, so it is made here, by the loader, not by opening a store
                keep_freed_memory_for_reuse()
                self._store = LogitStore(self.store_root)
            t = self.targets
            sparse = self._store.sequences(indices)
            target = teacher_targets(sparse, t.p, t.k, t.tau, t.method, t.store_p, t.store_k,
                                     sampled_tau=t.sampled_tau, **t.params)
            batch["teacher_indices"] = target.indices.to(torch.int32)  # halves the bytes a worker ships
            batch["teacher_probs"] = target.probs
            if target.log_target is not None:  # sampled targets: kld's value needs the teacher's own log p
                batch["teacher_log_target"] = target.log_target
            if target.token_weights is not None:
                batch["token_weights"] = target.token_weights
            batch["support"] = (target.probs > 0).sum(-1).float().mean()
        return batch


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_metrics(model: torch.nn.Module, root: str | Path, *, teacher: torch.nn.Module | None = None,
                    max_sequences: int = 256, batch_size: int = 32, bins: int = DEFAULT_BINS) -> HeldoutMetrics:
    """Loss, top-1 accuracy, ECE, Brier (and, with `teacher`, top-1 agreement and KL(teacher ‖ student)) of
    `model` on the first `max_sequences` held-out sequences, in one forward pass per batch.

    Definitions and the ECE bin rule: `pd_lightning.metrics`. The teacher runs live on the same
    batches (full vocabulary, no store); the accumulator keeps no [tokens, vocab] array across batches.
    """
    shards = TokenShards(root, "heldout")
    n = min(len(shards), max_sequences)
    models = [model] + ([teacher] if teacher is not None else [])
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(model.parameters()).device
    acc = TokenMetricAccumulator(bins=bins)
    for start in range(0, n, batch_size):
        ids = torch.from_numpy(shards.batch(range(start, min(start + batch_size, n)))).to(device)
        # no KV cache: exported dirs turn use_cache on for generation, and one scoring pass never reads it back
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        teacher_logits = None
        if teacher is not None:
            t_device = next(teacher.parameters()).device
            teacher_logits = teacher(input_ids=ids.to(t_device), use_cache=False).logits[:, :-1].to(logits.device)
        acc.update(logits, ids[:, 1:], teacher_logits)
    for m, mode in zip(models, was_training):
        m.train(mode)
    return acc.result()


def heldout_loss(model: torch.nn.Module, root: str | Path, *, max_sequences: int = 256, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) of `model` on the first `max_sequences` held-out sequences."""
    return heldout_metrics(model, root, max_sequences=max_sequences, batch_size=batch_size).loss


class DistillationDataModule(pl.LightningDataModule):
    """Train batches from the shards (+ store), seeded and resumable by step; fixed held-out batches."""

    def __init__(self, data_root: str | Path, batch_size: int, seed: int, *, store_root: str | Path | None = None,
                 targets: TargetSpec | None = None, num_workers: int = 0, val_batches: int = 8,
                 accumulate_grad_batches: int = 1, sequence_map: np.ndarray | None = None):
        super().__init__()
        self.data_root, self.store_root, self.targets = Path(data_root), store_root, targets
        self.sequence_map = sequence_map
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_batches, self.accumulate = val_batches, accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        dataset = DistillationBatches(self.data_root, "train", self.store_root, self.targets, self.sequence_map)
        # Lightning restores the checkpoint before asking for the loader, so global_step is the
        # resumed step and the stream continues exactly where the interrupted run stopped.
        start = self.trainer.global_step * self.accumulate if self.trainer is not None else 0
        # Our samplers are endless step-indexed streams that Lightning cannot wrap in a DistributedSampler
        # (the Trainer runs with use_distributed_sampler=False): each rank takes its own share here.
        ranks = {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size} if self.trainer is not None else {}
        if self.sequence_map is not None:
            sampler = SequentialBatchSampler(len(dataset), self.batch_size, start_batch=start, **ranks)
        else:
            sampler = BatchStepSampler(len(dataset), self.batch_size, self.seed, start_batch=start, **ranks)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers else None)

    def val_dataloader(self) -> DataLoader:
        dataset = DistillationBatches(self.data_root, "heldout")
        n = min(len(dataset), self.val_batches * self.batch_size)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        return DataLoader(dataset, batch_size=None, sampler=batches, num_workers=0)


class DistillationModule(pl.LightningModule):
    """Eq. 1 on a transformers causal LM; α and the LR follow their schedules over `max_steps`."""

    def __init__(self, model: torch.nn.Module, *, loss: LossConfig, optim: OptimConfig, max_steps: int,
                 normkd_t: float | None = None, normkd_student_tau: str = "graph", tau_sq: float | None = None,
                 teacher: torch.nn.Module | None = None, teacher_optim: OptimConfig | None = None,
                 cotrain_targets: TargetSpec | None = None):
        super().__init__()
        self.model = model
        self.loss_cfg, self.optim_cfg, self.max_steps = loss, optim, max_steps
        self.normkd_t = normkd_t  # set when the teacher targets use NormKD: the student is tempered too
        # τ_s = normkd_t·std(z_s) in the graph (the method) or "detached" (a constant; departs from it)
        self.normkd_student_tau = normkd_student_tau
        self.tau_sq = tau_sq  # Hinton's τ² factor on the KD term (NormKD carries its τ_t² in the weights)
        # Co-training (Table 6, online): a teacher pre-trained in the same steps supplies the targets.
        self.teacher, self.teacher_optim, self.cotrain_targets = teacher, teacher_optim, cotrain_targets
        self.capture_logits = False  # online_store: keep this step's logits for callbacks.OnlineLogitWriter
        self.captured_logits: torch.Tensor | None = None
        self._last_time: float | None = None

    def progress(self) -> float:
        """Fraction of training done, t ∈ [0, 1], the argument of every schedule."""
        return min(self.global_step / self.max_steps, 1.0)

    def alpha(self) -> float:
        """α at the current step."""
        c = self.loss_cfg
        return alpha_at(self.progress(), c.alpha_schedule, c.alpha, periods=c.alpha_periods,
                        warmup=c.alpha_warmup_frac, decay=c.alpha_decay_frac, peak=c.wsd_peak)

    def compute_loss(self, batch: dict[str, torch.Tensor], alpha: float):
        """LossOutput of Eq. 1 for one batch (position t of every sequence predicts token t+1)."""
        c = self.loss_cfg
        ids = batch["input_ids"]
        labels = ids[:, 1:].reshape(-1)
        kd = alpha > 0 and "teacher_indices" in batch
        teacher = (batch["teacher_indices"], batch["teacher_probs"]) if kd else (None, None)
        weights = batch.get("token_weights") if kd else None
        log_target = batch.get("teacher_log_target") if kd else None
        tau_sq = self.tau_sq if kd else None
        normkd = kd and self.normkd_t is not None
        if c.fused and kd:
            if normkd:  # train() refuses this config first; a module built by hand must not drop τ_s silently
                raise ConfigError("loss.fused=true cannot be combined with logits.method='normkd'; "
                                  "set loss.fused=false")
            hidden = self.model.model(input_ids=ids).last_hidden_state[:, :-1]
            return distillation_loss(None, labels, *teacher, alpha=alpha, kind=c.kind, hidden=hidden,
                                     lm_head_weight=self.model.lm_head.weight, fused=True, chunk_size=c.chunk_size,
                                     token_weights=weights, jsd_beta=c.jsd_beta, tau_sq_scale=tau_sq,
                                     teacher_log_target=log_target)
        logits = self.model(input_ids=ids).logits[:, :-1]
        if self.capture_logits:
            self.captured_logits = logits.detach()
        # NormKD: the loss computes τ_s = normkd_t·std(z_s) row by row (and its gradient, in "graph" mode).
        nk = {"normkd_t": self.normkd_t, "normkd_student_tau": self.normkd_student_tau} if normkd else {}
        return distillation_loss(logits, labels, *teacher, alpha=alpha if kd else 0.0, kind=c.kind,
                                 chunk_size=c.chunk_size, token_weights=weights, jsd_beta=c.jsd_beta,
                                 tau_sq_scale=tau_sq, teacher_log_target=log_target, **nk)

    def cotrain_teacher_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Co-training: the teacher's own LM loss on the batch; its detached top-p-k targets join the batch."""
        ids = batch["input_ids"]
        logits = self.teacher(input_ids=ids).logits[:, :-1]
        teacher_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
        t = self.cotrain_targets
        with torch.no_grad():
            sparse = truncate_top_p_k(logits.detach().float().reshape(-1, logits.size(-1)), t.store_p, t.store_k,
                                      power_exponents=t.power_exponents)
            target = teacher_targets(sparse, t.p, t.k, t.tau, t.method, t.store_p, t.store_k, **t.params)
        batch["teacher_indices"], batch["teacher_probs"] = target.indices, target.probs
        if target.token_weights is not None:
            batch["token_weights"] = target.token_weights
        batch["support"] = (target.probs > 0).sum(-1).float().mean()
        return teacher_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        alpha = self.alpha()
        teacher_loss = self.cotrain_teacher_step(batch) if self.teacher is not None else None
        out = self.compute_loss(batch, alpha)
        if not torch.isfinite(out.loss) or (teacher_loss is not None and not torch.isfinite(teacher_loss)):
            bad = out.loss if not torch.isfinite(out.loss) else teacher_loss
            raise FloatingPointError(f"non-finite training loss ({bad.item()}) at step {self.global_step}")
        now = time.perf_counter()
        tokens = batch["input_ids"].numel()
        metrics = {"train/loss": out.loss.detach(), "train/lm_loss": out.lm_loss, "train/kd_loss": out.kd_loss,
                   "train/alpha": alpha, "train/lr": self.optimizers().param_groups[0]["lr"]}
        if self._last_time is not None:
            metrics["train/tokens_per_s"] = tokens / max(now - self._last_time, 1e-9)
        if "support" in batch:
            metrics["train/teacher_support"] = batch["support"]
        self._last_time = now
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=batch["input_ids"].shape[0])
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False, batch_size=batch["input_ids"].shape[0])
        if teacher_loss is not None:
            self.log("teacher/loss", teacher_loss.detach(), on_step=True, on_epoch=False,
                     batch_size=batch["input_ids"].shape[0])
            # The targets are detached, so the sum trains each model on its own loss only.
            return out.loss + teacher_loss
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        self.log("val/loss", lm_loss(self.model(input_ids=ids).logits, ids), prog_bar=True, batch_size=ids.shape[0])

    def _param_groups(self, model: torch.nn.Module, o: OptimConfig) -> list[dict]:
        # No weight decay on norms (1-D tensors), as in every modern LM recipe.
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay, "lr": o.lr},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": o.lr}]

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = self._param_groups(self.model, o)
        multipliers = [_lr_lambda(o, self.max_steps)] * 2
        if self.teacher is not None:
            groups += self._param_groups(self.teacher, self.teacher_optim)
            multipliers += [_lr_lambda(self.teacher_optim, self.max_steps)] * 2
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip student and co-trained teacher separately, so one model's gradient norm never rescales the other's."""
        if self.teacher is None:  # the strategy's own clipping (FSDP needs it)
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            torch.nn.utils.clip_grad_norm_(self.teacher.parameters(), gradient_clip_val)


def _lr_lambda(o: OptimConfig, max_steps: int):
    """step -> LR multiplier of an optimiser config's schedule over `max_steps`."""
    def multiplier(step: int) -> float:
        return lr_multiplier(step / max_steps, o.lr_schedule, warmup=o.warmup_frac, decay=o.decay_frac,
                             decay_shape=o.decay_shape, min_ratio=o.min_lr_ratio)
    return multiplier
