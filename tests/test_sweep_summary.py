"""The sweep's MLflow parent run carries its summary: best configuration by mean objective, its Δ and 95% interval
(the paper table's), trials by state, the sweep file and the code version as its source.

The runs here are logged straight to a real sqlite MLflow store and the trials told to a real Optuna study (no
training: the numbers are chosen, so what the summary must say is known); the sweep that trains is in
test_mlflow_ui.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import analysis
from pd_lightning._source import COMMIT_TAG, UNKNOWN, commit_of, source_commit
from pd_lightning.sweep import load_sweep, resolve_place
from pd_lightning.sweep.records import child_tags, parent_run
from pd_lightning.sweep.study import claim, create_study
from pd_lightning.sweep.summary import write_summary

ROOT = Path(__file__).resolve().parents[1]
# Eval scores (fractions, as MLflow holds them) per label and seed: "α = 0.5" is best, by a margin the seeds agree on.
SCORES = {"LLM-LM": [0.30, 0.32, 0.31], "α = 0.5": [0.36, 0.37, 0.38], "α = 1.0": [0.33, 0.35, 0.34]}


def write_spec(folder: Path, name: str, *, baseline: bool = True, **body):
    spec = {"name": name, "description": f"A test sweep: {name}.", "table": "Table T", "base": "tiny",
            "rows": [{"label": "α = 0.5", "set": {"loss.alpha": 0.5}}, {"label": "α = 1.0", "set": {"loss.alpha": 1.0}}],
            "seeds": [0, 1, 2]}
    if baseline:
        spec["baseline"] = {"label": "LLM-LM", "set": {"loss.alpha": 0.0}}
    spec.update(body)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return load_sweep(path, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


def finish_trials(spec, place, study, parent_id: str, client: MlflowClient, *, leave: int = 0) -> dict[str, float]:
    """Claim every task (`leave` of them stay running) and log each one's run as a finished, evaluated child run."""
    experiment = client.get_experiment_by_name(spec.experiment).experiment_id
    logged = {}
    for i in range(len(spec.tasks())):
        trial, [task] = claim(study, spec, place.storage)
        if i >= len(spec.tasks()) - leave:
            continue  # claimed, never told: RUNNING
        value = SCORES[task.label][task.seed]
        run = client.create_run(experiment, run_name=f"{task.label} seed {task.seed}",
                                tags=child_tags(spec, task, parent_id, trial.number) | {
                                    "pd.seed": str(task.seed), "eval.unit": "fraction"})
        for key in ("eval.synth_facts", "eval.average"):
            client.log_metric(run.info.run_id, key, value, step=20)
        client.log_metric(run.info.run_id, "heldout_loss", 10 * value, step=20)  # nats/token: not a percent metric
        client.set_terminated(run.info.run_id, "FINISHED")
        study.tell(trial, value)
        logged[run.info.run_id] = value
    return logged


@pytest.fixture
def store(tmp_path):
    return tmp_path, MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def new_sweep(folder, name: str, **body):
    """A sweep file, its place, its study and its parent run, as `pdl sweep run` makes them."""
    spec = write_spec(folder, name, **body)
    place = resolve_place(spec, out=str(folder / "out"), cache=str(folder / "cache"), storage=None)
    study = create_study(spec, place)
    return spec, place, study, parent_run(spec, study, place.storage)


def test_summary_names_the_best_configuration_its_delta_and_the_trials(store):
    folder, client = store
    spec, place, study, parent = new_sweep(folder, "summary")
    created = client.get_run(parent).data.tags
    assert created["mlflow.source.name"] == str(spec.path.resolve()) and created["mlflow.source.type"] == "LOCAL"
    assert created[COMMIT_TAG] == source_commit()
    finish_trials(spec, place, study, parent, client, leave=1)
    assert write_summary(spec, study, parent)

    run = client.get_run(parent)
    m, tags = run.data.metrics, run.data.tags
    assert tags["summary.best_label"] == "α = 0.5" and tags["summary.baseline"] == "LLM-LM"
    assert m["summary.best_mean"] == pytest.approx(0.37) and m["summary.best_seeds"] == 3
    # Δ and its interval are the paper table's (analysis), on the same finished runs
    table = analysis.paper_table(analysis.load_runs(f"sqlite:///{folder / 'mlflow.db'}", sweep="summary"))
    row = table[table["label"] == "α = 0.5"].iloc[0]
    assert m["summary.best_delta_pct"] == pytest.approx(row["Δ%"])
    assert m["summary.best_delta_ci95"] == pytest.approx(row["Δ% ci95"])
    assert m["summary.best_delta_pct"] == pytest.approx(100 * (0.37 / 0.31 - 1))
    assert tags["summary.best_delta_ci_excludes_0"] == "true" and tags["summary.status"] == "ok"
    # 9 tasks: 8 complete, 1 claimed and still running; 3 configurations x 3 seeds
    assert (m["summary.trials_complete"], m["summary.trials_running"], m["summary.trials_failed"],
            m["summary.trials_waiting"], m["summary.trials_pending"]) == (8, 1, 0, 0, 0)
    assert (m["summary.configurations"], m["summary.seeds"], m["summary.runs_finished"]) == (3, 3, 8)
    note = tags["mlflow.note.content"]
    assert "**Best configuration: α = 0.5**" in note and f"Δ = {row['Δ%']:+.2f}%" in note
    assert "8 complete, 0 failed, 1 running, 0 waiting" in note and note.endswith("A test sweep: summary.")
    assert str(spec.path.resolve()) in note and source_commit() in note
    assert run.data.params["objective.metric"] == "eval.average" and run.data.params["seeds"] == "0,1,2"
    assert tags["pd.version"] and tags[COMMIT_TAG] == source_commit()
    # written again (a resumed sweep): params are kept, metrics and tags updated, the history grows
    assert write_summary(spec, study, parent)
    history = client.get_metric_history(parent, "summary.trials_complete")
    assert [h.step for h in history] == [8, 8]


def test_minimized_objective_picks_the_lowest_mean(store):
    folder, client = store
    spec, place, study, parent = new_sweep(folder, "lowest", objective={"metric": "heldout_loss"})  # minimize
    finish_trials(spec, place, study, parent, client)
    assert write_summary(spec, study, parent)
    run = client.get_run(parent)
    tags = run.data.tags
    assert tags["summary.best_label"] == "LLM-LM"  # the baseline itself: no Δ, and the summary says why
    assert run.data.metrics["summary.best_mean"] == pytest.approx(3.1)  # in the metric's own unit
    assert tags["summary.objective"] == "heldout_loss (minimize)" and "summary.best_delta_pct" not in run.data.metrics
    assert tags["summary.status"] == "no Δ: the best configuration is the LM-only baseline itself"


def test_a_sweep_without_finished_runs_or_without_a_baseline_still_gets_a_summary(store):
    folder, client = store
    empty, place, study, parent = new_sweep(folder, "empty")
    assert write_summary(empty, study, parent)
    run = client.get_run(parent)
    assert run.data.metrics["summary.trials_pending"] == 9 and run.data.metrics["summary.runs_finished"] == 0
    assert run.data.tags["summary.status"] == "no finished run yet" and "summary.best_label" not in run.data.tags
    assert "**No best configuration yet**: no finished run yet." in run.data.tags["mlflow.note.content"]

    alone = write_spec(folder, "alone", baseline=False)
    place = resolve_place(alone, out=str(folder / "out2"), cache=str(folder / "cache"), storage=None)
    study = create_study(alone, place)
    parent = parent_run(alone, study, place.storage)
    finish_trials(alone, place, study, parent, client)
    assert write_summary(alone, study, parent)
    run = client.get_run(parent)
    assert run.data.tags["summary.best_label"] == "α = 0.5" and "summary.best_delta_pct" not in run.data.metrics
    assert "no LM-only baseline" in run.data.tags["summary.status"]
    assert run.data.metrics["summary.best_average"] == pytest.approx(37.0)  # the paper table's unit: percent


def test_a_summary_that_cannot_be_written_is_a_warning_not_an_error(store, caplog):
    folder, client = store
    spec = write_spec(folder, "gone")
    place = resolve_place(spec, out=str(folder / "out"), cache=str(folder / "cache"), storage=None)
    study = create_study(spec, place)
    parent_run(spec, study, place.storage)
    missing = "0" * 32  # a parent run the store does not have (deleted by hand, another store)
    logger = logging.getLogger("pd_lightning")
    logger.addHandler(caplog.handler)  # `pdl`'s logging setup stops pd_lightning's records reaching the root
    try:
        with caplog.at_level(logging.WARNING, logger="pd_lightning"):
            assert write_summary(spec, study, missing) is False
    finally:
        logger.removeHandler(caplog.handler)
    assert f"could not write the summary onto the MLflow parent run {missing}" in caplog.text


def test_the_source_commit_is_git_archives_stamp_else_gits_head_else_unknown(tmp_path):
    """export-subst stamps the commit into `_source.py` in a `git archive`; a checkout asks git; elsewhere: unknown."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert source_commit() == head.stdout.strip()
    assert commit_of("$Format:%H$", tmp_path) == UNKNOWN  # not a git work tree
    assert commit_of("0123456789abcdef0123456789abcdef01234567", tmp_path) == "0123456789abcdef0123456789abcdef01234567"
    # a real archive: a repository holding the package's _source.py and the .gitattributes line
    repo = tmp_path / "repo"
    (repo / "pd_lightning").mkdir(parents=True)
    (repo / "pd_lightning" / "_source.py").write_text((ROOT / "pd_lightning" / "_source.py").read_text())
    (repo / ".gitattributes").write_text((ROOT / ".gitattributes").read_text())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([*git, "archive", "-o", str(tmp_path / "x.tar"), "HEAD"], check=True)
    with tarfile.open(tmp_path / "x.tar") as tar:
        tar.extractall(tmp_path / "export", filter="data")
    exported = tmp_path / "export" / "pd_lightning" / "_source.py"
    stamped = subprocess.run([sys.executable, "-c", f"exec(open({str(exported)!r}).read()); print(COMMIT)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert stamped == commit and commit_of(stamped, exported.parent) == commit
