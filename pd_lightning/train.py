"""Training entry points: `pdl teacher train` (pre-train a teacher on prepared shards)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from pd_lightning.config import PDLConfig, config_hash
from pd_lightning.data.shards import read_manifest
from pd_lightning.data.tokenizer import load_tokenizer
from pd_lightning.errors import ConfigError
from pd_lightning.models import build_model
from pd_lightning.module import CausalLMModule, heldout_loss, train_dataloader
from pd_lightning.schedules import lr_multiplier

TEACHER_INFO = "pdl_teacher.json"


def _trainer(cfg: PDLConfig, max_steps: int, log_every: int) -> pl.Trainer:
    """A Lightning Trainer from the engineering section of the config."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=log_every,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def train_teacher(cfg: PDLConfig, *, quiet: bool = False) -> Path:
    """Pre-train `teacher.preset` on `data.out` for `teacher.max_steps` steps; save an HF dir to `teacher.out`."""
    t = cfg.teacher
    data_dir = Path(cfg.data.out)
    manifest = read_manifest(data_dir)
    out = Path(t.out)
    digest = config_hash(t.preset, t.max_steps, t.batch_size, t.lr, t.warmup_frac, t.seed, manifest["config_hash"],
                         cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2)
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
    model = build_model(t.preset, int(manifest["vocab_size"]), seed=t.seed, eos_token_id=int(manifest["eos_token_id"]),
                        bos_token_id=int(manifest["eos_token_id"]), pad_token_id=int(manifest["eos_token_id"]),
                        max_seq_len=max(seq_len, 1024))
    params = sum(p.numel() for p in model.parameters())
    before = heldout_loss(model, data_dir)
    def lr_lambda(progress: float) -> float:
        return lr_multiplier(progress, "cosine", warmup=t.warmup_frac, min_ratio=cfg.optim.min_lr_ratio)

    module = CausalLMModule(model, lr=t.lr, weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            eps=cfg.optim.eps, lr_lambda=lr_lambda, max_steps=t.max_steps)
    loader = train_dataloader(data_dir, t.batch_size, t.seed, num_workers=cfg.trainer.num_workers)
    if not quiet:
        print(f"teacher: pre-training {t.preset} ({params / 1e6:.2f}M params) for {t.max_steps} steps x "
              f"{t.batch_size} x {seq_len} tokens on {data_dir}; held-out loss before {before:.4f}")
    started = time.perf_counter()
    _trainer(cfg, t.max_steps, cfg.trainer.log_every_n_steps).fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - started
    model = module.model.to(torch.float32).cpu()
    after = heldout_loss(model, data_dir)
    tokens = t.max_steps * t.batch_size * seq_len

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TEACHER_INFO).write_text(json.dumps({
        "config_hash": digest, "preset": t.preset, "params": params, "steps": t.max_steps, "tokens": tokens,
        "data": str(data_dir.resolve()), "data_hash": manifest["config_hash"], "tokenizer_hash": manifest["tokenizer_hash"],
        "heldout_loss_before": before, "heldout_loss_after": after, "seconds": round(seconds, 2),
    }, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if not quiet:
        print(f"teacher: {tokens:,} tokens in {seconds:.0f}s ({tokens / seconds:,.0f} tokens/s); held-out loss "
              f"{before:.4f} -> {after:.4f}; saved to {out}")
    return out
