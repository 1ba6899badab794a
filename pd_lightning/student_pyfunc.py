"""The MLflow model of a trained student: a pyfunc that loads its transformers directory and scores prompts.

MLflow runs this file, not the lab: it is logged as the model's code ("models from code",
`mlflow.pyfunc.log_model(python_model=<this file>)`), copied into every logged student, and needs
only mlflow, torch, transformers and pandas where it is loaded, so `mlflow.pyfunc.load_model(...)`
works without pd_lightning installed. Importing it (as MLflow does) registers the model with
`mlflow.models.set_model`; nothing in the lab imports it.

`predict(prompts, params={"max_new_tokens": N})` takes strings (a list, or a one-column DataFrame)
and returns one row per prompt: `nll`, the mean negative log-likelihood of the prompt's tokens after
the first in nats/token (NaN for a one-token prompt), `tokens`, and `continuation`, N greedily
generated tokens (default 8; 0 generates nothing). Prompts are cut to the window the student was
trained at (its tokenizer's `model_max_length`).
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

HF_DIR = "hf_dir"  # the student's transformers dir among the model's artifacts (as student_model logs it)
DEFAULT_NEW_TOKENS = 8  # when called without MLflow's signature (which carries its own default, the same)


class StudentLM(PythonModel):
    """A causal LM from a transformers directory: scores prompts and continues them greedily."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts[HF_DIR]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        prompts = model_input.iloc[:, 0] if isinstance(model_input, pd.DataFrame) else model_input
        new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_NEW_TOKENS))
        window = self.tokenizer.model_max_length
        rows = []
        for prompt in [str(p) for p in prompts]:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            if window and window < 10**9 and ids.shape[1] > window:  # the trained window (a sane model_max_length)
                ids = ids[:, -window:]
            with torch.no_grad():
                nll = float(self.model(ids, labels=ids).loss) if ids.shape[1] > 1 else math.nan
                text = ""
                if new_tokens > 0:
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
                    text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            rows.append({"prompt": prompt, "nll": nll, "tokens": int(ids.shape[1]), "continuation": text})
        return pd.DataFrame(rows, columns=["prompt", "nll", "tokens", "continuation"])


mlflow.models.set_model(StudentLM())
