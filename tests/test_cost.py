"""Cost beside Δ (issue 11): FLOP formulas against a hand count, the store's recorded cost, the cost
metrics of every run, token/FLOP/wall budgets, and periodic exports (the paper's Table 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pd_lightning import cost
from pd_lightning.cli import main
from pd_lightning.config import load_config
from pd_lightning.errors import ConfigError
from pd_lightning.logits.store import inspect_store, load_manifest
from pd_lightning.models import build_config, build_model
from pd_lightning.schedules import lr_multiplier
from pd_lightning.train import WallClock, train, train_teacher

from conftest import TINY_DATA

SEQ, BATCH, VOCAB = 64, 16, 512  # TINY_DATA's sequence length, the runs' batch, TINY_DATA's vocabulary


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def tiny_1m_hand_count() -> int:
    """N of tiny-1m (hidden 128, FFN 384, 4 layers, 4 heads of 32, 2 KV groups), counted by hand."""
    hidden, ffn, layers, heads, groups, head_dim = 128, 384, 4, 4, 2, 32
    attention = hidden * heads * head_dim + 2 * hidden * groups * head_dim + heads * head_dim * hidden  # q, k+v, o
    mlp = 3 * hidden * ffn  # gate, up, down (SwiGLU)
    norms = 2 * hidden  # two RMSNorm weights a layer
    n = layers * (attention + mlp + norms) + hidden  # + the final norm
    assert n == 4 * (49_152 + 147_456 + 256) + 128 == 787_584
    return n


# ----------------------------------------------------------------------------- formulas


def test_flop_formulas_match_a_hand_count_for_tiny_1m():
    n = tiny_1m_hand_count()
    assert cost.non_embedding_params(build_config("tiny-1m", VOCAB)) == n
    assert cost.non_embedding_params(build_model("tiny-1m", VOCAB)) == n  # a real module counts the same
    shape = cost.preset_cost_shape("tiny-1m", VOCAB)
    assert (shape.non_embedding_params, shape.n_layers, shape.d_attn, shape.d_model, shape.vocab_size) == (n, 4, 128, 128, VOCAB)
    tokens = BATCH * SEQ  # one step
    # Per trained token: 6·N (every non-embedding weight) + 6·d_model·V (the tied LM head's matmul, still
    # computed) + 6·n_layers·seq_len·d_attn (Kaplan's attention term), forward + backward.
    hand = 6 * 787_584 * 1024 + 6 * 128 * 512 * 1024 + 6 * 4 * 64 * 128 * 1024
    assert hand == 4_838_916_096 + 402_653_184 + 201_326_592 == 5_442_895_872
    kw = {"d_model": 128, "vocab_size": VOCAB}
    assert cost.training_flops(n, 4, 128, SEQ, tokens, **kw) == shape.training_flops(SEQ, tokens) == hand
    assert cost.forward_flops(n, 4, 128, SEQ, tokens, **kw) == shape.forward_flops(SEQ, tokens) == hand / 3
    assert 2 * 787_584 * 1024 + 2 * 128 * 512 * 1024 + 2 * 4 * 64 * 128 * 1024 == hand / 3
    assert shape.forward_terms(SEQ) == {"non_embedding": 2 * 787_584, "head": 2 * 128 * 512, "attention": 2 * 4 * 64 * 128}


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    model.config._attn_implementation = "eager"  # plain matmuls, which FlopCounterMode counts (CPU SDPA: none)
    return model


@pytest.mark.parametrize("name, model", [
    ("tiny-1m (tied head)", lambda: build_model("tiny-1m", VOCAB)),
    ("tiny-20m (untied head)", lambda: build_model("tiny-20m", VOCAB)),
    ("d_model 96 != d_attn 4 x 32, tied", lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, use_cache=False))),
])
def test_flops_count_every_matmul_of_a_real_model_lm_head_included(name, model):
    """The formula against the model's own weights and torch's FLOP counter: 2 FLOPs per multiply-add of
    every nn.Linear (q, k, v, o, gate, up, down and lm_head, tied or not), 2 per RMSNorm gain (N's
    non-matmul weights), plus Kaplan's attention term 2·n_layers·T·d_attn, which is half of what the
    eager attention's dense QKᵀ and AV matmuls do (4·n_layers·T·d_attn: no causal saving)."""
    model = _eager(model())
    cfg = model.config
    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and 2 * head.in_features * head.out_features == 2 * cfg.hidden_size * cfg.vocab_size
    norms = sum(m.weight.numel() for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    d_attn = cfg.num_attention_heads * cfg.head_dim
    batch, seq = 2, 16
    tokens = batch * seq
    kaplan_attention, dense_attention = 2 * cfg.num_hidden_layers * seq * d_attn, 4 * cfg.num_hidden_layers * seq * d_attn
    shape = cost.model_cost_shape(model)
    assert shape.non_embedding_params + cfg.hidden_size * cfg.vocab_size == linear // 2 + norms  # N + head = every weight used
    assert shape.forward_flops(seq, tokens) == (linear + 2 * norms + kaplan_attention) * tokens
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as forward:
        model(input_ids=ids)
    with FlopCounterMode(display=False) as training:
        model(input_ids=ids).logits.sum().backward()
    assert forward.get_total_flops() == (linear + dense_attention) * tokens
    assert training.get_total_flops() == 3 * forward.get_total_flops()  # the backward is twice the forward
    assert shape.forward_flops(seq, tokens) == forward.get_total_flops() + (2 * norms - kaplan_attention) * tokens
    assert shape.training_flops(seq, tokens) == training.get_total_flops() + 3 * (2 * norms - kaplan_attention) * tokens
    # The causal count of scores + values, position i attending to i + 1 keys: 2·(T + 1)·d_attn a layer.
    causal = sum(4 * (i + 1) * d_attn for i in range(seq)) * cfg.num_hidden_layers / seq
    assert kaplan_attention == causal * seq / (seq + 1)


@pytest.mark.parametrize("preset, vocab, seq_len, undercount, share", [
    ("330M", 151_552, 4096, 0.68, 0.40),  # the paper's Table 7 sizes at GLM-4's vocabulary, 4,096-token context
    ("1.9B", 151_552, 4096, 0.21, 0.18),
    ("6.8B", 151_552, 4096, 0.10, 0.09),
    ("tiny-1m", 2048, 128, 0.31, 0.235),  # the quickstart's student: about a third of the rest
])
def test_lm_head_share_of_training_flops(preset, vocab, seq_len, undercount, share):
    terms = cost.preset_cost_shape(preset, vocab).forward_terms(seq_len)
    rest = terms["non_embedding"] + terms["attention"]  # what the count was without the head
    assert terms["head"] / rest == pytest.approx(undercount, abs=0.005)
    assert terms["head"] / (rest + terms["head"]) == pytest.approx(share, abs=0.005)


def test_non_embedding_count_ignores_vocabulary_and_tying():
    untied = cost.non_embedding_params(build_config("tiny-20m", VOCAB))  # tiny-20m has an untied LM head
    assert untied == cost.non_embedding_params(build_config("tiny-20m", 4096))
    total = sum(p.numel() for p in build_model("tiny-20m", VOCAB).parameters())
    assert untied == total - 2 * VOCAB * 384
    h, f = 2048, 6912  # the paper's 1.9B: 24 layers, 16 heads of 128, 2 KV groups
    assert cost.preset_cost_shape("1.9B", 151_552).non_embedding_params == 24 * (2 * h * h + 2 * h * 256 + 3 * h * f + 2 * h) + h


def test_steps_for_budget():
    kw = {"student_flops_per_step": 3.0, "teacher_flops_per_step": 1.0, "tokens_per_step": 1024}
    assert cost.steps_for_budget("tokens", 10 * 1024, **kw) == 10
    assert cost.steps_for_budget("tokens", 10.9 * 1024, **kw) == 10
    assert cost.steps_for_budget("flops", 40.0, **kw) == 10  # student + teacher per step
    assert cost.steps_for_budget("flops", 43.9, **kw) == 10
    assert cost.steps_for_budget("flops", 0.1 * 3 * 7, **{**kw, "student_flops_per_step": 0.1, "teacher_flops_per_step": 0.2}) == 7
    assert cost.steps_for_budget("wall", 60.0, **kw, seconds_per_step=0.5) == 120
    with pytest.raises(ConfigError, match="less than one step"):
        cost.steps_for_budget("flops", 3.5, **kw)
    with pytest.raises(ConfigError, match="seconds_per_step"):
        cost.steps_for_budget("wall", 60.0, **kw)
    with pytest.raises(ConfigError, match="budget_kind"):
        cost.steps_for_budget("joules", 60.0, **kw)


@pytest.mark.parametrize("overrides, field", [
    (["trainer.budget_kind=flop"], "trainer.budget_kind='flop'"),
    (["trainer.budget=5"], "trainer.budget=5"),
    (["trainer.budget_kind=flops"], "trainer.budget=0.0"),
    (["trainer.budget_kind=tokens", "trainer.budget=-3"], "trainer.budget=-3"),
    (["trainer.export_every_n_steps=-1"], "trainer.export_every_n_steps=-1"),
])
def test_bad_budget_and_export_settings_are_one_line_errors_with_exit_code_2(overrides, field, capsys):
    with pytest.raises(ConfigError, match="allowed|expected one of"):
        load_config("tiny", overrides)
    assert main(["config", "show", "tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err


# ----------------------------------------------------------------------------- the store's cost


def test_store_records_its_generation_cost(tiny_store, tiny_teacher, capsys):
    m = load_manifest(tiny_store)
    meta = m["meta"]
    teacher = cost.model_cost_shape(AutoModelForCausalLM.from_pretrained(tiny_teacher, local_files_only=True))
    assert teacher.non_embedding_params == tiny_1m_hand_count()  # the fixture's teacher is a tiny-1m
    tokens = m["num_sequences"] * SEQ  # the teacher ran on every token of every sequence
    assert meta["generation_tokens"] == tokens and meta["flops_convention"] == cost.FLOP_CONVENTION
    assert meta["generation_flops"] == (2 * 787_584 + 2 * 128 * VOCAB + 2 * 4 * SEQ * 128) * tokens  # LM head included
    assert (meta["teacher_d_model"], meta["teacher_d_attn"], meta["teacher_vocab_size"]) == (128, 128, VOCAB)
    info = inspect_store(tiny_store)
    assert info["generation_flops"] == meta["generation_flops"]
    assert info["generation_seconds"] > 0 and info["generation_device"] in ("cpu", f"cuda:{gpu_name()}")
    assert info["bytes_per_billion_tokens"] == pytest.approx(info["bytes_per_token"] * 1e9)
    assert main(["logits", "inspect", str(tiny_store)]) == 0
    text = capsys.readouterr().out
    assert "teacher FLOPs" in text and f" s on {info['generation_device']}" in text and "per 1e9 tokens" in text
    assert main(["logits", "inspect", str(tiny_store), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generation_flops"] == meta["generation_flops"] and shown["generation_seconds"] > 0


def test_a_store_costed_without_the_lm_head_gets_it_added(tmp_path):
    """A store written before the head was counted: recomputed from its teacher's config.json when the
    teacher dir is there, else its recorded figure plus the head's 2·d·V per generated token."""
    shape = cost.preset_cost_shape("tiny-1m", VOCAB)
    tokens = 10 * SEQ
    no_head = (2 * 787_584 + 2 * 4 * SEQ * 128) * tokens
    manifest = {"positions_per_sequence": SEQ - 1, "num_sequences": 10, "vocab_size": VOCAB,
                "teacher": str(tmp_path / "gone"), "meta": {
                    "generation_flops": float(no_head), "generation_tokens": tokens, "teacher_layers": 4,
                    "teacher_d_model": 128, "teacher_non_embedding_params": 787_584,
                    "flops_convention": "kaplan2020: train 6N+6·L·T·d, forward 2N+2·L·T·d per token; N non-embedding"}}
    assert cost.store_generation_flops(manifest) == no_head + 2 * 128 * VOCAB * tokens == shape.forward_flops(SEQ, tokens)
    build_model("tiny-1m", VOCAB).config.save_pretrained(tmp_path / "teacher")
    assert cost.store_generation_flops({**manifest, "teacher": str(tmp_path / "teacher")}) == shape.forward_flops(SEQ, tokens)
    current = {**manifest, "meta": cost.store_cost_meta(shape, 10, SEQ)}
    assert cost.store_generation_flops(current) == shape.forward_flops(SEQ, tokens)


def test_online_store_records_the_teachers_forward_over_its_window(tiny_data, tmp_path):
    store = tmp_path / "online"
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"teacher.out={tmp_path / 'teacher'}",
                               "teacher.preset=tiny-1m", "teacher.max_steps=6", "teacher.batch_size=4",
                               "logits.mode=online_store", "logits.online_start_frac=0.5", f"logits.store={store}",
                               "logits.sequences_per_shard=8"])
    train_teacher(cfg)
    meta = load_manifest(store)["meta"]
    window_tokens = 3 * 4 * SEQ  # steps 3, 4, 5 of batch 4
    shape = cost.preset_cost_shape("tiny-1m", VOCAB)
    assert meta["generation_tokens"] == window_tokens
    assert meta["generation_flops"] == shape.forward_flops(SEQ, window_tokens)
    assert meta["teacher_training_flops"] == shape.training_flops(SEQ, 6 * 4 * SEQ)


# ----------------------------------------------------------------------------- runs


def run_args(tiny_data: Path, store: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return [*TINY_DATA, f"data.out={tiny_data}", f"logits.store={store}", f"trainer.out={out}",
            f"tracking.tracking_uri={uri}", "tracking.experiment=cost", f"trainer.batch_size={BATCH}",
            "trainer.val_every_n_steps=1000", "trainer.val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=1000", "optim.lr=5e-3", *extra]


STUDENT_STEP = cost.preset_cost_shape("tiny-1m", VOCAB).training_flops(SEQ, BATCH * SEQ)
FLOP_BUDGET = 20.5 * STUDENT_STEP  # 20 LM steps; a PD step costs 4/3 of one (a tiny-1m teacher's forward)


@pytest.fixture(scope="module")
def flop_budget_runs(tiny_data, tiny_store, tmp_path_factory):
    """An LM and a PD (offline store) run at one FLOP budget; the LM run also exports every 10 steps."""
    root = tmp_path_factory.mktemp("cost")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    budget = ["trainer.budget_kind=flops", f"trainer.budget={FLOP_BUDGET!r}", "trainer.max_steps=100000"]
    lm = train(load_config("tiny", run_args(tiny_data, tiny_store, root / "lm", uri, "loss.alpha=0", *budget,
                                            "trainer.export_every_n_steps=10")))
    pd = train(load_config("tiny", run_args(tiny_data, tiny_store, root / "pd", uri, "loss.alpha=0.9", *budget)))
    return uri, root, lm, pd


def metrics(uri: str, run_id: str) -> dict[str, float]:
    return MlflowClient(uri).get_run(run_id).data.metrics


def test_flop_budget_stops_pd_and_lm_at_equal_total_flops(flop_budget_runs):
    uri, _, lm, pd = flop_budget_runs
    a, b = metrics(uri, lm["run_id"]), metrics(uri, pd["run_id"])
    pd_step = b["cost.total_flops"] / b["budget.steps"]
    assert a["budget.steps"] == 20 and b["budget.steps"] == 15  # floor(20.5 / (4/3)): the teacher is charged
    assert b["cost.teacher_flops"] > 0 and a["cost.teacher_flops"] == 0
    for m in (a, b):
        assert FLOP_BUDGET - pd_step < m["cost.total_flops"] <= FLOP_BUDGET
    assert abs(a["cost.total_flops"] - b["cost.total_flops"]) <= pd_step
    client = MlflowClient(uri)
    for summary, steps in ((lm, 20), (pd, 15)):
        run = client.get_run(summary["run_id"])
        assert run.data.tags["budget.kind"] == "flops" and float(run.data.tags["budget.value"]) == FLOP_BUDGET
        assert run.data.tags["budget.steps"] == str(steps) and summary["steps"] == steps
        # The schedules span the computed steps, not trainer.max_steps=100000.
        lrs = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "train/lr"), key=lambda m: m.step)]
        assert lrs[-1] == pytest.approx(5e-3 * lr_multiplier((steps - 1) / steps, "cosine", warmup=0.02, decay=0.2,
                                                            decay_shape="1-sqrt", min_ratio=0.1))


def test_every_run_logs_its_cost(flop_budget_runs, tiny_store):
    uri, _, lm, pd = flop_budget_runs
    store = load_manifest(tiny_store)
    keys = {"cost.student_flops", "cost.teacher_flops", "cost.teacher_flops_undivided", "cost.total_flops",
            "cost.store_bytes_read", "cost.wall_seconds", "cost.tokens_per_second"}
    a, b = metrics(uri, lm["run_id"]), metrics(uri, pd["run_id"])
    assert keys <= set(a) and keys | {"store.entries_per_token", "store.bytes_per_token"} <= set(b)
    assert a["cost.student_flops"] == pytest.approx(20 * STUDENT_STEP)
    assert a["cost.teacher_flops"] == a["cost.teacher_flops_undivided"] == a["cost.store_bytes_read"] == 0
    assert b["cost.student_flops"] == pytest.approx(15 * STUDENT_STEP)
    read = 15 * BATCH  # sequences the PD run read from the store
    assert b["cost.teacher_flops_undivided"] == store["meta"]["generation_flops"]
    assert b["cost.teacher_flops"] == pytest.approx(store["meta"]["generation_flops"] * read / store["num_sequences"])
    assert b["cost.teacher_flops"] == pytest.approx(15 * STUDENT_STEP / 3)  # = a tiny-1m teacher's forward
    assert b["cost.total_flops"] == pytest.approx(b["cost.student_flops"] + b["cost.teacher_flops"])
    assert b["cost.store_bytes_read"] == pytest.approx(store["total_bytes"] / store["num_sequences"] * read)
    assert b["store.bytes_per_token"] == pytest.approx(store["total_bytes"] / store["num_tokens"])
    assert b["store.entries_per_token"] == pytest.approx(store["num_entries"] / store["num_tokens"])
    for m, summary in ((a, lm), (b, pd)):
        assert 0 < m["cost.wall_seconds"] < 600
        assert m["cost.tokens_per_second"] == pytest.approx(summary["tokens"] / m["cost.wall_seconds"])
        tags = MlflowClient(uri).get_run(summary["run_id"]).data.tags
        assert tags["cost.device"] in ("cpu", f"cuda:{gpu_name()}") and tags["cost.flops_convention"] == cost.FLOP_CONVENTION
        assert summary["cost"]["cost.total_flops"] == m["cost.total_flops"]


def test_periodic_exports_are_loadable_hf_dirs_with_step_and_tokens(flop_budget_runs, tiny_data, tiny_store):
    uri, root, lm, _ = flop_budget_runs
    expected = [{"step": s, "tokens": s * BATCH * SEQ, "path": str(root / "lm" / "exports" / f"step-{s:08d}")}
                for s in (10, 20)]
    assert lm["exports"] == expected
    assert sorted(p.name for p in (root / "lm" / "exports").iterdir()) == ["step-00000010", "step-00000020"]
    for e in expected:
        info = json.loads((Path(e["path"]) / "pdl_run.json").read_text())
        assert info["step"] == e["step"] and info["tokens"] == e["tokens"] and info["run_id"] == lm["run_id"]
        assert info["seq_len"] == SEQ and (Path(e["path"]) / "tokenizer.json").is_file()
    step20 = AutoModelForCausalLM.from_pretrained(expected[1]["path"], local_files_only=True).state_dict()
    final = AutoModelForCausalLM.from_pretrained(root / "lm" / "model", local_files_only=True).state_dict()
    step10 = AutoModelForCausalLM.from_pretrained(expected[0]["path"], local_files_only=True).state_dict()
    for name in final:  # the last export is the final model; the first is an earlier one
        assert torch.equal(step20[name], final[name]), name
    assert any(not torch.equal(step10[n], final[n]) for n in final)
    budget = ["trainer.budget_kind=flops", f"trainer.budget={FLOP_BUDGET!r}", "trainer.max_steps=100000"]
    again = train(load_config("tiny", run_args(tiny_data, tiny_store, root / "lm", uri, "loss.alpha=0", *budget,
                                               "trainer.export_every_n_steps=10")))
    assert again["run_id"] == lm["run_id"] and again["exports"] == expected  # a finished run lists its exports


def test_token_budget_sets_the_steps(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(load_config("tiny", run_args(tiny_data, tmp_path / "none", tmp_path / "run", uri, "loss.alpha=0",
                                                 "trainer.budget_kind=tokens", f"trainer.budget={5.5 * BATCH * SEQ}")))
    assert summary["steps"] == 5 and summary["tokens"] == 5 * BATCH * SEQ and summary["exports"] == []
    assert metrics(uri, summary["run_id"])["budget.steps"] == 5


def test_wall_budget_stops_on_the_clock(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(load_config("tiny", run_args(tiny_data, tmp_path / "none", tmp_path / "run", uri, "loss.alpha=0",
                                                 "trainer.budget_kind=wall", "trainer.budget=2.0",
                                                 "trainer.max_steps=100000")))
    m = metrics(uri, summary["run_id"])
    assert 1 <= summary["steps"] < 100000 and m["budget.steps"] == summary["steps"]
    assert 2.0 <= m["cost.wall_seconds"] < 60  # stops at the first step end past the budget
    tags = MlflowClient(uri).get_run(summary["run_id"]).data.tags
    assert tags["budget.kind"] == "wall" and "budget.steps" not in tags


def test_wall_clock_carries_earlier_sessions_through_the_checkpoint():
    clock = WallClock()
    clock.load_state_dict({"elapsed": 5.0})  # what a resumed run finds in its checkpoint
    assert clock.elapsed() == 5.0
    clock.on_train_start(None, None)
    assert 5.0 <= clock.elapsed() < 6.0 and 5.0 <= clock.state_dict()["elapsed"] < 6.0
    clock.on_train_end(None, None)
    stopped = clock.elapsed()
    assert clock.elapsed() == stopped  # frozen after training: the final evaluation and export do not count


def test_cotraining_charges_the_teachers_training(tiny_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = train(load_config("tiny", run_args(tiny_data, tmp_path / "none", tmp_path / "run", uri,
                                                 "logits.mode=cotrain", "loss.alpha=0.5", "teacher.preset=tiny-5m",
                                                 "trainer.max_steps=3")))
    m = metrics(uri, summary["run_id"])
    teacher_step = cost.preset_cost_shape("tiny-5m", VOCAB).training_flops(SEQ, BATCH * SEQ)
    assert m["cost.teacher_flops"] == pytest.approx(3 * teacher_step) == m["cost.teacher_flops_undivided"]
    assert m["cost.total_flops"] == pytest.approx(3 * (teacher_step + STUDENT_STEP))
