"""Lightning modules: the science lives here (model, loss, optimiser); the Trainer holds the engineering.

`CausalLMModule` pre-trains a causal LM on packed token shards with the plain LM loss — the
teacher's pre-training and the paper's LLM-LM baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pd_lightning.data.shards import TokenShards


class SequenceDataset(Dataset):
    """Sequence i of a token-shard split as a LongTensor [seq_len]."""

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        self._shards: TokenShards | None = None  # opened lazily so DataLoader workers memmap their own
        self._len = len(TokenShards(root, split))

    @property
    def shards(self) -> TokenShards:
        if self._shards is None:
            self._shards = TokenShards(self.root, self.split)
        return self._shards

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), "input_ids": torch.from_numpy(self.shards[index])}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = None  # memmaps are reopened in each worker process
        return state


class StepSampler(Sampler[int]):
    """An endless stream of sequence indices: seeded permutations, one per pass over the data.

    Position n of the stream is a pure function of (seed, n), so a run resumed at step s can
    continue at n = s * batch_size and see exactly the sequences an uninterrupted run would.
    """

    def __init__(self, num_sequences: int, seed: int, start: int = 0):
        self.num_sequences, self.seed, self.start = num_sequences, seed, start

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def __iter__(self) -> Iterator[int]:
        n = self.start
        epoch, offset = divmod(n, self.num_sequences)
        while True:
            perm = self._permutation(epoch)
            for i in perm[offset:]:
                yield int(i)
            epoch, offset = epoch + 1, 0


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts token t+1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, root: str | Path, *, max_sequences: int = 256, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) of `model` on the first `max_sequences` held-out sequences."""
    shards = TokenShards(root, "heldout")
    n = min(len(shards), max_sequences)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        ids = torch.from_numpy(shards.batch(range(start, min(start + batch_size, n)))).to(device)
        logits = model(input_ids=ids).logits
        tokens = ids[:, 1:].numel()
        total += lm_loss(logits, ids).item() * tokens
        count += tokens
    model.train(was_training)
    return total / count


class CausalLMModule(pl.LightningModule):
    """Plain LM pre-training of a transformers causal LM (the teacher, or the LM-only baseline)."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, lr_lambda, max_steps: int):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.lr_lambda = lr_lambda
        self.max_steps = max_steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = lm_loss(self.model(input_ids=ids).logits, ids)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def configure_optimizers(self):
        # No weight decay on norms and biases (1-D tensors), as in every modern LM recipe.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas, eps=self.eps,
        )
        max_steps = self.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_lambda(min(step / max_steps, 1.0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def train_dataloader(root: str | Path, batch_size: int, seed: int, *, start_step: int = 0,
                     num_workers: int = 0) -> DataLoader:
    """An endless, seeded, resumable loader over the train split."""
    dataset = SequenceDataset(root, "train")
    sampler = StepSampler(len(dataset), seed, start=start_step * batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0, drop_last=True)

