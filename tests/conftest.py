"""Shared fixtures: a small prepared dataset and a tiny trained teacher, made once per test session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from pd_lightning import logs

# Tests never reach a hub, whatever the machine's network allows.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: tiny models gain little from two, and two threads spin-wait badly when the
# machine's other core is busy (measured here: 0.17 s vs 0.9 s per tiny-1m step under load).
torch.set_num_threads(1)

TINY_DATA = [
    "data.train_tokens=300000",
    "data.heldout_tokens=20000",
    "data.vocab_size=512",
    "data.tokenizer_train_chars=400000",
    "data.seq_len=64",
    "data.sequences_per_shard=1024",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared built-in-corpus dataset: 300k train tokens, 512-token BPE, sequences of 64."""
    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={out}"])
    return prepare(cfg.data)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-1m teacher pre-trained for 200 steps on `tiny_data` (an HF dir with its tokenizer)."""
    from pd_lightning.config import load_config
    from pd_lightning.train import train_teacher

    out = tmp_path_factory.mktemp("teacher") / "tiny"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={out}", "teacher.preset=tiny-1m",
                               "teacher.max_steps=200", "teacher.batch_size=16", "teacher.lr=5e-3"])
    return train_teacher(cfg)


@pytest.fixture(scope="session")
def tiny_store(tiny_teacher: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher's top-0.95-100 logit store over `tiny_data`."""
    from pd_lightning.config import load_config
    from pd_lightning.logits.generate import generate_store

    out = tmp_path_factory.mktemp("store") / "tiny"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tiny_teacher}",
                               f"logits.store={out}", "logits.batch_size=32"])
    return generate_store(cfg)


@pytest.fixture(scope="session")
def small_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,250 sequences of 32 tokens (40k train tokens) tokenized with the tiny teacher's tokenizer, so the
    tiny teacher matches them: for generation tests that need many shards quickly."""
    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare

    out = tmp_path_factory.mktemp("small") / "data"
    cfg = load_config("tiny", ["data.train_tokens=40000", "data.heldout_tokens=2000", "data.seq_len=32",
                               f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.out={out}"])
    return prepare(cfg.data)


# Real PostgreSQL and MLflow tracking servers (session fixtures; started only by tests that ask for them).
from servers import mlflow_server, postgres_server, postgres_url  # noqa: E402,F401


@pytest.fixture
def pdl_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog receiving every record of the `pd_lightning` logger at INFO and above during the test.

    `pdl` (logs.setup) stops that logger propagating to the root logger, where caplog listens, so
    this listens on the logger itself: status lines are captured whether or not a `pdl` command ran
    earlier in the test process.
    """
    logger = logging.getLogger(logs.LOGGER)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logs.LOGGER):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)
