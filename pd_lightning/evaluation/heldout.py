"""Held-out token metrics (`pd_lightning.metrics`) of an exported model: which data and teacher, then the pass.

By default the data is the prepared dir the export was trained on and the teacher the one its run
measured against, both read from the export's info files; either can be given or switched off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pd_lightning.data.shards import MANIFEST as DATA_MANIFEST
from pd_lightning.errors import ConfigError, DataError
from pd_lightning.evaluation.model_dir import export_infos, is_hf_dir


def heldout_defaults(model_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(data dir, teacher dir) an export's info file names for its held-out metrics, each None if unknown or gone.

    The data dir is the `data` of the first info file (`artifacts.MODEL_INFO_FILES`) when it still holds
    held-out shards; the teacher is the run's `heldout_teacher` (what `pdl train` measured against), else
    its store's `teacher`, when that is an HF dir here.
    """
    for info in export_infos(model_dir):
        data = info.get("data")
        data = Path(data) if data and (Path(data) / DATA_MANIFEST).is_file() else None
        teacher = next((Path(t) for t in (info.get("heldout_teacher"), info.get("teacher"))
                        if isinstance(t, str) and is_hf_dir(t)), None)
        return data, teacher
    return None, None


def resolve_heldout_args(model_dir: str | Path, heldout: str, teacher: str) -> tuple[Path | None, Path | None]:
    """`--heldout` / `--teacher` (auto, none or a path) -> (data dir or None, teacher dir or None)."""
    data_auto, teacher_auto = heldout_defaults(model_dir)
    data = {"auto": data_auto, "none": None}.get(heldout, Path(heldout))
    if data is None:
        return None, None
    return data, {"auto": teacher_auto, "none": None}.get(teacher, Path(teacher))


def check_heldout_sources(data: str | Path, teacher: str | Path | None, sequences: int, bins: int) -> None:
    """One-line errors for a held-out data dir without held-out shards, a teacher that is no HF dir, bad counts."""
    from pd_lightning.data.shards import read_manifest

    if not (Path(data) / DATA_MANIFEST).is_file():
        raise DataError(f"heldout data={str(data)!r} is not a prepared data dir (no {DATA_MANIFEST}); give the "
                        "data.out of `pdl data prepare`, or --heldout none")
    if int(read_manifest(data).get("splits", {}).get("heldout", {}).get("num_sequences", 0)) < 1:
        raise DataError(f"heldout data={str(data)!r} has no held-out sequences; prepare it with data.heldout_tokens > 0")
    if teacher is not None and not is_hf_dir(teacher):
        raise DataError(f"heldout teacher={str(teacher)!r} is not an HF model dir (no config.json); give the "
                        "teacher's dir, or --teacher none")
    for name, value in (("eval.heldout_sequences", sequences), ("eval.ece_bins", bins)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")


def heldout_for_dir(model_dir: str | Path, data: str | Path, teacher: str | Path | None = None, *,
                    device: str = "cpu", max_sequences: int = 256, bins: int = 15) -> dict[str, Any]:
    """The held-out metrics (HeldoutMetrics as a dict) of an exported model on a data dir's held-out shards."""
    import torch
    from transformers import AutoModelForCausalLM

    from pd_lightning.module import heldout_metrics

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()

    model = load(model_dir)
    teacher_model = load(teacher) if teacher is not None else None
    if teacher_model is not None and teacher_model.config.vocab_size != model.config.vocab_size:
        raise DataError(f"heldout teacher={str(teacher)!r} has vocab_size={teacher_model.config.vocab_size}, the model "
                        f"{model.config.vocab_size}; KL and agreement need one vocabulary (or --teacher none)")
    return heldout_metrics(model, data, teacher=teacher_model, max_sequences=max_sequences, bins=bins).as_dict()
