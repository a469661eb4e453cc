"""smallm.data: `prepare` writes exact token files; `Batches` reads deterministic, rank-disjoint windows."""

import json

import numpy as np
import pytest
import torch

from smallm.data import Batches, open_split, read_meta
from smallm.errors import SmallmError


def write_prepared(directory, train_tokens=5000, val_tokens=600):
    """A prepared directory by hand: tokens 0..N-1 (mod 50257), so a window's first id gives its start."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", train_tokens), ("validation", val_tokens)):
        (np.arange(n) % 50257).astype(np.uint16).tofile(directory / f"{split}.bin")
        splits[split] = {"documents": 1, "tokens": n, "bytes": n}
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "dtype": "uint16",
        "eot_token": 50256,
        "source": "test",
        "splits": splits,
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


# ---- the reader ----------------------------------------------------------------------------------------


def test_batches_are_deterministic_for_a_seed_and_step(tmp_path):
    data = write_prepared(tmp_path / "d")
    a = Batches(data, "train", batch_size=4, block_size=16, seed=7)
    b = Batches(data, "train", batch_size=4, block_size=16, seed=7)
    x1, y1 = a.get(3)
    x2, y2 = b.get(3)
    assert x1.dtype == torch.int64 and x1.shape == (4, 16) and y1.shape == (4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one
    assert not torch.equal(a.get(4)[0], x1)  # another step, other windows
    assert not torch.equal(Batches(data, "train", 4, 16, seed=8).get(3)[0], x1)


def test_batches_windows_are_contiguous_slices_of_the_split(tmp_path):
    data = write_prepared(tmp_path / "d")
    tokens = np.asarray(open_split(data, "validation"))
    x, y = Batches(data, "validation", batch_size=8, block_size=32).get(0)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        start = int(row_x[0])
        np.testing.assert_array_equal(row_x, tokens[start : start + 32])
        np.testing.assert_array_equal(row_y, tokens[start + 1 : start + 33])


def test_ranks_take_disjoint_rows_of_the_global_batch(tmp_path):
    data = write_prepared(tmp_path / "d", train_tokens=50000)
    rows = []
    for rank in range(4):
        batches = Batches(data, "train", batch_size=4, block_size=8, rank=rank, world_size=4, accum_steps=2)
        for micro in range(2):
            rows.append(batches.get(5, micro)[0][:, 0])
    starts = torch.cat(rows)
    # Every rank/micro-step took a different slice of the same 32 global draws.
    np.testing.assert_array_equal(
        starts.numpy(), Batches(data, "train", 4, 8, world_size=4, accum_steps=2).starts(5)
    )
    assert len(set(starts.tolist())) == len(starts)  # 32 draws from 50k starts: no collisions here


def test_two_ranks_see_the_same_windows_as_one_rank_with_two_micro_steps(tmp_path):
    data = write_prepared(tmp_path / "d")
    single = Batches(data, "train", batch_size=3, block_size=16, accum_steps=2)
    rank0 = Batches(data, "train", batch_size=3, block_size=16, rank=0, world_size=2)
    rank1 = Batches(data, "train", batch_size=3, block_size=16, rank=1, world_size=2)
    for step in (0, 1, 9):
        assert torch.equal(single.get(step, 0)[0], rank0.get(step)[0])
        assert torch.equal(single.get(step, 1)[0], rank1.get(step)[0])


def test_truncated_bin_is_detected_by_the_reader(tmp_path):
    data = write_prepared(tmp_path / "d")
    with open(data / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SmallmError, match="truncated"):
        read_meta(data)
    with pytest.raises(SmallmError, match="truncated"):
        open_split(data, "validation")
    with pytest.raises(SmallmError, match="truncated"):
        Batches(data, "train", batch_size=2, block_size=8)


def test_reader_names_a_missing_directory_or_meta(tmp_path):
    with pytest.raises(SmallmError, match="smallm prepare"):
        open_split(tmp_path / "nowhere", "train")
    data = write_prepared(tmp_path / "d")
    (data / "meta.json").unlink()
    with pytest.raises(SmallmError, match="meta.json is missing"):
        Batches(data, "train", batch_size=2, block_size=8)


def test_batches_refuse_a_split_shorter_than_one_window(tmp_path):
    data = write_prepared(tmp_path / "d", val_tokens=10)
    with pytest.raises(SmallmError, match="block_size"):
        Batches(data, "validation", batch_size=2, block_size=16)
