"""MLflow as a user opens it after a sweep: the parent run's summary, students as logged (and registered) models
that `mlflow.pyfunc.load_model` gives back, and the MLflow UI itself driven in headless Chromium.

One real sweep (2 configurations x 1 seed, seconds-long students, `--register`) plus `pdl report` into a fresh
sqlite store, shared by every test here; then `mlflow server` on that store and Chromium (Debian package
`chromium`) against its pages. Without Chromium the UI tests skip, saying so; with PDL_REQUIRE_SERVERS=1 (CI)
they fail instead. Screenshots go to $PDL_UI_SHOTS when set (what the issue's note describes), else to a temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pd_lightning._source import COMMIT_TAG, source_commit
from pd_lightning.student_model import MODEL_ID_TAG, register_student
from pd_lightning.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, training_view_url
from servers import MlflowServer, skip_or_fail

NAME, REGISTERED = "ui", "ui-students"
# seconds-long students: the UI needs records, not good models
SET = {"data.train_tokens": 100000, "data.heldout_tokens": 10000, "data.vocab_size": 512, "data.seq_len": 64,
       "data.tokenizer_train_chars": 300000, "teacher.preset": "tiny-1m", "teacher.max_steps": 30,
       "teacher.batch_size": 8, "trainer.max_steps": 6, "trainer.batch_size": 8, "trainer.val_every_n_steps": 3,
       "trainer.val_batches": 1, "trainer.num_workers": 0, "trainer.checkpoint_every_n_steps": 3,
       "logits.batch_size": 32, "eval.limit": 10, "eval.tasks": "synth_facts", "eval.heldout_sequences": 16}


def pdl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """A finished sweep: an untrainable LM-only baseline (lr 1e-7) and a distilled row, so the row wins on the
    held-out loss (the objective) whatever the scores; every student registered; the report on the parent."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    body = {"name": NAME, "description": "Two students for the MLflow UI test.", "table": "UI test", "base": "tiny",
            "set": SET, "baseline": {"label": "LLM-LM", "set": {"loss.alpha": 0.0, "optim.lr": 1e-7}},
            "rows": [{"label": "Vanilla PD", "set": {"loss.alpha": 0.5}}], "seeds": [0],
            "objective": {"metric": "heldout_loss"}}
    path = root / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    run = pdl("sweep", "run", str(path), "--workers", "2", "--tracking-uri", uri, "--register", REGISTERED, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = pdl("report", str(path), "--tracking-uri", uri, "--out", str(root / "report"), cwd=root)
    assert report.returncode == 0, report.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("pd.role") == "sweep")
    children = {r.data.tags["pd.label"]: r for r in runs if r.data.tags.get("pd.role") != "sweep"}
    return {"root": root, "uri": uri, "path": path, "client": client, "experiment": experiment, "parent": parent,
            "children": children, "stdout": run.stdout}


# ------------------------------------------------------------------------------------------ the records


def test_the_parent_run_carries_the_summary_and_its_source(sweep):
    client = sweep["client"]
    parent = client.get_run(sweep["parent"].info.run_id)
    m, tags = parent.data.metrics, parent.data.tags
    losses = {label: r.data.metrics["heldout_loss"] for label, r in sweep["children"].items()}
    assert losses["Vanilla PD"] < losses["LLM-LM"], losses
    assert tags["summary.best_label"] == "Vanilla PD" and tags["summary.objective"] == "heldout_loss (minimize)"
    assert m["summary.best_mean"] == pytest.approx(losses["Vanilla PD"])
    assert "summary.best_delta_pct" in m  # one seed: a Δ, no interval
    assert "summary.best_delta_ci95" not in m and tags["summary.baseline"] == "LLM-LM"
    assert (m["summary.trials_complete"], m["summary.trials_failed"], m["summary.trials_running"],
            m["summary.trials_waiting"], m["summary.configurations"], m["summary.seeds"]) == (2, 0, 0, 0, 2, 1)
    assert tags["mlflow.source.name"] == str(sweep["path"].resolve()) and tags["mlflow.source.type"] == "LOCAL"
    assert "**Best configuration: Vanilla PD**" in tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.yaml", "report"}
    # the code version: on the parent and on every child, the checkout's git commit (stamped or asked of git)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert source_commit() == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert tags[COMMIT_TAG] == source_commit() and tags["pd.version"]
    assert all(r.data.tags[COMMIT_TAG] == source_commit() for r in sweep["children"].values())
    assert "its summary in MLflow's training view: http://127.0.0.1:5000/#/experiments/" in sweep["stdout"]


def test_students_are_logged_models_that_pyfunc_loads_and_scores(sweep, monkeypatch):
    import mlflow.pyfunc

    client = sweep["client"]
    run = sweep["children"]["Vanilla PD"]
    model = client.get_logged_model(run.data.tags[MODEL_ID_TAG])
    assert model.status == "READY" and model.source_run_id == run.info.run_id
    assert model.name == "Vanilla PD seed 0" and model.tags["pd.alpha"] == "0.5"
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [model.model_id]
    assert "eval.average" in {m.key for m in model.metrics}  # the Models tab shows its scores beside it
    # the weights are stored once: in the logged model, no longer also as the run's `model/` artifacts
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    loaded = mlflow.pyfunc.load_model(model.artifact_location)  # its own files: no tracking URI needed
    scored = loaded.predict(["the cat sat on the mat", "one two three four"], params={"max_new_tokens": 3})
    assert list(scored["prompt"]) == ["the cat sat on the mat", "one two three four"]
    assert (scored["tokens"] > 1).all() and scored["nll"].between(0.1, 20).all()
    assert scored["continuation"].map(lambda t: isinstance(t, str)).all()
    before = mlflow.get_tracking_uri()  # models:/ URIs resolve through the global store (another test may have set it)
    mlflow.set_tracking_uri(sweep["uri"])
    try:
        again = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(["the cat sat on the mat"])
    finally:
        mlflow.set_tracking_uri(before)
    assert again["nll"].iloc[0] == pytest.approx(scored["nll"].iloc[0])


def test_register_makes_each_student_a_version_once(sweep, capsys):
    client = sweep["client"]
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    # each names its logged model (a sqlite registry keeps the source `models:/<id>`, not the id itself)
    assert sorted(v.source for v in versions) == sorted(f"models:/{r.data.tags[MODEL_ID_TAG]}"
                                                        for r in sweep["children"].values())
    assert sorted(int(v.version) for v in versions) == [1, 2]
    from pd_lightning.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "registered model NAME" in shown and "several GB per student" in shown  # the help says what is stored
    # `pdl train --register` on a finished run registers it without training; a second time adds nothing
    run = sweep["children"]["LLM-LM"]
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(sweep["root"])))
    result = pdl("train", str(config), "--register", "one-student", cwd=sweep["root"])
    assert result.returncode == 0 and "nothing to do" in result.stderr, result.stderr[-2000:]
    assert register_student(client, run.info.run_id, "one-student") == "1"  # again: the version it has
    [version] = client.search_model_versions("name = 'one-student'")
    assert version.source == f"models:/{run.data.tags[MODEL_ID_TAG]}" and version.run_id == run.info.run_id
    tagged = json.loads(client.get_logged_model(run.data.tags[MODEL_ID_TAG]).tags["mlflow.modelVersions"])
    assert sorted(t["name"] for t in tagged) == ["one-student", REGISTERED]  # the model lists its versions
    bad = pdl("train", str(config), "--register", "a/b", cwd=sweep["root"])
    assert bad.returncode == 2 and "--register='a/b' is not a registered model name" in bad.stderr
    assert "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------ the UI


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary; looked for before the sweep is run, so a machine without it skips at once."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    skip_or_fail("Chromium not found; install it (Debian: apt-get install chromium) to drive the MLflow UI")
    return ""


@pytest.fixture(scope="module")
def ui(chromium, sweep):
    """`mlflow server` on the sweep's store (127.0.0.1, a free port) and a headless Chromium to open its pages."""
    browser = chromium
    server = MlflowServer(sweep["uri"], sweep["root"] / "server")
    (sweep["root"] / "server").mkdir(exist_ok=True)
    server.start(timeout=120)
    shots = Path(os.environ.get("PDL_UI_SHOTS") or tempfile.mkdtemp(prefix="pdl-ui-shots-"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        yield Browser(browser, server.url, shots)
    finally:
        server.stop()


class Browser:
    """Headless Chromium, a fresh profile per page (as a first-time user sees it): the DOM after the page settled,
    or a screenshot. Chromium's virtual time waits for the page's fetches, so a slow machine gives the same DOM."""

    def __init__(self, binary: str, url: str, shots: Path):
        self.binary, self.url, self.shots = binary, url, shots

    def _run(self, page: str, *args: str) -> str:
        with tempfile.TemporaryDirectory(prefix="pdl-chromium-") as profile:
            cmd = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1600,1100", *args, page]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    def text(self, page: str) -> str:
        """The page's visible text (its DOM without scripts, styles and tags)."""
        dom = self._run(page, "--dump-dom")
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)).replace("&amp;", "&")

    def screenshot(self, page: str, name: str) -> Path:
        path = self.shots / name
        self._run(page, f"--screenshot={path}")
        assert path.is_file() and path.stat().st_size > 10_000
        return path


def rest(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_experiment_opens_in_the_training_view(ui, sweep):
    exp = sweep["experiment"]
    got = rest(ui.url, f"/ajax-api/2.0/mlflow/experiments/get?experiment_id={exp.experiment_id}")["experiment"]
    assert {t["key"]: t["value"] for t in got["tags"]}[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # the page the lab links to (`pdl sweep run`, `pdl quickstart`): the runs table in the training view
    page = training_view_url(ui.url, exp.experiment_id)
    text = ui.text(page)
    assert "Model registry" in text and f"{NAME} [default]" in text  # the training nav, the sweep's parent row
    assert "Token Usage" not in text and "Traces 0" not in text  # not the GenAI overview
    ui.screenshot(page, "experiment_training_view.png")
    # MLflow 3.17's plain experiment link in a fresh browser: its own GenAI/training switch decides (see README)
    ui.screenshot(f"{ui.url}/#/experiments/{exp.experiment_id}", "experiment_plain_link.png")


def test_the_parent_run_page_shows_the_summary(ui, sweep):
    parent = sweep["parent"]
    page = training_view_url(ui.url, sweep["experiment"].experiment_id, parent.info.run_id)
    text = ui.text(page)
    assert "Best configuration: Vanilla PD" in text and "summary.best_label" in text
    assert "summary.trials_complete" in text and "summary.best_mean" in text
    assert f"{NAME}.yaml" in text  # its source: the sweep file ...
    if source_commit() != "unknown":
        assert source_commit()[:7] in text  # ... at the code's commit
    ui.screenshot(page, "parent_run_summary.png")


def test_the_report_renders_in_mlflow_without_a_broken_image(ui, sweep):
    run_id = sweep["parent"].info.run_id
    with urllib.request.urlopen(f"{ui.url}/get-artifact?path=report/index.html&run_uuid={run_id}", timeout=30) as r:
        html = r.read().decode()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    assert "Vanilla PD" in html
    exp_id = sweep["experiment"].experiment_id
    page = f"{ui.url}/#/experiments/{exp_id}/runs/{run_id}/artifacts/report/index.html?workflowType=machine_learning"
    dom = ui._run(page, "--dump-dom")
    assert 'class="mlflow-html-iframe"' in dom  # MLflow's HTML preview holds the report (an iframe of its bytes)
    ui.screenshot(page, "report_in_artifacts.png")


def test_the_models_tab_lists_the_students(ui, sweep):
    exp_id = sweep["experiment"].experiment_id
    found = rest(ui.url, "/ajax-api/2.0/mlflow/logged-models/search", {"experiment_ids": [exp_id]})["models"]
    by_run = {m["info"]["source_run_id"]: m["info"] for m in found}
    for label, run in sweep["children"].items():
        assert by_run[run.info.run_id]["model_id"] == run.data.tags[MODEL_ID_TAG]
        assert by_run[run.info.run_id]["status"] == "LOGGED_MODEL_READY", by_run[run.info.run_id]
    page = f"{ui.url}/#/experiments/{exp_id}/models?workflowType=machine_learning"
    text = ui.text(page)
    assert "Vanilla PD seed 0" in text and "LLM-LM seed 0" in text and "Ready" in text
    assert f"{REGISTERED} v1" in text or f"{REGISTERED} v2" in text  # the registered versions beside them
    ui.screenshot(page, "models_tab.png")
    # and the student's run links to it: its page lists the logged model and the registered version
    run = sweep["children"]["Vanilla PD"]
    page = training_view_url(ui.url, exp_id, run.info.run_id)
    text = ui.text(page)
    assert re.search(r"Logged models \(1\) .{0,200}Vanilla PD seed 0 Ready", text), text[:3000]
    assert re.search(rf"Registered models {REGISTERED} v[12]\b", text), text[:3000]
    ui.screenshot(page, "student_run.png")
