"""Honest evaluation: the loss over a whole prepared split, every token predicted exactly once.

The split is cut into consecutive, non-overlapping windows of block_size inputs, each with the next
block_size tokens as targets (the last window may be shorter), so every token but the first is predicted
once, with the context available inside its window. No sampling: the same model and data give the same
numbers every time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from smallm.data import open_split, read_meta
from smallm.errors import SmallmError
from smallm.tokenizer import check_same_tokenizer


def evaluate(
    model, data_dir, split: str = "validation", batch_size: int = 8, progress: bool = False, checkpoint=None
) -> dict:
    """Mean cross-entropy over the whole split of a prepared directory.

    Returns {"val_loss": L (nats per token), "perplexity": exp(L),
    "bits_per_byte": L * tokens / (ln 2 * bytes), "tokens": tokens predicted}, bytes being the UTF-8 size
    of the split's text as recorded in meta.json. progress=True shows a progress bar on stderr. Given the
    model's checkpoint directory, data tokenized otherwise than the model was trained is refused.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SmallmError(f"batch_size must be a positive integer, got {batch_size!r}")
    meta = read_meta(data_dir)
    data = open_split(data_dir, split)  # (N,) uint16
    if checkpoint is not None:
        check_same_tokenizer(data_dir, checkpoint, f"evaluate {checkpoint}")
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise SmallmError(
            f"{data_dir} was prepared with a {meta.get('vocab_size')}-token tokenizer, which this model "
            f"({model.config.vocab_size} tokens) cannot read"
        )
    n_targets = len(data) - 1
    if n_targets < 1:
        raise SmallmError(f"the {split!r} split of {data_dir} has {len(data)} tokens; at least 2 are needed")
    block_size = model.config.block_size
    n_full = n_targets // block_size  # full windows; then one shorter window with the rest, if any
    device = model.lm_head.weight.device

    def window_loss(start: int, rows: int, T: int) -> float:
        """Summed loss of `rows` consecutive windows of T targets starting at token `start`."""
        chunk = torch.from_numpy(np.asarray(data[start : start + rows * T + 1]).astype(np.int64)).to(device)
        x = chunk[:-1].view(rows, T)  # (rows, T)
        y = chunk[1:].view(rows, T)  # (rows, T): the next token of each input
        _, loss = model(x, targets=y, return_logits=False)  # the mean over rows * T targets
        return loss.item() * rows * T

    total = 0.0  # summed nats, accumulated in float64
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in tqdm(range(0, n_full, batch_size), desc=f"eval {split}", disable=not progress):
                rows = min(batch_size, n_full - first)
                total += window_loss(first * block_size, rows, block_size)
            rest = n_targets - n_full * block_size
            if rest:
                total += window_loss(n_full * block_size, 1, rest)
    finally:
        model.train(was_training)

    loss = total / n_targets
    n_bytes = meta["splits"][split].get("bytes") or 0
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total / (math.log(2) * n_bytes) if n_bytes > 0 else None,
        "tokens": n_targets,
    }
