"""The local suite separates a trained teacher from random init (a 900-step teacher at the tiny config's
data shape, ~4 minutes of one CPU thread: its own file, so a parallel test run (`pytest -n 2 --dist loadfile`)
trains it once, on one worker, beside the rest of the evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_lightning import evaluation as ev

LOCAL_MC = ("synth_continuation", "synth_facts", "synth_arithmetic")


@pytest.fixture(scope="module")
def tiny_config_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny-1m teacher trained on the tiny config's data shape (2,048-token BPE, sequences of 128) for
    900 steps x 16 and a random-init twin: (teacher dir, random dir). About 3 minutes of one CPU thread.
    900 rather than 600 steps: at 600 the long-range continuation task had not reliably emerged
    (31 and 41 % in two data orders), at 900 it scored 69 and 79 % (chance 25)."""
    from pd_lightning.config import load_config
    from pd_lightning.data.prepare import prepare
    from pd_lightning.models import build_model
    from pd_lightning.train import train_teacher

    root = tmp_path_factory.mktemp("tinycfg")
    cfg = load_config("tiny", ["data.train_tokens=1300000", "data.heldout_tokens=20000", f"data.out={root / 'data'}",
                               f"teacher.out={root / 'teacher'}", "teacher.preset=tiny-1m", "teacher.max_steps=900",
                               "teacher.batch_size=16", "teacher.lr=3e-3", "trainer.num_workers=0"])
    prepare(cfg.data)
    teacher = train_teacher(cfg)
    from transformers import AutoConfig, AutoTokenizer

    c = AutoConfig.from_pretrained(teacher)
    random_dir = root / "random"
    build_model("tiny-1m", c.vocab_size, seed=1, eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id,
                pad_token_id=c.pad_token_id, max_seq_len=c.max_position_embeddings).save_pretrained(random_dir)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(random_dir)
    return teacher, random_dir


def test_a_trained_teacher_scores_clearly_above_random_init_on_every_local_task(tiny_config_teacher):
    teacher, random_dir = tiny_config_teacher
    kw = dict(tasks=[*LOCAL_MC, "synth_heldout"], max_length=128)  # every item, the same window for both
    got, chance = ev.evaluate(teacher, **kw)["tasks"], ev.evaluate(random_dir, **kw)["tasks"]
    scores = {t: (round(got[t]["value"], 1), round(chance[t]["value"], 1)) for t in LOCAL_MC}
    # 1,200 items: stderr about 1.4 points, so 8 points is more than 4 standard errors of the difference.
    # Measured with this recipe: 69.0 / 62.9 / 63.7 (continuation / facts / arithmetic) against ~25.
    for task in LOCAL_MC:
        assert got[task]["value"] >= chance[task]["value"] + 8, scores
    assert got["synth_heldout"]["value"] < chance["synth_heldout"]["value"] - 1.0  # bits per byte


def test_icl_probe_separates_a_model_that_copies_from_random_init(tiny_config_teacher):
    """The copying probe is at chance (25%) for any model that ignores the context (its 4 choices are
    exchangeable without it); the trained teacher copies natural spans from its context, random init cannot."""
    teacher, random_dir = tiny_config_teacher
    kw = dict(tasks="icl_copy_random,icl_copy_natural", max_length=128)
    got, chance = ev.evaluate(teacher, **kw)["tasks"], ev.evaluate(random_dir, **kw)["tasks"]
    scores = {t: (round(got[t]["value"], 1), round(chance[t]["value"], 1)) for t in got}
    # 600 items a task: stderr about 1.8 points. Measured with this recipe: natural 35.2 vs 22.3 at random
    # init; random spans 27.2 vs 25.2 — tiny models trained on the built-in corpus do not copy random spans
    # (the corpus never repeats a novel string verbatim), so that column reports, it does not separate here.
    assert got["icl_copy_natural"]["value"] >= chance["icl_copy_natural"]["value"] + 8, scores
    for task in ("icl_copy_random", "icl_copy_natural"):
        assert abs(chance[task]["value"] - 25.0) < 7.0, scores  # random init: chance, within ~3.5 stderr
