"""Evaluation through the real lm-evaluation-harness: local suite, MLflow logging, offline failures, `pdl eval`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pd_lightning import cli
from pd_lightning import evaluation as ev
from pd_lightning.evaluation import harness, task_data, write_task_data
from pd_lightning.data.corpus import EVAL_TASKS, heldout_texts, make_eval_items
from pd_lightning.errors import ConfigError, DataError, UserError


LOCAL_MC = ("synth_continuation", "synth_facts", "synth_arithmetic")
ICL_TASKS = ("icl_copy_random", "icl_copy_natural", "icl_facts_5shot")  # local, out of the Average
# The paper suite's shots per task (secondary source; MMLU 5, not the source's 6).
PAPER_SHOTS = {"hellaswag": 0, "winogrande": 0, "piqa": 0, "mmlu": 5, "c3": 5, "ceval-valid": 5, "gsm8k": 8}


@pytest.fixture(scope="module")
def random_model(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init model of the teacher's shape and config, saved with the teacher's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from pd_lightning.models import build_model

    cfg = AutoConfig.from_pretrained(tiny_teacher)
    out = tmp_path_factory.mktemp("random") / "tiny"
    model = build_model("tiny-1m", cfg.vocab_size, seed=0, eos_token_id=cfg.eos_token_id,
                        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
                        max_seq_len=1024)  # as a training model is built; only our exports state their context
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real sqlite MLflow store (made once: its schema migration takes seconds): (tracking_uri, experiment id)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri).create_experiment("eval-test", artifact_location=(root / "art").as_uri())


@pytest.fixture()
def mlflow_run(mlflow_store: tuple[str, str]) -> tuple[str, str]:
    """A fresh finished run in the store: (tracking_uri, run_id)."""
    from mlflow.tracking import MlflowClient

    uri, experiment = mlflow_store
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)  # eval usually runs after training has closed its run
    return uri, run.info.run_id


# ----------------------------------------------------------------------------------------------
# Suites and task definitions


def test_local_suite_is_the_corpus_tasks_plus_heldout_perplexity():
    specs = ev.load_suite("local")
    assert [s.task for s in specs] == [*EVAL_TASKS, "synth_heldout", *ICL_TASKS]
    assert all(s.in_average for s in specs if s.task in EVAL_TASKS)
    heldout = specs[3]
    assert heldout.metric == "bits_per_byte" and heldout.in_average is False
    icl = {s.task: s for s in specs[4:]}
    assert all(s.metric == "acc" and s.in_average is False for s in icl.values())
    assert icl["icl_facts_5shot"].num_fewshot == 5 and icl["icl_copy_random"].num_fewshot == 0


def test_synth_task_item_counts_keep_stderr_below_1_5_points():
    manifest = json.loads((ev.TASKS_DIR / "data" / "manifest.json").read_text())
    for task in EVAL_TASKS:
        cfg = yaml.safe_load((ev.TASKS_DIR / f"{task}.yaml").read_text())
        n = manifest["datasets"][cfg["dataset_kwargs"]["dataset"]]["test"]
        # The harness's acc stderr is sqrt(p(1-p)/(n-1)); p = 0.5 is the worst case.
        assert 100 * math.sqrt(0.25 / (n - 1)) < 1.5, (task, n)


def test_paper_suite_names_harness_tasks_with_documented_shots():
    specs = {s.task: s for s in ev.load_suite("paper")}
    assert list(specs) == ["hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval-valid", "gsm8k"]
    # The shots of a secondary source (summaries of the paper's appendix A.1), MMLU 5 not 6 (the
    # suite file says why); test_paper_suite_runs_each_task_at_its_shots checks what the harness runs.
    assert {t: s.num_fewshot for t, s in specs.items()} == PAPER_SHOTS
    tm = ev.task_manager(True)
    known = set(tm.all_tasks)
    assert set(specs) <= known  # every name resolves: the harness's own, or c3 from our dir
    assert tm.task_index["c3"].yaml_path == ev.TASKS_DIR / "c3.yaml"
    assert specs["gsm8k"].filter == "strict-match"


def test_c3_templates_render_a_clue_row():
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    cfg = load_yaml(ev.TASKS_DIR / "c3.yaml", resolve_func=False)
    assert (cfg["dataset_path"], cfg["dataset_name"]) == ("clue/clue", "c3")
    row = {"id": 0, "context": ["男：你今天怎么这么高兴？", "女：我考上大学了。"], "question": "女的为什么高兴？",
           "choice": ["找到工作了", "考上大学了", "过生日"], "answer": "考上大学了"}
    assert apply_template(cfg["doc_to_text"], row) == "男：你今天怎么这么高兴？\n女：我考上大学了。\n问题：女的为什么高兴？\n答案："
    assert apply_template(cfg["doc_to_target"], row) == "1"
    assert row[cfg["doc_to_choice"]] == row["choice"]


def test_synth_datasets_are_the_corpus_items_with_disjoint_fewshot_items():
    load = task_data.local_data().load  # what the task YAMLs call, with the metadata the harness passes too
    ds = load("synth_facts", corpus_seed=0, version=1.0)
    n = ds["test"].num_rows
    assert n == 1200 and ds["test"].to_list() == make_eval_items("synth_facts", n)
    assert ds["train"].to_list() == make_eval_items("synth_facts", n + ev.HELDOUT_FEWSHOT_ITEMS)[n:]
    assert load("synth_heldout")["test"]["text"] == heldout_texts(500)
    # Another corpus world: its own files (written once per process), and never the shipped world's by mistake.
    other_dir = ev.task_data_dir(1)
    other_world = load("synth_facts", corpus_seed=1, data_dir=str(other_dir))
    assert other_world["test"].to_list() == make_eval_items("synth_facts", n, seed=1) != ds["test"].to_list()
    with pytest.raises(ValueError, match=r"corpus_seed=1: the local task data in .* is for corpus_seed=0"):
        load("synth_facts", corpus_seed=1)
    with pytest.raises(ValueError, match="dataset='synth_fact' is not in"):
        load("synth_fact")


def test_task_data_files_are_what_the_generators_make():
    """The shipped items are regenerated and compared byte for byte (`python -m pd_lightning.evaluation.write_task_data`
    rewrites them); every task YAML reads them through the reader beside it, never through the lab."""
    from lm_eval.tasks._yaml_loader import load_yaml

    shipped = ev.TASKS_DIR / "data"
    files = ev.dataset_files(0)
    assert task_data.differing_files(shipped, files) == []
    assert sorted(p.name for p in shipped.iterdir()) == sorted(files)
    assert write_task_data.main(["--check"]) == 0
    manifest = json.loads(files["manifest.json"])
    reading = []
    for path in sorted(ev.TASKS_DIR.glob("*.yaml")):
        assert "pd_lightning." not in re.sub(r"#.*", "", path.read_text()), path.name  # no code of the lab
        cfg = load_yaml(path, resolve_func=False)  # with its includes
        if "task" in cfg and "custom_dataset" in cfg:  # a task (not a shared base file) of ours
            assert cfg["custom_dataset"] == str(ev.TASKS_DIR / "_local_data.load"), path.name
            assert cfg["dataset_kwargs"]["dataset"] in manifest["datasets"], path.name
            reading.append(cfg["task"])
    assert sorted(reading) == sorted(s.task for s in ev.load_suite("local"))  # every local task, not vacuous


def test_task_data_command_writes_and_checks_a_world(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "world1"
    assert write_task_data.main(["--corpus-seed", "1", "--out", str(out)]) == 0
    assert write_task_data.main(["--corpus-seed", "1", "--out", str(out), "--check"]) == 0
    (out / "synth_facts.test.jsonl").write_text("{}\n")
    assert write_task_data.main(["--corpus-seed", "1", "--out", str(out), "--check"]) == 1
    assert "synth_facts.test.jsonl" in capsys.readouterr().out
    # the shipped world is corpus_seed 0: another one needs its own --out
    assert write_task_data.main(["--corpus-seed", "1"]) == 2
    assert write_task_data.main(["--out", str(out / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert "--corpus-seed=1 needs --out DIR" in err and "is a file" in err


def test_resolve_tasks_keeps_suite_settings_and_refuses_bad_names():
    specs = ev.resolve_tasks("local", "gsm8k, synth_facts")
    assert [(s.task, s.num_fewshot, s.filter) for s in specs] == [("gsm8k", 8, "strict-match"), ("synth_facts", 0, "none")]
    with pytest.raises(ConfigError, match=r"eval.suite='papers'.*did you mean 'paper'"):
        ev.resolve_tasks("papers")
    with pytest.raises(ConfigError, match="names no task"):
        ev.resolve_tasks("local", " , ")


def test_suite_files_are_validated(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("tasks:\n  - synth_facts\n  - {task: synth_arithmetic, num_fewshot: 2, in_average: false}\n")
    assert ev.load_suite(str(path)) == [ev.TaskSpec("synth_facts"),
                                        ev.TaskSpec("synth_arithmetic", num_fewshot=2, in_average=False)]
    path.write_text("tasks:\n  - {task: synth_facts, num_fewshot: five}\n")
    with pytest.raises(ConfigError, match="num_fewshot='five'; expected a non-negative integer"):
        ev.load_suite(str(path))
    path.write_text("tasks:\n  - {task: synth_facts, shots: 5}\n")
    with pytest.raises(ConfigError, match="must be a task name or a mapping with keys"):
        ev.load_suite(str(path))
    path.write_text("name: empty\n")
    with pytest.raises(ConfigError, match="non-empty list under 'tasks'"):
        ev.load_suite(str(path))


# ----------------------------------------------------------------------------------------------
# The harness on the tiny teacher


def test_local_suite_through_the_harness_logs_to_mlflow(tiny_teacher: Path, mlflow_run: tuple[str, str],
                                                        tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri, run_id = mlflow_run
    result = ev.evaluate(tiny_teacher, suite="local", limit=40, batch_size=16, run_id=run_id, tracking_uri=uri)
    assert result["failed"] == {} and result["backend"] in ("hf", "pdl")
    assert result["max_length"] == 64  # the fixture teacher's training seq_len, from its info file
    tasks = result["tasks"]
    assert list(tasks) == [*EVAL_TASKS, "synth_heldout", *ICL_TASKS]
    assert tasks["icl_facts_5shot"]["num_fewshot"] == 5 and tasks["synth_facts"]["num_fewshot"] == 0
    for name in (*EVAL_TASKS, *ICL_TASKS):
        s = tasks[name]
        assert s["metric"] == "acc" and s["percent"] and s["samples"] == 40
        assert 0.0 <= s["value"] <= 100.0 and 0.0 < s["stderr"] < 10.0
    held = tasks["synth_heldout"]
    assert held["metric"] == "bits_per_byte" and not held["percent"] and held["samples"] == 40
    assert held["higher_is_better"] is False and 0.1 < held["value"] < 10.0
    assert set(held["extra"]) == {"word_perplexity", "byte_perplexity"}
    assert result["average"] == pytest.approx(sum(tasks[t]["value"] for t in EVAL_TASKS) / 3)

    # MLflow holds accuracies as lm-eval reports them, fractions (the result shows percent); the run says so.
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert run.data.tags["eval.unit"] == "fraction"
    expected = {"eval.average": result["average"] / 100, "eval.synth_heldout.bits_per_byte": held["value"],
                "eval.synth_heldout.word_perplexity": held["extra"]["word_perplexity"],
                "eval.synth_heldout.byte_perplexity": held["extra"]["byte_perplexity"]}
    for name in EVAL_TASKS:
        expected[f"eval.{name}"] = tasks[name]["value"] / 100
        expected[f"eval.{name}.stderr"] = tasks[name]["stderr"] / 100
    for name in ICL_TASKS:  # eval.icl.<name>: beside the Average, not a percent task column of the paper table
        expected[f"eval.icl.{name[4:]}"] = tasks[name]["value"] / 100
        expected[f"eval.icl.{name[4:]}.stderr"] = tasks[name]["stderr"] / 100
    expected["eval.icl.fewshot_gain"] = (tasks["icl_facts_5shot"]["value"] - tasks["synth_facts"]["value"]) / 100
    assert metrics == pytest.approx(expected)

    local = Path(client.download_artifacts(run_id, f"{ev.RESULTS_ARTIFACT_DIR}/{ev.RESULTS_ARTIFACT_NAME}",
                                           str(tmp_path)))
    raw = json.loads(local.read_text())
    assert set(raw["results"]) == {*EVAL_TASKS, "synth_heldout", *ICL_TASKS}
    assert raw["results"]["synth_facts"]["acc,none"] == pytest.approx(metrics["eval.synth_facts"], rel=1e-12)
    assert raw["results"]["synth_facts"]["acc,none"] * 100 == pytest.approx(tasks["synth_facts"]["value"])
    assert raw["n-samples"]["synth_facts"] == {"original": 1200, "effective": 40}


def test_trained_teacher_beats_random_init(tiny_teacher: Path, random_model: Path):
    # Held-out perplexity separates the small session fixture teacher from random init by a wide
    # margin; the multiple-choice tasks need the longer-trained teacher of the test above (the
    # fixture's 64-token windows are shorter than a continuation item).
    kw = dict(tasks="synth_heldout", limit=100, max_length=64)  # same window for both
    teacher = ev.evaluate(tiny_teacher, **kw)["tasks"]["synth_heldout"]["value"]
    random = ev.evaluate(random_model, **kw)["tasks"]["synth_heldout"]["value"]
    assert teacher < random - 0.5, (teacher, random)  # bits per byte; measured about 2.9 vs 4.0


@pytest.mark.parametrize("kind", ["random", "natural"])
def test_copy_items_repeat_the_gold_span_and_draw_its_place_uniformly(kind: str):
    from pd_lightning.data.corpus import make_copy_items

    items = make_copy_items(kind, 400)
    assert items == make_copy_items(kind, 400) and items != make_copy_items(kind, 400, seed=1)
    assert task_data.local_data().load(f"icl_copy_{kind}")["test"].to_list()[:400] == items  # the shipped file
    for item in items:
        choices, gold = item["choices"], item["choices"][item["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4 and all(len(c.split()) == 4 for c in choices)
        cue = " " + " ".join(item["context"].split()[-2:])
        # the span cue + gold occurs before the repeated cue that ends the context
        assert (cue + gold) in (" " + item["context"]) and item["context"].endswith(cue.strip())
    # the gold choice's place is uniform, so a model that ignores the context is at chance
    counts = np.bincount([item["label"] for item in items], minlength=4)
    assert counts.min() > 70, counts  # 100 expected each; 3.5 standard deviations below


def eval_args(*argv: str) -> argparse.Namespace:
    """`pdl eval ARGV` as the real `pdl` parser reads it."""
    return cli.build_parser().parse_args(["eval", *argv])


def test_pdl_eval_prints_and_logs_heldout_metrics(tiny_teacher: Path, tiny_data: Path, mlflow_run: tuple[str, str],
                                                  capsys: pytest.CaptureFixture, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from pd_lightning.metrics import HELDOUT_METRICS

    uri, run_id = mlflow_run
    assert ev.heldout_defaults(tiny_teacher) == (tiny_data.resolve(), None)  # the teacher's info file names its data
    args = eval_args(str(tiny_teacher), "--tasks", "synth_facts,icl_facts_5shot", "--limit", "12",
                     "--teacher", str(tiny_teacher), "--heldout-sequences", "24", "--run-id", run_id,
                     "--tracking-uri", uri)
    result = cli.cmd_eval(args)
    out = capsys.readouterr().out
    held = result["heldout"]
    assert held["tokens"] == 24 * 63 and held["teacher_top1_agree"] == 1.0 and abs(held["teacher_kl"]) < 1e-5
    for name in HELDOUT_METRICS:
        assert f"eval.heldout.{name}" in out
    assert "equal-mass bins" in out and "eval.icl.fewshot_gain" in out
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics["eval.heldout.ece"] == pytest.approx(held["ece"])
    assert run.data.metrics["eval.icl.fewshot_gain"] == pytest.approx(  # printed in points, logged as a fraction
        (result["tasks"]["icl_facts_5shot"]["value"] - result["tasks"]["synth_facts"]["value"]) / 100)
    assert run.data.tags["eval.heldout.teacher"] == str(tiny_teacher)
    saved = json.loads(Path(client.download_artifacts(run_id, "eval/heldout.json", str(tmp_path))).read_text())
    assert saved["bins"] == held["bins"] and sum(b["n"] for b in saved["bins"]) == held["tokens"]
    # --heldout none skips them; a dir without held-out shards is a one-line error before any model loads
    none = eval_args(str(tiny_teacher), "--tasks", "synth_facts", "--limit", "4", "--heldout", "none")
    assert cli.cmd_eval(none)["heldout"] is None
    with pytest.raises(DataError, match="not a prepared data dir"):
        cli.cmd_eval(eval_args(str(tiny_teacher), "--heldout", str(tmp_path)))


def test_pdl_eval_links_scores_to_the_runs_logged_student(tiny_teacher: Path, mlflow_run: tuple[str, str],
                                                         tmp_path: Path):
    """`pdl eval DIR --run-id RUN`: the scores go to the run and, when DIR is the student dir the run's logged
    model came from, to that model too (what the Models tab shows); any other dir scores the run alone."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pd_lightning.student_model import MODEL_DIR_TAG, log_student

    uri, run_id = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    student = tmp_path / "out" / "model"
    shutil.copytree(tiny_teacher, student)
    model_id = log_student(client, run_id, student, step=7)
    assert client.get_run(run_id).data.tags[MODEL_DIR_TAG] == str(student.resolve())
    other = tmp_path / "checkpoint"
    shutil.copytree(tiny_teacher, other)
    cli.cmd_eval(eval_args(str(other), "--tasks", "synth_facts", "--limit", "8", "--heldout", "none",
                           "--run-id", run_id, "--tracking-uri", uri))
    assert not [m for m in client.get_logged_model(model_id).metrics or [] if m.key == "eval.synth_facts"]
    result = cli.cmd_eval(eval_args(str(student), "--tasks", "synth_facts", "--limit", "8", "--heldout", "none",
                                    "--run-id", run_id, "--tracking-uri", uri))
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert linked["eval.synth_facts"] == pytest.approx(result["tasks"]["synth_facts"]["value"] / 100)


def test_unavailable_dataset_fails_alone_with_one_line(tiny_teacher: Path, mlflow_run: tuple[str, str],
                                                        capsys: pytest.CaptureFixture, tmp_path: Path):
    uri, run_id = mlflow_run
    args = eval_args(str(tiny_teacher), "--tasks", "hellaswag,synth_arithmetic", "--limit", "10",
                     "--run-id", run_id, "--tracking-uri", uri, "--output", str(tmp_path / "r.json"))
    # Tests run with HF_DATASETS_OFFLINE=1 and an empty datasets cache: hellaswag cannot load.
    with pytest.raises(UserError) as err:
        cli.cmd_eval(args)
    message = str(err.value)
    assert "\n" not in message
    assert "'hellaswag'" in message and "'Rowan/hellaswag'" in message and "HF_DATASETS_CACHE" in message
    out = capsys.readouterr().out
    assert "synth_arithmetic" in out and "failed" in out
    written = json.loads((tmp_path / "r.json").read_text())  # --output is written before the exit
    assert list(written["tasks"]) == ["synth_arithmetic"] and list(written["failed"]) == ["hellaswag"]
    # The task that could run ran and was logged; the average covers it alone.
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    heldout = {f"eval.heldout.{m}" for m in ("loss", "top1_acc", "ece", "brier")}  # `pdl eval` computes them by default
    assert set(metrics) == {"eval.synth_arithmetic", "eval.synth_arithmetic.stderr", "eval.average"} | heldout
    assert metrics["eval.average"] == metrics["eval.synth_arithmetic"]
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["eval.failed"] == "hellaswag"


def test_evaluate_with_config_uses_the_eval_section_and_corpus_world(tiny_teacher: Path, pdl_log):
    from pd_lightning.config import load_config

    cfg = load_config("tiny", ["eval.tasks=synth_arithmetic", "eval.limit=8", "data.corpus_seed=1"])
    result = ev.evaluate_with_config(tiny_teacher, cfg)
    assert list(result["tasks"]) == ["synth_arithmetic"] and result["tasks"]["synth_arithmetic"]["samples"] == 8
    assert result["lm_eval"]["configs"]["synth_arithmetic"]["metadata"]["corpus_seed"] == 1
    # Status goes to the logger, one line per task (a caller silences it by the logger's level).
    assert "eval: synth_arithmetic: acc " in pdl_log.text and "n=8)" in pdl_log.text


def test_window_defaults_to_the_trained_seq_len(tiny_teacher: Path, random_model: Path, tmp_path: Path):
    assert ev.trained_seq_len(tiny_teacher) == 64
    assert ev.trained_seq_len(random_model) is None  # no info file: the harness uses the config's 1024
    (tmp_path / "pdl_run.json").write_text(json.dumps({"seq_len": 128}))
    assert ev.trained_seq_len(tmp_path) == 128
    (tmp_path / "pdl_run.json").write_text(json.dumps({"data": str(tmp_path / "moved-away")}))
    assert ev.trained_seq_len(tmp_path) is None
    lm, _ = ev.load_lm(random_model)
    assert lm.max_length == 1024


# ----------------------------------------------------------------------------------------------
# Exports as other tools read them: the trained context, the KV cache, file modes; plain lm-eval


def _umask() -> int:
    """This process's umask, read off a fresh dir (os.umask would change it for a moment)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.mkdir()
        return 0o777 & ~probe.stat().st_mode


def test_an_export_states_its_trained_context_for_lm_eval(tiny_teacher: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # tiny_teacher is `pdl teacher train`'s export (callbacks.save_hf_dir, as every student's): trained at 64
    config = AutoConfig.from_pretrained(tiny_teacher)
    assert config.max_position_embeddings == 64 and config.use_cache is True
    assert GenerationConfig.from_pretrained(tiny_teacher).use_cache is True
    assert AutoTokenizer.from_pretrained(tiny_teacher).model_max_length == 64
    lm, _ = ev.load_lm(tiny_teacher)  # no max_length given: lm-eval's HFLM reads the export's own window
    assert lm.max_length == 64
    # Rotary positions: stating 64 instead of the 1,024 it was built with changes no logit, also past 64.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    built = AutoModelForCausalLM.from_pretrained(tiny_teacher, max_position_embeddings=1024).eval()
    ids = torch.randint(0, config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, built(ids, use_cache=False).logits)
    # The umask's usual modes, not mkdtemp's owner-only dir nor safetensors' owner-only weights.
    mask = _umask()
    assert tiny_teacher.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.name: p.stat().st_mode & 0o777 for p in tiny_teacher.iterdir()} == {
        p.name: 0o666 & ~mask for p in tiny_teacher.iterdir()}


def test_export_file_modes_follow_the_umask(tiny_teacher: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pd_lightning.callbacks import save_hf_dir

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)
    previous = os.umask(0o027)  # a group-readable, world-closed site policy
    try:
        save_hf_dir(model, tok, tmp_path / "export", "pdl_run.json", {"seq_len": 48})
    finally:
        os.umask(previous)
    out = tmp_path / "export"
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 48
    assert model.config.max_position_embeddings == 64 and model.config.use_cache is True  # the live model untouched
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp dir left behind


@pytest.fixture(scope="module")
def tiny_student(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LM-only tiny-1m student of 40 steps on `tiny_data`, exported by `pdl train` (its model/ dir)."""
    from pd_lightning.config import load_config
    from pd_lightning.train import train

    from conftest import TINY_DATA

    root = tmp_path_factory.mktemp("student")
    cfg = load_config("tiny", [*TINY_DATA, f"data.out={tiny_data}", f"trainer.out={root / 'run'}",
                               f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=student",
                               "loss.alpha=0", "trainer.max_steps=40", "trainer.batch_size=16", "optim.lr=5e-3",
                               "trainer.val_every_n_steps=20", "trainer.val_batches=1",
                               "trainer.checkpoint_every_n_steps=40", "eval.heldout_teacher=none"])
    train(cfg)
    return root / "run" / "model"


def _venv_without_the_lab(root: Path) -> Path:
    """A fresh venv that sees this one's packages (lm-eval, torch, transformers) but has no pd_lightning.

    A .pth line adds this venv's site-packages to sys.path; .pth files are only run in site dirs, so
    the editable install's finder (a .pth there) is not, and pd_lightning is simply not installed.
    """
    import sysconfig

    venv = root / "venv-without-pdl"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "lab-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


# lm-eval's console script (`lm_eval`, lm_eval.__main__:cli_evaluate), run by the lab-free venv's python
LM_EVAL_ENTRY_POINT = ("import sys; from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; "
                       "sys.exit(cli_evaluate())")


def test_plain_lm_eval_without_the_lab_scores_what_pdl_eval_scores(tiny_student: Path, tmp_path: Path):
    """`lm_eval --include_path <our tasks>` in a venv without pd_lightning, on a `pdl train` export with nothing
    but `pretrained=DIR`: the same window (the trained 64) and the same numbers as `pdl eval` on every local task."""
    python = _venv_without_the_lab(tmp_path)
    blocked = subprocess.run([str(python), "-c", "import pd_lightning"], cwd=tmp_path, capture_output=True, text=True)
    assert blocked.returncode != 0 and "No module named 'pd_lightning'" in blocked.stderr
    tasks_dir = shutil.copytree(ev.TASKS_DIR, tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    tasks = [spec.task for spec in ev.load_suite("local")]
    limit = "40"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    plain = subprocess.run([str(python), "-c", LM_EVAL_ENTRY_POINT, "run", "--model", "hf",
                            "--model_args", f"pretrained={tiny_student}", "--tasks", ",".join(tasks),
                            "--include_path", str(tasks_dir), "--batch_size", "16", "--device", "cpu",
                            "--limit", limit, "--output_path", str(tmp_path / "out")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert plain.returncode == 0, plain.stderr[-3000:]
    theirs = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())

    ours = cli.cmd_eval(eval_args(str(tiny_student), "--limit", limit, "--heldout", "none", "--json"))
    assert ours["max_length"] == theirs["max_length"] == 64  # the trained context, read from the export alone
    assert list(ours["tasks"]) == tasks and ours["failed"] == {}
    for task, score in ours["tasks"].items():
        row = theirs["results"][task]
        assert row == ours["lm_eval"]["results"][task], task  # every metric and stderr, to the last bit
        scale = 100.0 if score["percent"] else 1.0  # pdl eval shows accuracies in percent
        assert score["value"] == pytest.approx(row[f"{score['metric']},none"] * scale, rel=1e-12), task
        assert theirs["n-samples"][task]["effective"] == score["samples"] == int(limit)
    assert theirs["configs"]["icl_facts_5shot"]["num_fewshot"] == 5


def test_paper_suite_offline_names_every_missing_dataset(tiny_teacher: Path):
    result = ev.evaluate(tiny_teacher, suite="paper", limit=2)
    assert result["tasks"] == {} and result["average"] is None
    datasets = {"hellaswag": "Rowan/hellaswag", "winogrande": "allenai/winogrande", "piqa": "baber/piqa",
                "mmlu": "cais/mmlu", "c3": "clue/clue", "ceval-valid": "ceval/ceval-exam", "gsm8k": "openai/gsm8k"}
    assert list(result["failed"]) == list(datasets)
    for task, message in result["failed"].items():
        assert "\n" not in message and f"dataset {datasets[task]!r}" in message and "HF_DATASETS_OFFLINE=0" in message


def test_bad_inputs_fail_before_any_model_is_loaded(tmp_path: Path, tiny_teacher: Path,
                                                    mlflow_store: tuple[str, str]):
    with pytest.raises(ConfigError, match=r"task 'synth_fact' is unknown.*did you mean 'synth_facts'"):
        ev.evaluate(tiny_teacher, tasks="synth_fact")
    with pytest.raises(DataError, match="holds no config.json"):
        ev.evaluate(tmp_path, tasks="synth_facts")
    with pytest.raises(DataError, match="is not a directory"):
        ev.evaluate(tmp_path / "missing", tasks="synth_facts")
    with pytest.raises(ConfigError, match="eval.limit=0"):
        ev.evaluate(tiny_teacher, tasks="synth_facts", limit=0)
    with pytest.raises(ConfigError, match=r"run_id='nope' is not a run in the MLflow store sqlite:///"):
        ev.evaluate(tiny_teacher, tasks="synth_facts", run_id="nope", tracking_uri=mlflow_store[0])
    with pytest.raises(ConfigError, match="eval.max_length=1 "):
        ev.evaluate(tiny_teacher, tasks="synth_facts", max_length=1)


# ----------------------------------------------------------------------------------------------
# The harness's own model against the model itself


def _direct_logprob(model, ids: list[int], n_cont: int) -> float:
    """Sum of log p(token) over the last n_cont tokens of ids, from one unbatched forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:])
    return float(logp[torch.arange(len(targets)), targets][-n_cont:].sum())


def test_harness_scores_match_the_model(tiny_teacher: Path):
    from lm_eval.api.instance import Instance

    # A window wider than every item and the text (the export states its trained 64), so nothing is cut.
    lm, _ = ev.load_lm(tiny_teacher, batch_size=3, max_length=1024)
    items = make_eval_items("synth_facts", 3) + make_eval_items("synth_continuation", 2)
    pairs = [(it["context"], choice) for it in items for choice in it["choices"]]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(scores) == len(pairs)
    for (context, choice), (ll, _) in zip(pairs, scores):
        whole = lm.tok_encode(context + choice)
        n_cont = len(whole) - len(lm.tok_encode(context))
        direct = _direct_logprob(lm.model, [*lm.tok_encode(context), *whole[len(lm.tok_encode(context)):]], n_cont)
        assert ll == pytest.approx(direct, abs=1e-3)

    text = heldout_texts(1)[0]
    ids = lm.tok_encode(text)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    assert rolling == pytest.approx(_direct_logprob(lm.model, [lm.prefix_token_id, *ids], len(ids)), abs=1e-3)
    # A window shorter than the text: the rolling windows still score every token exactly once.
    short, _ = ev.load_lm(tiny_teacher, max_length=16)
    windowed = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    assert math.isfinite(windowed) and windowed != pytest.approx(rolling, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# The paper suite's shots as the harness builds them (its datasets are not cached here: stand-ins)


def _paper_stand_in_rows(path: str, name: str | None, i: int) -> dict:
    """Row i of a stand-in for each paper dataset, with the real one's fields; "Q<i>" marks its question."""
    q = f"Q{i} "
    rows = {
        "Rowan/hellaswag": {"ctx_a": q + "a man", "ctx_b": "walks", "activity_label": "walking",
                            "endings": ["on.", "off.", "up.", "down."], "label": "0"},
        "allenai/winogrande": {"sentence": q + "The cat sat on the _ mat.", "option1": "red", "option2": "blue",
                               "answer": "1"},
        "baber/piqa": {"goal": q + "open a jar", "sol1": "twist the lid", "sol2": "drop it", "label": 0},
        "cais/mmlu": {"question": q + "2 + 2?", "subject": name, "choices": ["3", "4", "5", "6"], "answer": 1},
        "clue/clue": {"id": i, "context": [q + "男：你好。", "女：你好。"], "question": "他们在做什么？",
                      "choice": ["打招呼", "吃饭"], "answer": "打招呼"},
        "ceval/ceval-exam": {"id": i, "question": q + "1 + 1 = ?", "A": "1", "B": "2", "C": "3", "D": "4",
                             "answer": "B", "explanation": ""},
        "openai/gsm8k": {"question": q + "Tom has 2 apples and gets 1 more. How many?",
                         "answer": "2 + 1 = 3\n#### 3"},
    }
    return rows[path]


def _paper_stand_in_dataset(path: str, name: str | None = None, **_):
    """A DatasetDict per paper dataset; MMLU's and C-Eval's dev (few-shot) splits hold 5 rows, like the real ones."""
    import datasets

    sizes = {"train": 12, "validation": 12, "test": 12, "val": 12, "dev": 5}
    return datasets.DatasetDict({split: datasets.Dataset.from_list(
        [_paper_stand_in_rows(path, name, i) for i in range(n)]) for split, n in sizes.items()})


def _recording_lm():
    """A harness LM that answers every request with constants and keeps each request's context."""
    from lm_eval.api.model import LM

    class RecordingLM(LM):
        contexts: dict[str, list[str]] = {}

        def _keep(self, requests):
            for r in requests:
                self.contexts.setdefault(r.task_name, []).append(r.args[0])

        def loglikelihood(self, requests, disable_tqdm=False):
            self._keep(requests)
            return [(-1.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [-1.0] * len(requests)

        def generate_until(self, requests, disable_tqdm=False):
            self._keep(requests)
            return ["#### 3"] * len(requests)

    return RecordingLM()


@pytest.fixture()
def paper_stand_ins(monkeypatch: pytest.MonkeyPatch, tiny_teacher: Path):
    """evaluate() on the real harness and task configs, with stand-in datasets and a recording LM."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _paper_stand_in_dataset)
    lm = _recording_lm()
    monkeypatch.setattr(harness, "load_lm", lambda *a, **k: (lm, "stand-in"))
    return lm


def test_paper_suite_runs_each_task_at_its_shots(tiny_teacher: Path, paper_stand_ins):
    result = ev.evaluate(tiny_teacher, suite="paper", limit=1)
    assert result["failed"] == {} and set(result["tasks"]) == set(PAPER_SHOTS)
    assert {t: s["num_fewshot"] for t, s in result["tasks"].items()} == PAPER_SHOTS
    configs = result["lm_eval"]["configs"]  # every leaf task as the harness built it (mmlu: 57, ceval: 52)
    leaves = {t: {n for n in configs if n == t or n.startswith(f"{t}_")} for t in PAPER_SHOTS}
    assert (len(leaves["mmlu"]), len(leaves["ceval-valid"])) == (57, 52)
    for task, shots in PAPER_SHOTS.items():
        assert leaves[task] and {configs[n]["num_fewshot"] for n in leaves[task]} == {shots}, task
    # c3 is our own YAML: its 5 examples come from train; the prompt holds them plus the item itself.
    assert configs["c3"]["fewshot_split"] == "train"
    for task in ("c3", "gsm8k", "mmlu_anatomy", "ceval-valid_law", "hellaswag"):
        context = paper_stand_ins.contexts[task][0]
        assert len(re.findall(r"Q\d+ ", context)) == configs[task]["num_fewshot"] + 1, (task, context)
    # GSM8k decodes greedily: the harness's own task config, unchanged by the lab.
    gen = configs["gsm8k"]["generation_kwargs"]
    assert gen["do_sample"] is False and gen["temperature"] == 0.0


def test_mmlu_cannot_run_6_shot_from_its_5_question_dev_split(tiny_teacher: Path, paper_stand_ins):
    # Why the paper suite keeps MMLU at 5, not the secondary source's 6: lm-eval's mmlu takes its
    # examples in order from the dev split, which holds 5 per subject, and refuses a 6th.
    with pytest.raises(AssertionError, match="exceeds the 5 that are available"):
        ev.evaluate(tiny_teacher, tasks="mmlu", num_fewshot=6, limit=1)


def test_a_task_that_pins_zero_shots_is_reported_not_silently_run_0_shot(tiny_teacher: Path, paper_stand_ins,
                                                                         tmp_path: Path, monkeypatch, pdl_log):
    # The harness ignores a shot count for a task whose YAML says num_fewshot: 0 (it only logs an
    # info line); evaluate() warns and records the count the task actually ran at.
    from lm_eval.tasks import TaskManager

    cfg = yaml.safe_load((ev.TASKS_DIR / "c3.yaml").read_text(encoding="utf-8"))
    cfg |= {"task": "c3_pinned", "num_fewshot": 0}
    (tmp_path / "c3_pinned.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    tm = TaskManager(include_path=[str(ev.TASKS_DIR), str(tmp_path)], include_defaults=False)
    monkeypatch.setattr(harness, "task_manager_for", lambda names, seed: tm)
    result = ev.evaluate(tiny_teacher, tasks="c3_pinned", num_fewshot=3, limit=1)
    assert result["tasks"]["c3_pinned"]["num_fewshot"] == 0
    assert "task 'c3_pinned': asked for 3-shot, but the harness ran c3_pinned 0-shot" in pdl_log.text
