"""An exported model dir as evaluation sees it: checked before the harness loads it, and what its info files say.

Our exports carry `artifacts.MODEL_INFO_FILES` beside the weights (train.py): the sequence length the
model was trained at and the prepared data dir it was trained on (whose held-out shards `heldout.py` scores).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pd_lightning.artifacts import MODEL_INFO_FILES
from pd_lightning.data.shards import MANIFEST as DATA_MANIFEST
from pd_lightning.errors import DataError


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding a transformers config.json."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def check_model_dir(model_dir: Path) -> None:
    """An exported HF model dir must exist and hold the config.json of a causal LM (weights are checked on load)."""
    if not model_dir.is_dir():
        raise DataError(f"model_dir={str(model_dir)!r} is not a directory; expected an exported HF model dir")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"model_dir={str(model_dir)!r} holds no config.json; expected an exported HF model dir "
                        "(save_pretrained of the model and its tokenizer)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:  # cheap (no weights): an unreadable config or a non-causal architecture fails here, in one line
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise DataError(f"model_dir={str(model_dir)!r} has an unreadable config.json: {str(exc).splitlines()[0][:200]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DataError(f"model_dir={str(model_dir)!r} holds a {config.model_type!r} model, which is not a causal LM; "
                        "lm-eval scores causal LMs (AutoModelForCausalLM)")


def export_infos(model_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The readable info files (`MODEL_INFO_FILES`, in order) of an export, parsed; unreadable ones are skipped."""
    for name in MODEL_INFO_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            yield info


def trained_seq_len(model_dir: str | Path) -> int | None:
    """The sequence length a pd-lightning export was trained at, if its info file tells (else None).

    An info file may carry `seq_len` itself or name its prepared `data` dir, whose manifest has it;
    the first info file that tells wins.
    """
    for info in export_infos(model_dir):
        try:
            if info.get("seq_len"):
                return int(info["seq_len"])
            if info.get("data"):
                manifest = json.loads((Path(info["data"]) / DATA_MANIFEST).read_text(encoding="utf-8"))
                return int(manifest["seq_len"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue  # a moved data dir or an older info file: fall back to the model's own limit
    return None
