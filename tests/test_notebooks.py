"""notebooks/: committed without outputs, as analysis.notebooks writes them, and each one executes
(nbclient, a fresh python3 kernel) against a real MLflow store holding every paper sweep — and
against a missing store, where every cell must explain instead of failing."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis.notebooks import NOTEBOOKS, render

from test_analysis import paper_store  # noqa: F401  (session fixture: the paper's tables as sweeps)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# What each notebook must show on the paper store: (Markdown tables, PNG figures, text that must appear).
EXPECTED = {
    "overview": (13, 1, ["table1_lm_vs_kd", "WSD-α+WSD-LR", "seeds_demo"]),
    "truncation": (1, 2, ["top-0.95-50"]),
    "temperature": (2, 2, ["τ = 0.5", "AdaKD-H"]),
    "loss_and_schedules": (2, 2, ["α = 0.9", "↑ 8.0%"]),
    "scaling": (2, 3, ["model.preset=6.8B", "PD*", "3.8B KD"]),
    "online": (1, 1, ["↓ 3.9%", "LLM-Online-100B-L"]),
}


def _execute(name: str, uri: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("PDL_TRACKING_URI", uri)  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[list[str], int, str]:
    """Markdown outputs, the number of PNG images, and all text shown."""
    markdown, images, text = [], 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            data = out.get("data", {})
            if "text/markdown" in data:
                markdown.append(data["text/markdown"])
            images += "image/png" in data
            text += [out.get("text", ""), data.get("text/markdown", ""), data.get("text/html", ""),
                     data.get("text/plain", "")]
    return markdown, images, "\n".join(text)


def test_every_family_has_a_notebook_committed_without_outputs():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS) == sorted(EXPECTED)
    for name in NOTEBOOKS:
        text = (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8")
        assert text == render(name), f"notebooks/{name}.ipynb differs from analysis.notebooks: python -m analysis.notebooks"
        nb = json.loads(text)
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
        first = "".join(code[0]["source"])
        assert 'TRACKING_URI = os.environ.get("PDL_TRACKING_URI", "sqlite:///mlflow.db")' in first
        assert "SWEEP = " in first


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_regenerates_its_tables_and_figures(name, paper_store, tmp_path, monkeypatch):  # noqa: F811
    nb = _execute(name, paper_store, tmp_path, monkeypatch)
    markdown, images, text = _outputs(nb)
    tables = [m for m in markdown if m.startswith("|")]
    n_tables, n_images, needles = EXPECTED[name]
    assert len(tables) >= n_tables and images == n_images, (len(tables), images)
    for needle in needles:
        assert needle in text, needle
    assert "no runs of sweep" not in text
    assert list(tmp_path.iterdir()) == []  # notebooks only read the store


def test_notebook_on_a_missing_store_explains_instead_of_failing(tmp_path, monkeypatch):
    nb = _execute("scaling", f"sqlite:///{tmp_path / 'none.db'}", tmp_path, monkeypatch)
    markdown, images, text = _outputs(nb)
    assert markdown == [] and images == 0
    assert text.count("no MLflow store") == 3  # one line per sweep the notebook reads
    assert not (tmp_path / "none.db").exists()
