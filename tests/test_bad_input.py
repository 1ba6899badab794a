"""Bad-input campaign: malformed configs, corpora, logit stores and model dirs through the `pdl` CLI.

Every case must end with exit code 2, no traceback, one error line last on stderr that names what
is wrong, and no partial output: the case's working directory (where every requested output lies)
and the shared fixtures are unchanged afterwards. Cases run in-process through `cli.main` (imports
paid once) except those marked `sub`, which run `python -m pd_lightning.cli` as a real process.

Adding a case is one line in CASES: C(id, "argv with {placeholders}", "text the error must name", ...).
Placeholders: {tmp} the case's empty working dir, {data} {store} {teacher} the session fixtures,
{uri} an MLflow sqlite URI inside {tmp}. `setup` builds the bad input under {tmp} first.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pd_lightning.cli import main

from conftest import TINY_DATA

ERROR_LINE = re.compile(r"^pdl( [a-z]+)*: error: ")  # ours (`pdl: error:`) and argparse's (`pdl logits: error:`)
TINY = " ".join(TINY_DATA)


# --------------------------------------------------------------------------------------- bad inputs


def text(name: str, content: str | bytes) -> Callable[[dict], None]:
    """Write a file under {tmp}."""
    def setup(env: dict) -> None:
        path = Path(env["tmp"]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _unshare(path: Path) -> bytes:
    """Replace a hard link by a private copy (so editing it leaves the fixture alone); return its bytes."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return data


def store(*edits: Callable[[Path], None]) -> Callable[[dict], None]:
    """{tmp}/store: the session store, hard-linked file by file, then edited."""
    def setup(env: dict) -> None:
        dst = Path(env["tmp"]) / "store"
        dst.mkdir()
        for f in Path(env["store"]).iterdir():
            os.link(f, dst / f.name)
        for edit in edits:
            edit(dst)
    return setup


def truncate(name: str, by: int = 5) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = _unshare(d / name)
        (d / name).write_bytes(data[:-by])
    return edit


def flip(name: str, where: float = 0.5) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = bytearray(_unshare(d / name))
        data[int(len(data) * where)] ^= 0x10
        (d / name).write_bytes(bytes(data))
    return edit


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def manifest(**fields) -> Callable[[Path], None]:
    """Overwrite manifest fields (None deletes the field)."""
    def edit(d: Path) -> None:
        m = json.loads(_unshare(d / "manifest.json"))
        for k, v in fields.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def manifest_bytes(content: bytes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        _unshare(d / "manifest.json")
        (d / "manifest.json").write_bytes(content)
    return edit


def model_dir(config: dict | str | None, tokenizer: bool = True, name: str = "model") -> Callable[[dict], None]:
    """{tmp}/model: a config.json (dict, raw text or none) and the tiny teacher's tokenizer, no weights."""
    def setup(env: dict) -> None:
        d = Path(env["tmp"]) / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if tokenizer:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(Path(env["teacher"]) / f, d / f)
    return setup


def model_copy(*, weights: bytes | None = None) -> Callable[[dict], None]:
    """{tmp}/model: the tiny teacher with its weights replaced (e.g. truncated)."""
    def setup(env: dict) -> None:
        d = Path(env["tmp"]) / "model"
        shutil.copytree(env["teacher"], d)
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
    return setup


def chain(*setups: Callable[[dict], None]) -> Callable[[dict], None]:
    def setup(env: dict) -> None:
        for s in setups:
            s(env)
    return setup


def sweep_file(content: str | bytes, name: str = "s.yaml") -> Callable[[dict], None]:
    """{tmp}/s.yaml with the given text (a sweep definition) or bytes."""
    def setup(env: dict) -> None:
        path = Path(env["tmp"]) / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


SWEEP_OK = "name: s\nbase: tiny\nbaseline: {label: LM, set: {loss.alpha: 0.0}}\ngrid: {loss.alpha: [0.5, 1.0]}\n"


BINARY = bytes(range(256)) * 8 + b"\xff\xfe\x00\x80" * 64  # not UTF-8, NUL bytes
BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 512, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 512, "d_model": 32,
      "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16}
UNKNOWN = {"model_type": "no-such-architecture", "vocab_size": 512}

GEN = f"logits generate tiny {TINY} data.out={{data}} logits.store={{tmp}}/out"
TRAIN = (f"train tiny {TINY} data.out={{data}} trainer.out={{tmp}}/run tracking.tracking_uri={{uri}} "
         "trainer.max_steps=2 trainer.num_workers=0")
PREP = "data prepare tiny data.out={tmp}/out data.train_tokens=2000 data.heldout_tokens=500 data.tokenizer_train_chars=20000"


@dataclass(frozen=True)
class C:
    """One bad input: the command, what the error must name, how to build the input, real process or not."""

    id: str
    argv: str
    names: str | tuple[str, ...]
    setup: Callable[[dict], None] | None = field(default=None, compare=False)
    sub: bool = False


CASES = [
    # ---- configs: overrides
    C("override-typo-key", "config show tiny loss.alpah=0.9", ("loss.alpah", "did you mean 'alpha'")),
    C("override-unknown-section", "config show tiny los.alpha=0.9", "'los'", sub=True),
    C("override-not-int", "config show tiny trainer.max_steps=abc", ("trainer.max_steps", "expected int")),
    C("override-float-for-int", "config show tiny trainer.batch_size=1.5", ("trainer.batch_size", "expected int")),
    C("override-not-bool", "config show tiny loss.fused=maybe", ("loss.fused", "expected bool")),
    C("override-list-for-float", "config show tiny optim.lr=[1,2]", ("optim.lr", "expected float")),
    C("override-alpha-out-of-range", "config show tiny loss.alpha=1.5", "loss.alpha"),
    C("override-negative-lr", "config show tiny optim.lr=-1", "optim.lr"),
    C("override-nan-lr", "config show tiny optim.lr=nan", "optim.lr"),
    C("override-choice-typo", "config show tiny optim.lr_schedule=cosin", ("optim.lr_schedule", "cosine")),
    C("override-unknown-loss", "config show tiny loss.kind=kl", "loss.kind"),
    C("override-p-zero", "config show tiny logits.p=0", "logits.p"),
    C("override-k-zero", "config show tiny logits.k=0", "logits.k"),
    C("override-p-beyond-store", "config show tiny logits.p=0.99", "logits.p"),
    C("override-seq-len-1", "config show tiny data.seq_len=1", "data.seq_len"),
    C("override-vocab-too-small", "config show tiny data.vocab_size=100", "data.vocab_size"),
    C("override-unknown-preset", "config show tiny model.preset=tiny-3m", "model.preset"),
    C("override-bad-precision", "config show tiny trainer.precision=fp16", "trainer.precision"),
    C("override-normkd-with-tau", "config show tiny logits.method=normkd logits.tau=2", "logits.tau"),
    C("override-without-value", "config show tiny loss.alpha", "loss.alpha"),
    C("override-without-section", "config show tiny alpha=0.9", "'alpha'"),
    C("override-source-needs-path", "config show tiny data.source=text", "data.path"),
    C("override-unknown-source", "config show tiny data.source=parquett", "data.source"),
    C("override-zero-devices", "train tiny trainer.devices=0 trainer.out={tmp}/run", "trainer.devices", sub=True),
    # ---- configs: files
    C("config-missing-file", "config show {tmp}/nope.yaml", "nope.yaml"),
    C("config-packaged-typo", "config show tiyn", ("'tiyn'", "did you mean 'tiny'")),
    C("yaml-truncated", "config show {tmp}/c.yaml", ("c.yaml", "YAML"), text("c.yaml", "loss: {kind: nll, alpha: 0.9\n")),
    C("yaml-bad-indent", "config show {tmp}/c.yaml", ("c.yaml", "line 3"), text("c.yaml", "loss:\n  alpha: 0.9\n kind: nll\n")),
    C("yaml-top-level-list", "config show {tmp}/c.yaml", ("c.yaml", "mapping"), text("c.yaml", "- loss\n- optim\n")),
    C("yaml-unknown-section", "config show {tmp}/c.yaml", "trainr", text("c.yaml", "trainr: {max_steps: 5}\n")),
    C("yaml-unknown-key", "config show {tmp}/c.yaml", "loss.alhpa", text("c.yaml", "loss: {alhpa: 0.5}\n"), sub=True),
    C("yaml-wrong-type", "config show {tmp}/c.yaml", ("trainer.max_steps", "expected int"), text("c.yaml", "trainer: {max_steps: [1, 2]}\n")),
    C("yaml-section-not-mapping", "config show {tmp}/c.yaml", "'loss'", text("c.yaml", "loss: 0.9\n")),
    C("yaml-defaults-cycle", "config show {tmp}/c.yaml", "cycle", text("c.yaml", "defaults: [c.yaml]\n")),
    C("yaml-defaults-missing", "config show {tmp}/c.yaml", "base.yaml", text("c.yaml", "defaults: [base.yaml]\n")),
    C("yaml-defaults-not-a-list", "config show {tmp}/c.yaml", "defaults", text("c.yaml", "defaults: {a: 1}\n")),
    C("yaml-binary-file", "config show {tmp}/c.yaml", "c.yaml", text("c.yaml", BINARY)),
    C("yaml-python-tag", "config show {tmp}/c.yaml", "c.yaml",
      text("c.yaml", "loss: !!python/object/apply:os.system ['touch pwned']\n"), sub=True),
    C("yaml-bad-value-in-train", TRAIN.replace("train tiny", "train {tmp}/c.yaml"), "loss.alpha",
      text("c.yaml", "defaults: [tiny]\nloss: {alpha: 2}\n")),
    # ---- corpora for `pdl data prepare`
    C("text-empty-file", PREP + " data.source=text data.path={tmp}/c.txt", "data.path", text("c.txt", "")),
    C("text-binary-file", PREP + " data.source=text data.path={tmp}/c.txt", "c.txt", text("c.txt", BINARY), sub=True),
    C("text-nul-bytes", PREP + " data.source=text data.path={tmp}/c.txt", "c.txt", text("c.txt", "some text\x00more\n")),
    C("text-no-match", PREP + " data.source=text data.path={tmp}/nothing*.txt", "nothing*.txt"),
    C("jsonl-empty-file", PREP + " data.source=jsonl data.path={tmp}/c.jsonl", "data.path", text("c.jsonl", "")),
    C("jsonl-binary-file", PREP + " data.source=jsonl data.path={tmp}/c.jsonl", "c.jsonl", text("c.jsonl", BINARY)),
    C("jsonl-bad-line", PREP + " data.source=jsonl data.path={tmp}/c.jsonl", ("c.jsonl", "line 2"),
      text("c.jsonl", '{"text": "a document"}\n{"text": "unterminated\n')),
    C("jsonl-missing-field", PREP + " data.source=jsonl data.path={tmp}/c.jsonl", "data.text_field",
      text("c.jsonl", '{"body": "a document"}\n')),
    C("prepare-out-is-a-file", "data prepare tiny data.out={tmp}/out", "data.out", text("out", "not a dir")),
    C("prepare-out-foreign-dir", "data prepare tiny data.out={tmp}/out", "data.out", text("out/notes.txt", "mine")),
    C("prepare-missing-tokenizer", PREP + " data.tokenizer={tmp}/no-tokenizer", "no-tokenizer"),
    # ---- logit stores for `pdl logits inspect / verify`
    C("store-missing-dir", "logits verify {tmp}/nowhere", ("nowhere", "manifest.json")),
    C("store-missing-manifest", "logits inspect {tmp}/store", "manifest.json", store(remove("manifest.json")), sub=True),
    C("store-manifest-not-json", "logits verify {tmp}/store", "manifest", store(manifest_bytes(b'{"format": "pd-li'))),
    C("store-manifest-lacks-fields", "logits inspect {tmp}/store", "shards", store(manifest(shards=None))),
    C("store-truncated-shard-verify", "logits verify {tmp}/store", "shard-000001.bin", store(truncate("shard-000001.bin")), sub=True),
    C("store-truncated-shard-inspect", "logits inspect {tmp}/store", "shard-000001.bin", store(truncate("shard-000001.bin"))),
    C("store-bit-flip-verify", "logits verify {tmp}/store", "shard-000002.bin", store(flip("shard-000002.bin"))),
    C("store-bit-flip-inspect", "logits inspect {tmp}/store --json", "shard-000002.bin", store(flip("shard-000002.bin"))),
    C("store-bit-flip-header", "logits verify {tmp}/store", "shard-000000.bin", store(flip("shard-000000.bin", 0.00002))),
    C("store-missing-shard", "logits verify {tmp}/store", "shard-000003.bin", store(remove("shard-000003.bin"))),
    C("store-wrong-vocab-verify", "logits verify {tmp}/store", "vocab_size", store(manifest(vocab_size=300))),
    C("store-unknown-format", "logits inspect {tmp}/store", "format", store(manifest(format_version=99))),
    # ---- logit stores for `pdl train`
    C("train-store-missing-manifest", TRAIN + " logits.store={tmp}/store", "logits.store", store(remove("manifest.json"))),
    C("train-store-wrong-vocab", TRAIN + " logits.store={tmp}/store", "vocab_size", store(manifest(vocab_size=300)), sub=True),
    C("train-store-wrong-tokenizer", TRAIN + " logits.store={tmp}/store", "tokenizer_hash", store(manifest(tokenizer_hash="0" * 16))),
    C("train-store-truncated-shard", TRAIN + " logits.store={tmp}/store", "shard-000004.bin", store(truncate("shard-000004.bin"))),
    C("train-store-missing-shard", TRAIN + " logits.store={tmp}/store", "shard-000001.bin", store(remove("shard-000001.bin"))),
    C("train-p-beyond-store", TRAIN + " logits.store={store} logits.store_p=1.0 logits.p=1.0", "logits.p"),
    C("train-wttm-store-without-power-sums", TRAIN + " logits.store={store} logits.method=wttm",
      ("logits.method=wttm", "store_power_exponents=[0.5]", "wttm_weight=support")),
    C("store-v1-at-p-1", "logits inspect {tmp}/store", ("p=1", "earlier version", "pdl logits generate"),
      store(manifest(p=1.0, encoding={"name": "egsqrt", "version": 1, "index_bits": 9, "value_step": 1 / 384}))),
    C("config-bad-power-exponent", "config show tiny logits.store_power_exponents=[0]", "logits.store_power_exponents"),
    C("train-missing-data", TRAIN.replace("data.out={data}", "data.out={tmp}/no-data") + " loss.alpha=0", "no-data"),
    # ---- model dirs for `pdl eval` and `pdl logits generate`
    C("eval-missing-dir", "eval {tmp}/no-model", "no-model", sub=True),
    C("eval-no-config", "eval {tmp}/model", ("model", "config.json"), model_dir(None)),
    C("eval-config-not-json", "eval {tmp}/model", ("model", "config.json"), model_dir("{not json")),
    C("eval-unknown-architecture", "eval {tmp}/model", ("model", "no-such-architecture"), model_dir(UNKNOWN), sub=True),
    C("eval-bert-without-weights", "eval {tmp}/model", ("model", "weights"), model_dir(BERT)),
    C("eval-t5", "eval {tmp}/model", ("model", "t5"), model_dir(T5)),
    C("eval-truncated-weights", "eval {tmp}/model", "model", model_copy(weights=b"\x00" * 100)),
    C("eval-zero-limit", "eval {teacher} --limit 0", "limit"),
    C("eval-bad-int-flag", "eval {teacher} --batch-size many", "--batch-size", sub=True),
    C("generate-missing-teacher", GEN + " teacher.path={tmp}/no-teacher", "no-teacher"),
    C("generate-teacher-is-a-file", GEN + " teacher.path={tmp}/model", "model", text("model", "weights?")),
    C("generate-teacher-no-tokenizer", GEN + " teacher.path={tmp}/model", ("model", "tokenizer"), model_dir(UNKNOWN, tokenizer=False)),
    C("generate-teacher-no-config", GEN + " teacher.path={tmp}/model", ("model", "config.json"), model_dir(None), sub=True),
    C("generate-teacher-config-not-json", GEN + " teacher.path={tmp}/model", ("model", "config.json"), model_dir("[1, 2")),
    C("generate-unknown-architecture", GEN + " teacher.path={tmp}/model", ("model", "no-such-architecture"), model_dir(UNKNOWN)),
    C("generate-bert-without-weights", GEN + " teacher.path={tmp}/model", ("model", "weights"), model_dir(BERT)),
    C("generate-t5", GEN + " teacher.path={tmp}/model", ("model", "t5"), model_dir(T5), sub=True),
    C("generate-truncated-weights", GEN + " teacher.path={tmp}/model", "model", model_copy(weights=b"\x00" * 100)),
    C("teacher-train-with-path", "teacher train tiny teacher.path={teacher} teacher.out={tmp}/t", "teacher.path"),
    # ---- sweep files
    C("sweep-missing-file", "sweep run {tmp}/none.yaml", ("none.yaml", "does not exist")),
    C("sweep-unknown-name", "sweep run table4_alpah", ("'table4_alpah'", "shipped sweep", "did you mean 'table4_alpha'")),
    C("sweep-bad-tracking-uri", "sweep run table4_alpha --tracking-uri runs/mlflow", "tracking.tracking_uri='runs/mlflow'"),
    C("train-bad-tracking-uri", TRAIN + " --tracking-uri mlflow.db", "tracking.tracking_uri='mlflow.db'"),
    C("quickstart-bad-tracking-uri", "quickstart --out {tmp}/qs --tracking-uri mlruns", "tracking.tracking_uri='mlruns'"),
    C("sweep-name-traversal", "sweep run {tmp}/s.yaml", ("name='../../escape'",),
      sweep_file(SWEEP_OK.replace("name: s", "name: ../../escape")), sub=True),
    C("sweep-unknown-key", "sweep run {tmp}/s.yaml", ("'gird'", "did you mean 'grid'"),
      sweep_file("name: s\nbase: tiny\ngird: {loss.alpha: [0.5]}\n")),
    C("sweep-unknown-field", "sweep validate {tmp}/s.yaml", ("loss.alpah", "did you mean 'alpha'"),
      sweep_file("name: s\nbase: tiny\ngrid: {loss.alpah: [0.5]}\n")),
    C("sweep-truncated-yaml", "sweep run {tmp}/s.yaml", ("s.yaml", "not valid YAML"),
      sweep_file("name: s\nbase: tiny\ngrid: {loss.alpha: [0.5, 1.0\n"), sub=True),
    C("sweep-binary-file", "sweep status {tmp}/s.yaml", "s.yaml", sweep_file(BINARY)),
    C("sweep-not-a-mapping", "sweep run {tmp}/s.yaml", ("s.yaml", "mapping"), sweep_file("- a\n- b\n")),
    C("sweep-grid-not-list", "sweep run {tmp}/s.yaml", "grid.loss.alpha=0.5",
      sweep_file("name: s\nbase: tiny\ngrid: {loss.alpha: 0.5}\n")),
    C("sweep-invalid-point", "sweep validate {tmp}/s.yaml", ("loss.alpha=1.5", "[0, 1]"),
      sweep_file(SWEEP_OK.replace("[0.5, 1.0]", "[0.5, 1.5]"))),
    C("sweep-bad-scale", "sweep run {tmp}/s.yaml --scale huge", "scale 'huge'",
      sweep_file(SWEEP_OK + "scales: {tiny: {}, paper: {base: paper}}\n")),
    C("sweep-bad-storage", "sweep run {tmp}/s.yaml --storage mongodb://db/x", "--storage='mongodb://db/x'",
      sweep_file(SWEEP_OK), sub=True),
    C("sweep-zero-workers", "sweep run {tmp}/s.yaml --workers 0", "--workers=0", sweep_file(SWEEP_OK)),
    C("sweep-zero-threads", "sweep run {tmp}/s.yaml --threads 0", "--threads=0", sweep_file(SWEEP_OK)),
    C("sweep-search-log-from-zero", "sweep run {tmp}/s.yaml", "search.space.logits.tau.low=0",
      sweep_file("name: s\nbase: tiny\nsearch: {trials: 2, space: {logits.tau: {low: 0, high: 2, log: true}}}\n")),
    C("sweep-group-by-not-in-grid", "sweep run {tmp}/s.yaml", "group_by=['model.preset']",
      sweep_file(SWEEP_OK + "group_by: [model.preset]\n")),
    C("sweep-duplicate-seed", "sweep run {tmp}/s.yaml", "seeds=[0, 0]", sweep_file(SWEEP_OK + "seeds: [0, 0]\n")),
    C("report-before-any-run", "report {tmp}/s.yaml", ("no finished, evaluated runs",), sweep_file(SWEEP_OK), sub=True),
    C("report-other-store", "report {tmp}/s.yaml --tracking-uri sqlite:///{tmp}/other/mlflow.db",
      ("no finished, evaluated runs in sqlite:///{tmp}/other/mlflow.db",), sweep_file(SWEEP_OK)),
    C("quickstart-out-is-a-file", "quickstart --out {tmp}/s.yaml", ("--out=", "is a file"), sweep_file(SWEEP_OK)),
    # ---- the command line itself
    C("cli-missing-action", "logits", "ACTION", sub=True),
    C("cli-unknown-command", "trian tiny", "trian"),
]


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and dir under the roots with its size and mtime: any write shows up."""
    snap = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                snap[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return snap


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_with_exit_2_and_nothing_written(case, tiny_data, tiny_store, tiny_teacher,
                                                                          tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    env = {"tmp": str(work), "data": str(tiny_data), "store": str(tiny_store), "teacher": str(tiny_teacher),
           "uri": f"sqlite:///{work / 'mlflow.db'}"}
    if case.setup:
        case.setup(env)
    argv = shlex.split(case.argv.format(**env))
    names = (case.names,) if isinstance(case.names, str) else case.names
    names = [n.format(**env) for n in names]
    before = _snapshot(work, tiny_data, tiny_store, tiny_teacher)

    if case.sub:
        proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *argv], capture_output=True, text=True,
                              cwd=work, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        code, err = proc.returncode, proc.stderr
    else:
        monkeypatch.chdir(work)  # anything written relative to the working dir lands in the snapshot
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err

    lines = [line for line in err.splitlines() if line.strip()]
    print(f"{case.id}: exit {code}: {lines[-1] if lines else ''}")  # the campaign's log (pytest -s)
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines and ERROR_LINE.match(lines[-1]), err[-3000:]
    assert sum(bool(ERROR_LINE.match(line)) for line in lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    assert _snapshot(work, tiny_data, tiny_store, tiny_teacher) == before, "the failed command left output behind"


def test_the_campaign_is_large_and_mixes_real_processes():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert sum(c.sub for c in CASES) >= 10
