"""`pdl logits generate` on a real tiny teacher: content, resume after SIGKILL, refusal of mismatched vocabularies."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def small_data(tiny_data: Path, tmp_path_factory) -> Path:
    """A small dataset tokenized with the tiny teacher's tokenizer (so the teacher matches it)."""
    out = tmp_path_factory.mktemp("small") / "data"
    cfg = load_config("tiny", ["data.train_tokens=40000", "data.heldout_tokens=2000", "data.seq_len=32",
                               f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.out={out}"])
    return prepare(cfg.data, quiet=True)


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


def test_killed_generation_resumes_to_a_byte_identical_store(tiny_teacher, small_data, tmp_path):
    args = gen_args(small_data, tiny_teacher, tmp_path / "ref", "logits.sequences_per_shard=100", "data.seq_len=32")
    generate_store(load_config(args[0], args[1:]), quiet=True)

    killed = tmp_path / "killed"
    kargs = gen_args(small_data, tiny_teacher, killed, "logits.sequences_per_shard=100", "data.seq_len=32")
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
    generate_store(load_config(kargs[0], kargs[1:]), quiet=True)

    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.name.startswith(("shard-", "manifest")))
    new_files = sorted(p.name for p in killed.iterdir() if p.name.startswith(("shard-", "manifest")))
    assert ref_files == new_files
    for name in ref_files:
        assert (tmp_path / "ref" / name).read_bytes() == (killed / name).read_bytes(), name


def test_teacher_with_another_tokenizer_is_refused_before_any_forward(tiny_teacher, tmp_path):
    other = tmp_path / "other"
    cfg = load_config("tiny", ["data.train_tokens=20000", "data.heldout_tokens=2000", "data.vocab_size=400",
                               "data.tokenizer_train_chars=100000", "data.seq_len=32", f"data.out={other}"])
    prepare(cfg.data, quiet=True)
    bad = load_config("tiny", [f"data.out={other}", f"teacher.out={tiny_teacher}", f"logits.store={tmp_path / 's'}",
                               "data.seq_len=32", "data.vocab_size=400"])
    with pytest.raises(DataError, match="differs from the token shards' tokenizer"):
        generate_store(bad, quiet=True)
    assert not (tmp_path / "s").exists()


def test_corrupt_store_is_named_by_verify_and_refused_on_open(tiny_teacher, small_data, tmp_path, capsys):
    store_dir = tmp_path / "store"
    args = gen_args(small_data, tiny_teacher, store_dir, "logits.sequences_per_shard=400", "data.seq_len=32")
    generate_store(load_config(args[0], args[1:]), quiet=True)
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
