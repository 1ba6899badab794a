"""The README's first command, `pdl quickstart`, end to end at its smoke scale; then `pdl report` on its runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


def pdl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    caller = tmp_path_factory.mktemp("caller")
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    result = pdl("quickstart", "--out", str(out), "--scale", "smoke", "--workers", "2", cwd=caller)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not any(caller.iterdir())  # nothing lands in the caller's working directory
    return out, result


def test_quickstart_prints_the_table_report_and_ui_command(quickstart_dir):
    out, result = quickstart_dir
    text = result.stdout
    for label in ("LLM-LM", "Vanilla PD", "α = 0.9", "WSD-α+WSD-LR", "LLM-KLD"):
        assert f"| {label} |" in text
    assert "| Average |" in text or "| Average " in text
    for column in ("ECE", "Brier", "agree %", "KL(T‖S)", "copy rand", "copy nat", "5-shot gain"):
        assert f"| {column} " in text, column  # the new columns beside the paper's
    assert f"report:     {out / 'report' / 'index.html'}" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1" in text
    index = (out / "report" / "index.html").read_text()
    assert "LLM-LM" in index and "Vanilla PD" in index
    for name in ("table.md", "table.csv", "table.tex"):
        assert (out / "report" / name).is_file()
    # the reliability diagram, a panel per row: inlined (renders in MLflow's preview), its files beside it
    assert 'href="fig_reliability.svg"' in index and (out / "report" / "fig_reliability.png").is_file()
    srcs = [line.split('src="')[1].split('"')[0] for line in index.split("\n") if 'src="' in line]
    assert srcs and all(src.startswith("data:image/png;base64,") for src in srcs)
    for href in [part.split('"')[0] for part in index.split('href="')[1:]]:
        assert (out / "report" / href).is_file(), href
    # 5 configurations x 2 seeds, each a finished MLflow child run with scores, under one parent
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("pd.role") != "sweep"]
    parent = [r for r in runs if r.data.tags.get("pd.role") == "sweep"]
    assert len(children) == 10 and all(r.info.status == "FINISHED" and "eval.average" in r.data.metrics for r in children)
    # beyond accuracy: every run, the LM-only ones included, has calibration and agreement with the same teacher
    teachers = {r.data.tags.get("eval.heldout.teacher") for r in children}
    assert len(teachers) == 1 and "none" not in teachers
    for r in children:
        assert {"eval.heldout.ece", "eval.heldout.brier", "eval.heldout.teacher_kl", "eval.icl.copy_random",
                "eval.icl.fewshot_gain", "cost.heldout_seconds"} <= set(r.data.metrics)
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "report")}
    assert "report/index.html" in artifacts


def test_quickstart_rerun_reuses_everything(quickstart_dir):
    out, _ = quickstart_dir
    again = pdl("quickstart", "--out", str(out), "--scale", "smoke", cwd=out.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    # nothing is recomputed: no trial, no teacher, no store (no wall-clock bound: that would be a timed test,
    # and it failed on a loaded machine at 156 s while doing no work)
    assert "10 trials (10 already complete)" in again.stdout
    assert "teacher: pre-training" not in again.stdout and "logits: top-" not in again.stdout


def test_report_command_on_the_quickstart_runs(quickstart_dir, tmp_path):
    out, _ = quickstart_dir
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    result = pdl("report", str(sweep), "--scale", "smoke", "--out", str(tmp_path / "rep"), cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rep" / "index.html").is_file() and "| LLM-LM |" in result.stdout
    missing = pdl("report", str(sweep), "--scale", "tiny", "--out", str(tmp_path / "none"), cwd=out)
    assert missing.returncode == 2 and "no finished, evaluated runs" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "none").exists()


def test_overview_notebook_on_the_quickstart_store(quickstart_dir, monkeypatch):
    """The notebooks run on a store of real trained-and-evaluated runs, not only on logged numbers."""
    import nbformat
    from nbclient import NotebookClient

    out, _ = quickstart_dir
    monkeypatch.setenv("PDL_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "overview.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    shown = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", output
            data = output.get("data", {})
            shown += [output.get("text", ""), data.get("text/markdown", ""), data.get("text/plain", "")]
    text = "\n".join(shown)
    assert "quickstart" in text and "LLM-LM" in text and "Vanilla PD" in text
