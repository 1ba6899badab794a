"""The prerequisite cache shared by every sweep: token shards, teachers and logit stores, each built once.

Every entry is a content-addressed directory (`data-<hash>`, `teacher-<hash>`, `logits-<hash>`) built
under its own file lock, so two workers (or two sweeps) that need the same teacher train it once and
the second waits for it. A store is reused by any task whose (p, k) it covers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pd_lightning.artifacts import CACHE_MARKER, MANIFEST, teacher_digest
from pd_lightning.config import PDLConfig, config_hash
from pd_lightning.errors import UserError
from pd_lightning.sweep.locks import file_lock
from pd_lightning.sweep.spec import SweepSpec, Task

if TYPE_CHECKING:
    from pd_lightning.sweep.study import Place

log = logging.getLogger(__name__)
BUILDER_LOGGERS = ("pd_lightning.data", "pd_lightning.train", "pd_lightning.logits", "pd_lightning.progress")  # what building says


@contextlib.contextmanager
def quiet_builds() -> Iterator[None]:
    """Only warnings from the builders while the block runs: a worker finds its prerequisites already built."""
    loggers = [logging.getLogger(name) for name in BUILDER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def with_prerequisites(cfg: PDLConfig, cache: Path, *, build: bool = True) -> PDLConfig:
    """Point `cfg` at the cached shards, teacher and store it needs, building each once under a lock."""
    from pd_lightning.data.prepare import data_hash, prepare

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), teacher=dataclasses.replace(cfg.teacher),
                              logits=dataclasses.replace(cfg.logits))
    data_key = data_hash(cfg.data)
    cfg.data.out = str(cache / f"data-{data_key}")
    if build:
        with file_lock(cache / ".locks" / f"data-{data_key}.lock"):
            prepare(cfg.data)
    lg = cfg.logits
    if cfg.loss.alpha == 0 or lg.mode == "cotrain":
        return cfg
    if lg.mode == "online_store":  # the teacher writes the store while it trains: one unit
        key = config_hash("online", _teacher_key(cfg, data_key), lg.store_p, lg.store_k, lg.online_start_frac,
                          lg.online_end_frac, lg.sequences_per_shard)
        cfg.teacher.out, lg.store = str(cache / f"teacher-online-{key}"), str(cache / f"logits-online-{key}")
        if build:
            from pd_lightning.train import train_teacher

            with file_lock(cache / ".locks" / f"online-{key}.lock"):
                train_teacher(cfg)
        return cfg
    if not cfg.teacher.path:
        key = _teacher_key(cfg, data_key)
        cfg.teacher.out = str(cache / f"teacher-{key}")
        if build:
            from pd_lightning.train import train_teacher

            with file_lock(cache / ".locks" / f"teacher-{key}.lock"):
                train_teacher(cfg)
    from pd_lightning.logits import codec  # torch: only where a store is looked up or built
    from pd_lightning.logits.processing import power_exponents_for

    teacher_id = store_teacher_id(cfg)
    exps = list(power_exponents_for(lg))
    if lg.sampling == "sample":  # draws serve only their own (samples, seed): no looser store stands in for them
        key = config_hash("offline-sampled", teacher_id, data_key, lg.samples, lg.sample_seed, codec.ENCODING_VERSION, exps)
        what = {"sampling": "sample", "samples": lg.samples, "sample_seed": lg.sample_seed}
    else:
        found = find_store(cache, teacher_id, data_key, lg.store_p, lg.store_k, exps)
        if found is not None:
            lg.store, lg.store_p, lg.store_k = str(found[0]), found[1], found[2]
            return cfg
        # the encoding version and power sums are part of what a store holds (v1 stores at p = 1 are refused)
        key = config_hash("offline", teacher_id, data_key, lg.store_p, lg.store_k, codec.ENCODING_VERSION, exps)
        what = {"p": lg.store_p, "k": lg.store_k}
    lg.store = str(cache / f"logits-{key}")
    if build:
        from pd_lightning.logits.generate import generate_store

        with file_lock(cache / ".locks" / f"logits-{key}.lock"):
            generate_store(cfg)
            (Path(lg.store) / CACHE_MARKER).write_text(json.dumps({
                "teacher_id": teacher_id, "teacher": str(Path(cfg.teacher.path or cfg.teacher.out).resolve()),
                "data": data_key, **what, "encoding_version": codec.ENCODING_VERSION, "power_exponents": exps}))
    return cfg


def store_teacher_id(cfg: PDLConfig) -> str:
    """What a cached store's teacher is, for its cache key.

    A teacher the cache trained is named by its settings' hash, so the key survives moving the cache
    dir. A teacher of the user's (`teacher.path`) is named by its path, config and weight files (name,
    size, modification time): retraining it in place makes a new store instead of reusing the old one.
    """
    from pd_lightning.logits.generate import teacher_identity

    if not cfg.teacher.path:
        return f"cache:{Path(cfg.teacher.out).name}"
    path = Path(cfg.teacher.path).resolve()
    try:
        return f"path:{path}:{teacher_identity(path, mtimes=True)}"
    except OSError:  # a missing or unreadable dir: generation names the problem
        return f"path:{path}"


def _teacher_key(cfg: PDLConfig, data_key: str) -> str:
    """A cache-trained teacher's directory name: the one teacher identity (`artifacts.teacher_digest`)."""
    return teacher_digest(cfg, data_key)


def reference_teacher(cfg: PDLConfig, cache: Path) -> str | None:
    """For an LM-only task: the teacher the sweep's distilled rows on the same data learn from, if it exists.

    The LM baseline then gets held-out agreement and KL against the same teacher as its PD rows
    (eval.heldout.teacher_*), the reference those rows' numbers are read against.
    """
    from pd_lightning.data.prepare import data_hash

    if cfg.loss.alpha > 0 or cfg.logits.mode != "offline":
        return None
    path = Path(cfg.teacher.path) if cfg.teacher.path else cache / f"teacher-{_teacher_key(cfg, data_hash(cfg.data))}"
    return str(path.resolve()) if (path / "config.json").is_file() else None  # as the store's manifest names it


def find_store(cache: Path, teacher_id: str, data_key: str, p: float, k: int,
               power_exponents: list[float] | tuple[float, ...] = ()) -> tuple[Path, float, int] | None:
    """A finished cached store of this teacher (`store_teacher_id`) and data at least as loose as (p, k), of the
    current encoding version and keeping every power sum asked for: the tightest such."""
    from pd_lightning.logits import codec

    best = None
    for marker in cache.glob(f"logits-*/{CACHE_MARKER}"):
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        kept = {float(a) for a in info.get("power_exponents", [])}
        if info.get("sampling", "topk") != "topk":
            continue  # a sampled store holds draws, not a top-p-k prefix
        if (info.get("teacher_id") == teacher_id and info.get("data") == data_key
                and info.get("encoding_version", 1) == codec.ENCODING_VERSION and kept >= set(map(float, power_exponents))
                and float(info["p"]) >= p and int(info["k"]) >= k and (marker.parent / MANIFEST).is_file()):
            if best is None or (info["k"], info["p"]) < (best[2], best[1]):
                best = (marker.parent, float(info["p"]), int(info["k"]))
    return best



def build_prerequisites(spec: SweepSpec, place: Place) -> None:
    """Build every shared prerequisite the sweep's tasks need, once, before workers start."""
    seen = set()
    for task in spec.tasks() or [Task("search", {}, spec.seeds[0])]:
        try:
            cfg = spec.config_for(task)
        except UserError:
            continue  # an invalid point fails as its own trial
        lg = cfg.logits
        key = config_hash(cfg.data, cfg.teacher, lg.mode, lg.store_p, lg.store_k, cfg.loss.alpha > 0,
                          lg.online_start_frac, lg.online_end_frac, lg.sampling, lg.samples, lg.sample_seed)
        if key not in seen:
            seen.add(key)
            with_prerequisites(cfg, place.cache)
    if spec.search is not None:  # the search space's own prerequisites (KD at the loosest truncation)
        with contextlib.suppress(UserError):
            with_prerequisites(spec.config_for(Task("search", {"loss.alpha": 1.0} if "loss.alpha" not in spec.common
                                                    else {}, spec.seeds[0])), place.cache)

