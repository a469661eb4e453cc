"""Prepared token data: `smallm prepare` writes it, `Batches` reads random training windows from it.

A prepared directory holds `train.bin` and `validation.bin` (flat uint16 GPT-2 token ids, `<|endoftext|>`
after every story, stories in source order) and `meta.json` (tokenizer, dtype, and per split the number
of documents, tokens and UTF-8 bytes of source text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smallm.checkpoint import read_json
from smallm.errors import SmallmError

META = "meta.json"
SPLITS = ("train", "validation")
DTYPE = np.uint16

# ---- reading -------------------------------------------------------------------------------------------


def read_meta(data_dir) -> dict:
    """The `meta.json` of a prepared directory, after checking every split's bin against it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SmallmError(f"no prepared data at {data_dir}; run `smallm prepare --out {data_dir}` first")
    meta_path = data_dir / META
    if not meta_path.is_file():
        raise SmallmError(
            f"{meta_path} is missing, so {data_dir} is not a finished `smallm prepare` directory; "
            f"run `smallm prepare --out {data_dir} --force`"
        )
    meta = read_json(meta_path)
    if meta.get("dtype") != "uint16" or not isinstance(meta.get("splits"), dict):
        raise SmallmError(f"{meta_path} does not describe uint16 token files; rerun `smallm prepare --force`")
    for split, info in meta["splits"].items():
        _check_bin(data_dir, split, info)
    return meta


def _check_bin(data_dir: Path, split: str, info: dict) -> Path:
    path = data_dir / f"{split}.bin"
    if not path.is_file():
        raise SmallmError(f"{path} is missing; rerun `smallm prepare --out {data_dir} --force`")
    expected = int(info["tokens"]) * np.dtype(DTYPE).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise SmallmError(
            f"{path} has {actual:,} bytes but {META} says {info['tokens']:,} tokens ({expected:,} bytes): "
            f"the file is truncated or from another run; rerun `smallm prepare --out {data_dir} --force`"
        )
    return path


def open_split(data_dir, split: str) -> np.memmap:
    """The tokens of `split` ("train" or "validation") as a read-only uint16 memmap, checked against meta."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise SmallmError(f"{data_dir} has no {split!r} split (it has: {', '.join(meta['splits'])})")
    path = _check_bin(data_dir, split, meta["splits"][split])
    if meta["splits"][split]["tokens"] == 0:
        return np.zeros(0, dtype=DTYPE)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=DTYPE, mode="r")


class Batches:
    """Random windows of `block_size + 1` tokens from one split, identical for any number of DDP ranks.

    For optimizer step `step` the GLOBAL batch of batch_size * accum_steps * world_size window starts is
    drawn from `np.random.default_rng([seed, step])`; rank r at micro-step m takes rows
    [(r * accum_steps + m) * batch_size, +batch_size). Ranks therefore see disjoint rows, a DDP run sees
    the same windows per step as one process with the same global batch, and resuming needs only `step`.
    """

    def __init__(
        self,
        data_dir,
        split,
        batch_size,
        block_size,
        seed=1337,
        rank=0,
        world_size=1,
        accum_steps=1,
        device="cpu",
    ):
        if batch_size < 1 or block_size < 1 or accum_steps < 1 or world_size < 1:
            raise SmallmError("batch_size, block_size, accum_steps and world_size must be positive")
        if not 0 <= rank < world_size:
            raise SmallmError(f"rank {rank} is outside 0..{world_size - 1}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.device = torch.device(device)
        data = open_split(self.data_dir, split)
        self.num_tokens = len(data)
        if self.num_tokens < block_size + 1:
            raise SmallmError(
                f"the {split} split of {self.data_dir} has {self.num_tokens:,} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; prepare more data or use a smaller block_size"
            )
        self.path = self.data_dir / f"{split}.bin"

    def starts(self, step: int) -> np.ndarray:
        """All window starts of the global batch of optimizer step `step`: (world_size*accum*B,)."""
        global_rows = self.batch_size * self.accum_steps * self.world_size
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.num_tokens - self.block_size, size=global_rows)

    def get(self, step: int, micro_step: int = 0):
        """(x, y) int64 tensors of shape (batch_size, block_size) on the device; y is x shifted by one."""
        if not 0 <= micro_step < self.accum_steps:
            raise SmallmError(f"micro_step {micro_step} is outside 0..{self.accum_steps - 1}")
        row = (self.rank * self.accum_steps + micro_step) * self.batch_size
        starts = self.starts(step)[row : row + self.batch_size]
        # A fresh memmap per call: numpy memmaps keep pages referenced, so reusing one grows memory.
        data = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(self.num_tokens,))
        windows = np.stack([data[s : s + self.block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        del data
        windows = torch.from_numpy(windows)
        x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        else:
            x, y = x.contiguous().to(self.device), y.contiguous().to(self.device)
        return x, y
