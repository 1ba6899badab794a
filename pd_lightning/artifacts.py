"""The files the lab writes and reads across modules, named once, and the one identity of a pre-trained teacher.

A run's output directory (`trainer.out`):

    run.json                 RUN_STATE: {"run_id", "config_hash"}, written when the MLflow run starts, so a
                             re-run of the same config resumes the same run
    model/                   MODEL_DIR: the final student, a transformers directory
        pdl_run.json         RUN_INFO: what the run was (config hash, tokens, steps, held-out loss, ...);
                             written last, so its presence means the run finished
    exports/step-N/          EXPORTS: intermediate checkpoints (Table 12), each with its own RUN_INFO

A teacher directory (`teacher.out`) holds TEACHER_INFO (pdl_teacher.json) beside the transformers files.
A logit store directory holds MANIFEST (manifest.json, see logits/store.py) and, in a sweep's cache,
CACHE_MARKER (pdl_cache.json: which teacher, data, p, k, encoding version and power sums it holds).

Torch-free: the sweep file checks and `pdl config show` import it.
"""

from __future__ import annotations

from typing import Any

from pd_lightning.config import PDLConfig, config_hash

RUN_STATE = "run.json"
MODEL_DIR = "model"
RUN_INFO = "pdl_run.json"
EXPORTS = "exports"
TEACHER_INFO = "pdl_teacher.json"
MANIFEST = "manifest.json"
CACHE_MARKER = "pdl_cache.json"
MODEL_INFO_FILES = (RUN_INFO, TEACHER_INFO)  # what an HF dir of ours carries about its own training


def teacher_digest(cfg: PDLConfig, data_hash: str, *extra: Any) -> str:
    """Hash of every setting that decides what a pre-trained teacher is: its recipe, its data, its optimiser.

    The one list of those fields: `pdl train-teacher` records it in TEACHER_INFO (with the online-store
    settings as `extra`, since such a teacher's run also writes a store) and the sweep's cache names a
    teacher directory by it, so the two cannot drift apart.
    """
    t, o = cfg.teacher, cfg.optim
    return config_hash(t.preset, t.max_steps, t.batch_size, t.lr, t.warmup_frac, t.seed, data_hash, o.weight_decay,
                       o.beta1, o.beta2, o.eps, o.min_lr_ratio, o.grad_clip, *extra)
