"""The Lightning callbacks of a training run, and the HF export they (and `train`) write.

    TrainingProgress   the loop's progress: a rich bar on a terminal, plain log lines otherwise
    WallClock          training-loop seconds across resumes (cost.wall_seconds); stops a wall budget
    PeriodicExport     the student as an HF dir every N steps (the paper's Table 12 checkpoints)
    OnlineLogitWriter  a pre-training teacher's top-p-k logits into an online store (Table 6; online_store_writer
                       makes the store, its sequence map and the callback)

The science (loss, schedules) stays in `module`; these only watch, time and write.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from pd_lightning.artifacts import EXPORTS, RUN_INFO
from pd_lightning.config import PDLConfig
from pd_lightning.errors import ConfigError
from pd_lightning.logits.processing import power_exponents_for, truncate_top_p_k
from pd_lightning.module import BatchStepSampler
from pd_lightning.plan import SEQUENCE_MAP
from pd_lightning.progress import ProgressBar


def save_hf_dir(model: torch.nn.Module, tokenizer, out: Path, info_file: str, info: dict,
                state_dict: dict | None = None) -> None:
    """Export an HF model dir (weights + tokenizer + `info` as JSON in `info_file`) atomically.

    `state_dict` overrides the model's own weights (a sharded model's gathered state). An `info` with
    `seq_len` states that training context in the dir's configs (`state_trained_context`), so any tool
    (plain lm-eval, vLLM) scores in the window the lab scores in; files get the umask's usual modes.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, prefix=f".{out.name}-")
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    (tmp / info_file).write_text(json.dumps(info, indent=2, sort_keys=True))
    if info.get("seq_len"):
        state_trained_context(tmp, int(info["seq_len"]))
    _umask_modes(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named dir in `parent`, made with the umask's mode.

    Not tempfile.mkdtemp: its dir is owner-only (0700) by design, and renamed into place that would
    leave every export unreadable to the group (and to a tracking server running as another user).
    """
    while True:
        path = parent / f"{prefix}{os.urandom(6).hex()}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _umask_modes(root: Path) -> None:
    """Give every file under `root` the mode a plain open() gets (0o666 less the umask), dirs root's own.

    Some writers create owner-only files (safetensors via transformers writes model.safetensors 0600).
    The umask is read off `root` (made by mkdir, so 0o777 less the umask), never by os.umask(), which
    would change it process-wide for a moment under the writer threads.
    """
    dir_mode = root.stat().st_mode & 0o777
    for path in root.rglob("*"):
        os.chmod(path, dir_mode if path.is_dir() else dir_mode & 0o666)


# Model types whose positions are rotary (no position table), so max_position_embeddings can state the
# trained context without changing any weight's shape; our presets are all Llama.
ROTARY_MODEL_TYPES = frozenset({"llama"})


def trained_context_config(config: dict, seq_len: int) -> dict:
    """config.json of an export: the trained context as `max_position_embeddings`, and `use_cache` on.

    Training builds models with use_cache off (no KV cache in a training forward) and at least 1,024
    positions; the export states what the model was trained at instead, which lm-eval's HFLM takes as
    its window (it reads max_position_embeddings before the tokenizer's model_max_length). Rotary
    positions (Llama) have no position table, so the weights are unchanged (and the logits: tested).
    """
    updated = {**config, "use_cache": True}
    if config.get("model_type") in ROTARY_MODEL_TYPES:
        updated["max_position_embeddings"] = int(seq_len)
    return updated


def trained_context_tokenizer_config(config: dict, seq_len: int) -> dict:
    """tokenizer_config.json of an export: `model_max_length` the trained context (not transformers' 1e30 "unset")."""
    return {**config, "model_max_length": int(seq_len)}


def state_trained_context(model_dir: Path, seq_len: int) -> None:
    """Rewrite an exported dir's config, generation config and tokenizer config with the trained context."""
    rewrites = {"config.json": lambda c: trained_context_config(c, seq_len),
                "generation_config.json": lambda c: {**c, "use_cache": True},
                "tokenizer_config.json": lambda c: trained_context_tokenizer_config(c, seq_len)}
    for name, rewrite in rewrites.items():
        path = model_dir / name
        if path.is_file():  # as transformers writes them: sorted keys, 2-space indent, a final newline
            config = json.loads(path.read_text(encoding="utf-8"))
            path.write_text(json.dumps(rewrite(config), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                            encoding="utf-8")


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


class TrainingProgress(pl.Callback):
    """Optimizer steps of the fit through `progress.ProgressBar`, with the loss and tokens/s beside them.

    Rank 0 only: one bar (or one line every `every_s` seconds) for the whole DDP job. A resumed fit
    starts the count at its checkpoint's step, and its rate counts this session's steps only.
    """

    def __init__(self, description: str, every_s: float = 10.0):
        self.description, self.every_s = description, every_s
        self._bar: ProgressBar | None = None
        self._first = self._seen = 0
        self._started = 0.0

    def on_train_start(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        self._first = self._seen = trainer.global_step
        self._started = time.perf_counter()
        self._bar = ProgressBar(trainer.max_steps, "steps", self.description, start=trainer.global_step,
                                log_every_s=self.every_s).__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._bar is None or step == self._seen:
            return  # another rank, or a micro-batch of gradient accumulation (the step is not taken yet)
        note = None
        if self._bar.due() or step >= trainer.max_steps:  # the last step's note is the "done" line's
            tokens_per_step = batch["input_ids"].numel() * trainer.accumulate_grad_batches * trainer.world_size
            tokens_per_s = (step - self._first) * tokens_per_step / max(time.perf_counter() - self._started, 1e-9)
            loss = trainer.callback_metrics.get("loss")
            note = (f"loss {float(loss):.4f}, " if loss is not None else "") + f"{tokens_per_s:,.0f} tokens/s"
        self._bar.advance(step - self._seen, note=note)
        self._seen = step

    def on_train_end(self, trainer, module) -> None:
        self._close(None)

    def on_exception(self, trainer, module, exception) -> None:
        self._close(exception)

    def _close(self, exception: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(type(exception) if exception else None, exception, None)
            self._bar = None


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

    Each export's RUN_INFO is the run's `info` plus its step and tokens. Every rank gathers the
    weights (a collective under FSDP); rank 0 writes, atomically.
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
            save_hf_dir(module.model, self.tokenizer, export_dir(self.out, step), RUN_INFO,
                        {**self.info, "step": step, "tokens": step * self.tokens_per_step}, state_dict=state)


class OnlineLogitWriter(pl.Callback):
    """Online logits (Table 6): while a teacher pre-trains, write its top-p-k logits for the batches it trains on.

    Steps [start_step, end_step) are kept; the batch of step s becomes store sequences
    [(s - start_step)·B, (s - start_step + 1)·B), and `sequence_map` (saved next to the store) says
    which token-shard sequence each one is, so a student replays exactly those batches in order.
    """

    def __init__(self, writer, start_step: int, end_step: int, batch_size: int):
        from pd_lightning.logits.writer import AsyncShardWriter

        self.async_writer = AsyncShardWriter(writer)
        self.start_step, self.end_step, self.batch_size = start_step, end_step, batch_size

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.capture_logits = self.start_step <= trainer.global_step < self.end_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step of this batch has been taken
        if module.capture_logits and module.captured_logits is not None:
            logits = module.captured_logits
            logits = logits.reshape(-1, logits.size(-1))
            if logits.device.type != "cpu":  # cut on the GPU chunk by chunk: no fp32 copy of [B·T, V] queued
                w = self.async_writer.writer
                data = truncate_top_p_k(logits, w.p, w.k, power_exponents=w.power_exponents)
            else:  # on CPU the writer thread truncates, overlapping the next step
                data = logits.float()
            self.async_writer.submit((step - self.start_step) * self.batch_size, data)
            module.captured_logits = None

    def on_train_end(self, trainer, module) -> None:
        self.async_writer.close()

    def on_exception(self, trainer, module, exception) -> None:
        # training failed (a full disk on this writer's thread included): stop the thread quietly, keep whole shards
        self.async_writer.__exit__(type(exception), exception, None)


def online_store_writer(cfg: PDLConfig, manifest: dict, teacher_out: Path, teacher_hash: str) -> OnlineLogitWriter:
    """The callback that writes an online store while the teacher trains (fresh store, sequence map saved)."""
    import numpy as np

    from pd_lightning.logits.writer import LogitStoreWriter, store_write_error

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
    # end > start: config.validate refuses an online window that keeps no teacher step
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
