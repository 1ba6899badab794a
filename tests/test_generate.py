"""`pdl logits generate` on a real tiny teacher: content, resume after SIGKILL, refusal of mismatched vocabularies."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pd_lightning.cli import main
from pd_lightning.config import load_config
from pd_lightning.data.prepare import prepare
from pd_lightning.data.shards import TokenShards
from pd_lightning.errors import DataError
from pd_lightning.logits.generate import generate_store
from pd_lightning.logits.processing import truncate_top_p_k
from pd_lightning.logits.store import LogitStore, load_manifest
from pd_lightning.models import load_causal_lm

from conftest import TINY_DATA


def gen_args(data: Path, teacher: Path, store: Path, *extra: str) -> list[str]:
    return ["tiny", *TINY_DATA, f"data.out={data}", f"teacher.out={teacher}", f"logits.store={store}",
            "logits.batch_size=8", *extra]


def test_store_holds_the_teachers_top_p_k(tiny_teacher, small_data, tmp_path, capsys):
    store_dir = tmp_path / "store"
    args = gen_args(small_data, tiny_teacher, store_dir, "logits.sequences_per_shard=300", "data.seq_len=32")
    assert main(["logits", "generate", *args]) == 0
    store = LogitStore(store_dir)
    shards = TokenShards(small_data, "train")
    assert len(store) == len(shards) and store.positions_per_sequence == shards.seq_len - 1
    model = load_causal_lm(tiny_teacher)
    ids = torch.from_numpy(shards.batch([0, 7, len(shards) - 1]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
    exact = truncate_top_p_k(logits, 0.95, 100)
    got = store.sequences([0, 7, len(shards) - 1])
    assert torch.equal(got.counts, exact.counts)
    # the same kept ids at every position (order may differ only between near-ties after quantisation)
    assert torch.equal(got.indices.sort(-1).values, exact.indices.sort(-1).values)
    # and the decoded distribution is the teacher's within the store's error bound
    q_exact = torch.softmax(exact.logprobs, -1)
    lookup = {(r, int(got.indices[r, j])): float(got.logprobs[r, j])
              for r in range(len(got)) for j in range(int(got.counts[r]))}  # kept entries only, not padding
    decoded = torch.tensor([[lookup[(r, int(exact.indices[r, j]))] if j < int(exact.counts[r]) else float("-inf")
                             for j in range(exact.width)] for r in range(len(exact))])
    q_decoded = torch.softmax(decoded, -1)
    kl = (q_exact * (q_exact.clamp_min(1e-30).log() - q_decoded.clamp_min(1e-30).log())).sum(-1)
    assert kl.mean().item() < 1e-3, kl.mean().item()
    assert main(["logits", "inspect", str(store_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"tokens":' in out and '"mean_entries_per_token":' in out
    assert main(["logits", "verify", str(store_dir)]) == 0


@pytest.mark.parametrize("sampling", [(), ("logits.sampling=sample", "logits.samples=16")], ids=["topk", "sampled"])
def test_killed_generation_resumes_to_a_byte_identical_store(tiny_teacher, small_data, tmp_path, sampling):
    args = gen_args(small_data, tiny_teacher, tmp_path / "ref", "logits.sequences_per_shard=100", "data.seq_len=32",
                    *sampling)
    generate_store(load_config(args[0], args[1:]))

    killed = tmp_path / "killed"
    kargs = gen_args(small_data, tiny_teacher, killed, "logits.sequences_per_shard=100", "data.seq_len=32", *sampling)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pd_lightning.cli", "logits", "generate", *kargs],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(killed.glob("shard-*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(killed.glob("shard-*.json")))
    assert 3 <= finished < 13 and not (killed / "manifest.json").exists(), finished  # killed mid-way
    generate_store(load_config(kargs[0], kargs[1:]))

    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name.startswith(("shard-", "manifest")))
    new_files = sorted(p.name for p in killed.iterdir() if p.name.startswith(("shard-", "manifest")))
    assert ref_files == new_files
    for name in ref_files:
        assert (tmp_path / "ref" / name).read_bytes() == (killed / name).read_bytes(), name


def test_teacher_with_another_tokenizer_is_refused_before_any_forward(tiny_teacher, tmp_path):
    other = tmp_path / "other"
    cfg = load_config("tiny", ["data.train_tokens=20000", "data.heldout_tokens=2000", "data.vocab_size=400",
                               "data.tokenizer_train_chars=100000", "data.seq_len=32", f"data.out={other}"])
    prepare(cfg.data)
    bad = load_config("tiny", [f"data.out={other}", f"teacher.out={tiny_teacher}", f"logits.store={tmp_path / 's'}",
                               "data.seq_len=32", "data.vocab_size=400"])
    with pytest.raises(DataError, match="differs from the token shards' tokenizer"):
        generate_store(bad)
    assert not (tmp_path / "s").exists()


def test_corrupt_store_is_named_by_verify_and_refused_on_open(tiny_teacher, small_data, tmp_path, capsys):
    store_dir = tmp_path / "store"
    args = gen_args(small_data, tiny_teacher, store_dir, "logits.sequences_per_shard=400", "data.seq_len=32")
    generate_store(load_config(args[0], args[1:]))
    shard = store_dir / load_manifest(store_dir)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    capsys.readouterr()  # drop what generation printed
    assert main(["logits", "verify", str(store_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and shard.name in err
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(DataError, match=shard.name):
        LogitStore(store_dir)


def test_wttm_store_keeps_the_full_vocabulary_power_sum_and_trains(tiny_teacher, small_data, tmp_path):
    """`pdl logits generate` with logits.method=wttm keeps log Σ q^γ per token; `pdl train` uses it as WTTM's U."""
    from pd_lightning.logits.processing import teacher_targets

    store_dir = tmp_path / "store"
    args = gen_args(small_data, tiny_teacher, store_dir, "data.seq_len=32", "logits.method=wttm", "logits.wttm_gamma=0.4")
    assert main(["logits", "generate", *args]) == 0
    store = LogitStore(store_dir)
    assert store.power_exponents == (0.4,)
    shards = TokenShards(small_data, "train")
    model = load_causal_lm(tiny_teacher)
    ids = torch.from_numpy(shards.batch([0, 5]))
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size).double()
    u_ref = (torch.softmax(z, -1) ** 0.4).sum(-1)  # WTTM's U: the whole vocabulary
    got = teacher_targets(store.sequences([0, 5]), 0.95, 100, method="wttm", gamma=0.4, store_p=0.95, store_k=100)
    torch.testing.assert_close(got.token_weights.double(), u_ref, rtol=3e-3, atol=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_args = ["train", *args, f"trainer.out={tmp_path / 'run'}", f"tracking.tracking_uri={uri}", "trainer.max_steps=3",
                  "trainer.num_workers=0", "trainer.batch_size=4", "trainer.val_every_n_steps=3", "trainer.val_batches=1"]
    assert main(train_args) == 0
    # the same config asking for another γ is refused before training, naming the fix
    assert main([*train_args[:-6], "logits.wttm_gamma=0.3", f"trainer.out={tmp_path / 'run2'}", "trainer.max_steps=3"]) == 2


# ----------------------------------------------------------------------------- generation without dense logits, any HF teacher

V_TINY = 512  # the tiny BPE's vocabulary (small_data's tokenizer)


def hf_teacher(kind: str, out: Path, tokenizer_dir: Path, *, rows: int = V_TINY, seed: int = 0, **extra) -> Path:
    """A random-init transformers causal LM of another architecture, saved as an HF dir with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pd_lightning.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    common = {"vocab_size": rows, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    shape = {  # 2 layers, width 64: seconds on a CPU
        "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
        "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "rotary_dim": 8},  # LM head with a bias
        "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 128},
    }.get(kind, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 128, "head_dim": 16})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **shape, **extra)).eval()
    if rows > V_TINY:  # padded rows that would dominate if they were not masked (torchtune#2119, trl#3028)
        with torch.no_grad():
            w = model.get_output_embeddings().weight
            w[V_TINY:] = 3.0 * w[: rows - V_TINY]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def same_sparse(a, b) -> bool:
    fields = [torch.equal(x, y) for x, y in zip(a._tensors(), b._tensors())]
    sums = (a.log_power_sums is None and b.log_power_sums is None) or torch.equal(a.log_power_sums, b.log_power_sums)
    return all(fields) and sums and a.power_exponents == b.power_exponents


@pytest.mark.parametrize("kind, extra, mode", [
    ("llama", {}, "hidden"), ("qwen2", {"tie_word_embeddings": True}, "hidden"), ("gpt2", {}, "hidden"),
    ("gpt_neox", {}, "hidden"), ("gptj", {}, "hidden"),
    ("gemma2", {"final_logit_softcapping": 1.0}, "hidden"),  # tanh softcapping after the head
    ("cohere", {"logit_scale": 0.5}, "hidden"), ("granite", {"logits_scaling": 4.0}, "hidden"),  # z·s, z / s
    ("hyperclovax", {"logits_scaling": 4.0}, "logits"),  # z·s under Granite's name: the probe falls back
])
def test_chunked_head_equals_truncating_the_models_dense_fp32_logits(kind, extra, mode, small_data, tmp_path):
    """backbone -> per-chunk head + statistics + cut gives exactly truncate_top_p_k of model(ids).logits."""
    from transformers import AutoModelForCausalLM

    from pd_lightning.logits.generate import TeacherLogits

    model = AutoModelForCausalLM.from_pretrained(hf_teacher(kind, tmp_path / kind, small_data / "tokenizer", **extra)).eval()
    shards = TokenShards(small_data, "train")
    source = TeacherLogits(model, V_TINY, torch.device("cpu"))
    with torch.no_grad():
        err = source.check(torch.from_numpy(shards.batch([0])))
        assert source.mode == mode and (err == 0.0 if mode == "hidden" else err > 0.1)
        # 3 x 31 positions: one 64-row chunk and a 29-row tail; 1 x 31: a single short chunk
        for rows in ([0, 1, 2], [3]):
            ids = torch.from_numpy(shards.batch(rows))
            dense = model(input_ids=ids).logits[:, :-1].float().reshape(-1, V_TINY)
            for p, k, exps in ((0.95, 100, ()), (1.0, 20, (0.5, 2.0))):
                assert same_sparse(source.sparse(ids, p, k, exps), truncate_top_p_k(dense, p, k, power_exponents=exps))


def _dense_path_store(cfg, store_dir: Path) -> None:
    """Today's generation before the chunked path, verbatim: model(ids).logits.float() queued to the writer thread."""
    from pd_lightning.cost import model_cost_shape, store_cost_meta
    from pd_lightning.data.shards import read_manifest
    from pd_lightning.logits.generate import teacher_identity
    from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter

    lg, teacher, data = cfg.logits, Path(cfg.teacher.out), Path(cfg.data.out)
    manifest = read_manifest(data)
    shards = TokenShards(data, "train")
    model = load_causal_lm(teacher)
    writer = LogitStoreWriter(store_dir, vocab_size=model.config.vocab_size, p=lg.store_p, k=lg.store_k,
                              positions_per_sequence=shards.seq_len - 1, num_sequences=len(shards),
                              sequences_per_shard=lg.sequences_per_shard, teacher=str(teacher.resolve()),
                              teacher_config_hash=teacher_identity(teacher), tokenizer_hash=manifest["tokenizer_hash"],
                              encoding=lg.encoding)
    with AsyncShardWriter(writer) as aw:
        for s in writer.pending_shards():
            rng = writer.shard_range(s)
            for first in range(rng.start, rng.stop, lg.batch_size):
                ids = torch.from_numpy(shards.batch(range(first, min(first + lg.batch_size, rng.stop))))
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[:, :-1]
                aw.submit(first, logits.float().reshape(-1, logits.size(-1)))
    writer.finalize(meta={"teacher_params": sum(p.numel() for p in model.parameters()),
                          **store_cost_meta(model_cost_shape(model), len(shards), shards.seq_len),
                          "data": str(data.resolve()), "data_hash": manifest["config_hash"]})


def test_chunked_store_is_byte_identical_to_the_dense_path_also_with_encoder_processes(tiny_teacher, small_data,
                                                                                       tmp_path):
    def files(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("shard-", "manifest"))}

    args = gen_args(small_data, tiny_teacher, tmp_path / "dense", "data.seq_len=32", "logits.sequences_per_shard=200")
    _dense_path_store(load_config(args[0], args[1:]), tmp_path / "dense")
    for name, workers in (("thread", 0), ("processes", 2)):
        a = gen_args(small_data, tiny_teacher, tmp_path / name, "data.seq_len=32", "logits.sequences_per_shard=200",
                     f"logits.encode_workers={workers}")
        generate_store(load_config(a[0], a[1:]))
        assert files(tmp_path / name) == files(tmp_path / "dense"), name
    assert not list((tmp_path / "processes").glob("*.tmp"))


@pytest.mark.parametrize("kind, rows", [("qwen2", 600), ("gpt_neox", V_TINY), ("gptj", V_TINY)])
def test_any_hf_teacher_generates_trains_and_evaluates(kind, rows, small_data, tmp_path, capsys):
    """`pdl logits generate` -> `pdl train` -> `pdl eval` on a teacher of another architecture (Qwen2 with a model
    vocabulary padded past its tokenizer's, like Qwen's 152,064 rows for 151,665 ids)."""
    teacher = hf_teacher(kind, tmp_path / "teacher", small_data / "tokenizer", rows=rows,
                         **({"tie_word_embeddings": True} if kind == "qwen2" else {}))
    # the data tokenized with the teacher's own tokenizer, as users do (transformers loads a Qwen2 dir's tokenizer
    # as Qwen2Tokenizer, whose pipeline differs from the BPE it was saved from)
    data = prepare(load_config("tiny", ["data.train_tokens=12000", "data.heldout_tokens=2000", "data.seq_len=32",
                                        f"data.tokenizer={teacher}", f"data.out={tmp_path / 'data'}"]).data)
    store_dir = tmp_path / "store"
    args = ["tiny", *TINY_DATA, f"data.out={data}", "data.seq_len=32", f"teacher.path={teacher}",
            f"logits.store={store_dir}", "logits.batch_size=16", "logits.sequences_per_shard=200"]
    assert main(["logits", "generate", *args]) == 0
    store = LogitStore(store_dir)
    assert store.vocab_size == V_TINY and store.manifest["meta"]["teacher_vocab_size"] == rows
    shards = TokenShards(data, "train")
    got = store.sequences([0, 9])
    assert int(got.indices.max()) < V_TINY
    with torch.no_grad():
        z = load_causal_lm(teacher)(input_ids=torch.from_numpy(shards.batch([0, 9]))).logits[:, :-1].reshape(-1, rows)
    exact = truncate_top_p_k(z[:, :V_TINY], 0.95, 100)
    assert torch.equal(got.counts, exact.counts)
    assert torch.equal(got.indices.sort(-1).values, exact.indices.sort(-1).values)
    if rows > V_TINY:  # the padded rows are masked: the same as -inf logits there, and unmasked they would be kept
        masked = truncate_top_p_k(torch.cat([z[:, :V_TINY], torch.full_like(z[:, V_TINY:], -math.inf)], 1), 0.95, 100)
        assert torch.equal(masked.counts, exact.counts) and torch.equal(masked.indices, exact.indices)
        torch.testing.assert_close(masked.entropy, exact.entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masked.logit_std, exact.logit_std, rtol=1e-5, atol=1e-5)
        assert (truncate_top_p_k(z, 0.95, 100).indices >= V_TINY).any(-1).float().mean() > 0.5
    run = tmp_path / "run"
    assert main(["train", *args, f"trainer.out={run}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "trainer.max_steps=2", "trainer.num_workers=0", "trainer.batch_size=4", "trainer.val_every_n_steps=2",
                 "trainer.val_batches=1", "loss.alpha=0.9"]) == 0
    assert load_causal_lm(run / "model").config.vocab_size == V_TINY  # the student has the tokenizer's ids, no padding
    capsys.readouterr()
    # a padded teacher's held-out KL is the evaluation's business (its logits would need the same cut): not asked here
    teacher_flag = ["--teacher", "none"] if rows > V_TINY else []
    assert main(["eval", str(run / "model"), "--tasks", "synth_heldout", "--limit", "4", "--json", *teacher_flag]) == 0
    assert '"synth_heldout"' in capsys.readouterr().out


def test_teacher_dtype_auto_is_the_dirs_dtype_on_cuda_and_float32_on_cpu(small_data, tmp_path):
    from pd_lightning.models import teacher_dtype

    for key, named, want in (("dtype", "bfloat16", torch.bfloat16), ("torch_dtype", "float16", torch.float16),
                             ("dtype", None, torch.float32)):  # transformers >= 5 writes dtype, older torch_dtype
        d = tmp_path / f"{key}-{named}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({key: named} if named else {}))
        assert teacher_dtype(d, "auto", "cuda") == want and teacher_dtype(d, "auto", "cpu") == torch.float32
        assert teacher_dtype(d, "bfloat16", "cpu") == torch.bfloat16
    bad = ["logits", "generate", "tiny", f"data.out={small_data}", f"teacher.path={tmp_path}", "teacher.dtype=fp8"]
    assert main(bad) == 2


def test_store_from_a_padded_vocabulary_before_masking_is_refused_by_train(tiny_store, tiny_data, tmp_path, capsys):
    import shutil

    store = tmp_path / "old"
    shutil.copytree(tiny_store, store)
    m = json.loads((store / "manifest.json").read_text())
    m["vocab_size"] = 600  # what generation recorded for a padded teacher before it masked the padded rows
    (store / "manifest.json").write_text(json.dumps(m))
    args = ["train", "tiny", *TINY_DATA, f"data.out={tiny_data}", f"logits.store={store}", f"trainer.out={tmp_path / 'r'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "trainer.max_steps=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vocab_size=600" in err and "regenerate" in err


def test_encoder_process_errors_reach_the_caller_as_one_line(tmp_path):
    """A writer that cannot open (other settings) fails AsyncShardWriter's start; a bad batch fails close()."""
    import functools

    from pd_lightning.errors import DataError
    from pd_lightning.logits.processing import SparseLogits
    from pd_lightning.logits.writer import AsyncShardWriter, LogitStoreWriter

    P, V = 8, 64
    settings = dict(vocab_size=V, p=0.95, k=4, positions_per_sequence=P, num_sequences=8, sequences_per_shard=2,
                    teacher="t", teacher_config_hash="-", tokenizer_hash="-", rank=0, world_size=2)
    z = torch.randn(2 * P, V)
    sparse = truncate_top_p_k(z, 0.95, 4)
    LogitStoreWriter(tmp_path, **settings).write_sequences(0, sparse)  # shard 0 of rank 0 finished
    other = functools.partial(LogitStoreWriter, tmp_path, **(settings | {"p": 0.9}), verify_existing=False)
    with pytest.raises(DataError, match="p=0.95"):
        AsyncShardWriter(LogitStoreWriter(tmp_path, **settings), encode_workers=1, make_writer=other)
    same = functools.partial(LogitStoreWriter, tmp_path, **settings, verify_existing=False)
    aw = AsyncShardWriter(LogitStoreWriter(tmp_path, **settings), encode_workers=1, make_writer=same)
    aw.submit(2, SparseLogits.cat([sparse]))  # sequences 2-3: shard 1, which is rank 1's
    with pytest.raises(RuntimeError, match="shard 1 is not pending on rank 0"):
        aw.close()


def test_bench_gpu_runs_end_to_end_in_cpu_smoke_mode():
    """benchmarks/bench_gpu.py, the GPU check, at tiny sizes on CPU: every phase runs and the JSON line is complete."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gpu.py"), "--cpu-smoke"], cwd=root,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for phase in ("generation", "train_lm", "train_pd", "eval"):
        assert "error" not in out[phase], out[phase]
    gen = out["generation"]
    assert gen["head_mode"] == "hidden" and gen["tokens_per_s"] > 0 and gen["entries_per_token"] >= 1
    assert out["train_pd"]["step_s"] > 0 and out["train_lm"]["tokens_per_s"] > 0 and out["pd_vs_lm_step_time"] > 0


def test_truncate_chunk_overwriting_its_logits_gives_the_same_entries_also_with_masked_rows():
    from pd_lightning.logits.processing import truncate_chunk

    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 300, generator=g) * 3
    for masked in (False, True):
        if masked:
            z[:, 250:] = -math.inf  # -inf logits take the masked statistics path
        ref = truncate_chunk(z, 0.95, 100, torch.empty(2, 64, 300), (0.5,))
        got = truncate_chunk(z.clone(), 0.95, 100, torch.empty(1, 64, 300), (0.5,), z_scratch=True)
        assert same_sparse(got, ref)
