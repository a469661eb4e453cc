"""smallm.data: `prepare` writes exact token files; `Batches` reads deterministic, rank-disjoint windows."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import smallm.data
from smallm.data import Batches, open_split, prepare, read_meta, to_uint16
from smallm.errors import SmallmError
from smallm.tokenizer import EOT_TEXT, EOT_TOKEN, get_tokenizer

# Stories with the awkward cases: unicode, blank lines, surrounding whitespace, an empty story, the literal
# "<|endoftext|>" inside a story (ordinary text, not a separator), a separator with trailing blanks.
STORIES = [
    f"Once upon a time, story {i} had a {'big ' * (i % 5)}dog named Max.\n\nThey played all day. The end."
    for i in range(40)
]
STORIES[3] = "  Lily sa\u00eft \u00e9t\u00e9 \u2014 \u4f60\u597d \U0001f408 caf\u00e9.\n  "
STORIES[7] = ""
STORIES[11] = "Tom wrote <|endoftext|> on the wall, and it stayed text."
STORIES[19] = "\n\n   Indented first line.\n\tTabbed line.\n\n"


def write_tinystories(path, stories=STORIES, last_separator=True):
    """Stories in TinyStories-valid.txt format: each followed by a line reading <|endoftext|>."""
    lines = []
    for i, story in enumerate(stories):
        lines.append(story)
        if last_separator or i < len(stories) - 1:
            lines.append(EOT_TEXT + ("  " if i == 5 else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def documents_of(ids) -> list[list[int]]:
    """Split a token file at <|endoftext|>; every document must end with one."""
    ids = [int(i) for i in ids]
    assert not ids or ids[-1] == EOT_TOKEN
    docs, current = [], []
    for i in ids:
        if i == EOT_TOKEN:
            docs.append(current)
            current = []
        else:
            current.append(i)
    return docs


def assert_exact(data_dir, stories):
    """Each split holds encode_ordinary(story.strip()) + [EOT] for its stories, in source order, together
    all non-empty stories once; meta counts match."""
    enc = get_tokenizer()
    texts = [s.strip() for s in stories if s.strip()]
    meta = read_meta(data_dir)
    seen = []
    for split in ("train", "validation"):
        docs = documents_of(open_split(data_dir, split))
        indices = []
        for doc in docs:
            text = enc.decode(doc)
            assert text in texts
            assert doc == enc.encode_ordinary(text)  # exact ids, and decoding round-trips
            indices.append(texts.index(text))
        assert indices == sorted(indices)  # source order within the split
        info = meta["splits"][split]
        assert info["documents"] == len(docs)
        assert info["tokens"] == sum(len(d) + 1 for d in docs)
        assert info["bytes"] == sum(len(texts[i].encode("utf-8")) for i in indices)
        seen += indices
    assert sorted(seen) == list(range(len(texts)))
    return meta


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


def test_batches_for_cuda_pin_contiguous_tensors(tmp_path, monkeypatch):
    """Pinning a strided view makes the host-to-GPU copy go through a pageable temporary."""
    data = write_prepared(tmp_path / "d")
    pinned = []
    to = torch.Tensor.to

    def fake_pin(self):  # this machine may have no CUDA: record, don't pin
        pinned.append(self.is_contiguous())
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, device, **kw: self if device == "cuda" else to(self, device, **kw)
    )
    x, y = Batches(data, "train", batch_size=4, block_size=16, device="cuda").get(0)
    assert pinned == [True, True]
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (4, 16)


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


def test_epoch_sampling_sees_every_window_once_per_epoch(tmp_path):
    """sampling="epoch": an epoch's steps take every window block_size apart exactly once, shuffled; the
    next epoch cuts at another offset in another order. Random windows leave a third of the text unseen."""
    data = write_prepared(tmp_path / "d", train_tokens=5000)
    batches = Batches(data, "train", batch_size=4, block_size=16, seed=3, sampling="epoch")
    per_epoch = (5000 - 16) // 16  # 311 windows
    starts = np.concatenate([batches.starts(step) for step in range(2 * per_epoch // 4 + 1)])
    first, second = starts[:per_epoch], starts[per_epoch : 2 * per_epoch]
    for epoch in (first, second):
        assert len(set(epoch.tolist())) == per_epoch  # no window twice
        assert len(set((epoch % 16).tolist())) == 1  # one cut per epoch
        assert epoch.min() >= 0 and epoch.max() + 16 + 1 <= 5000  # every window fits
        covered = np.zeros(5000, bool)
        for start in epoch:
            covered[start : start + 17] = True
        assert covered.sum() >= 5000 - 2 * 16
    assert not np.array_equal(np.sort(first), first)  # shuffled
    assert not np.array_equal(np.sort(first), np.sort(second))  # cut at another offset (seed 3: 11, then 6)
    x, y = batches.get(5)  # the windows are the text itself, as with random sampling
    np.testing.assert_array_equal(x[:, 0].numpy(), batches.starts(5) % 50257)
    assert torch.equal(x[:, 1:], y[:, :-1])

    randomly = Batches(data, "train", batch_size=4, block_size=16, seed=3)
    covered = np.zeros(5000, bool)
    for start in np.concatenate([randomly.starts(step) for step in range(per_epoch // 4)]):
        covered[start : start + 17] = True
    assert covered.mean() < 0.8  # ~1 - 1/e of it


def test_epoch_sampling_carries_on_when_the_batch_grows(tmp_path):
    """A time budget's plan may raise gradient accumulation mid-run: counted from `origin`, the windows go
    on where the smaller steps stopped, and ranks still split one global batch."""
    data = write_prepared(tmp_path / "d", train_tokens=20000)
    small = Batches(data, "train", batch_size=4, block_size=16, sampling="epoch")
    grown = Batches(
        data, "train", batch_size=4, block_size=16, accum_steps=2, sampling="epoch", origin=(10, 40)
    )
    np.testing.assert_array_equal(grown.starts(10), np.concatenate([small.starts(10), small.starts(11)]))
    np.testing.assert_array_equal(grown.starts(12), np.concatenate([small.starts(14), small.starts(15)]))
    rank1 = Batches(data, "train", 4, 16, rank=1, world_size=2, sampling="epoch", origin=(10, 40))
    assert torch.equal(rank1.get(12)[0], grown.get(12, 1)[0])
    with pytest.raises(SmallmError, match="sampling must be random or epoch"):
        Batches(data, "train", 4, 16, sampling="sequential")


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


def test_meta_without_token_counts_is_a_clear_error(tmp_path):
    data = write_prepared(tmp_path / "d")
    meta = json.loads((data / "meta.json").read_text())
    del meta["splits"]["train"]["tokens"]
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SmallmError, match="prepare --force"):
        read_meta(data)


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


# ---- prepare -------------------------------------------------------------------------------------------


def test_text_file_tokens_match_tiktoken_exactly(tmp_path):
    source = write_tinystories(tmp_path / "stories.txt")
    meta = prepare(tmp_path / "out", text_files=[source], val_fraction=0.2, workers=2)
    assert not meta["reused"]
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["eot_token"] == 50256
    assert_exact(tmp_path / "out", STORIES)
    assert meta["splits"]["validation"]["documents"] == round(40 * 0.2)  # 40 separators + 1 empty tail
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json",
        "train.bin",
        "validation.bin",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_tokens_do_not_depend_on_block_size_or_workers(tmp_path, monkeypatch):
    source = write_tinystories(tmp_path / "stories.txt", last_separator=False)
    prepare(tmp_path / "a", text_files=[source], val_fraction=0.1, workers=1)
    monkeypatch.setattr(smallm.data, "BLOCK_BYTES", 50)  # many blocks, cut at separators only
    prepare(tmp_path / "b", text_files=[source], val_fraction=0.1, workers=2)
    for split in ("train", "validation"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (
            tmp_path / "b" / f"{split}.bin"
        ).read_bytes()
    assert_exact(tmp_path / "b", STORIES)


def test_files_without_separators_are_one_document_each(tmp_path):
    (tmp_path / "one.txt").write_text("The first book.\nIt has two lines.\n")
    (tmp_path / "two.txt").write_text("The second book. \u00e9")
    meta = prepare(
        tmp_path / "out", text_files=[tmp_path / "one.txt", tmp_path / "two.txt"], val_fraction=0.5
    )
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["validation"]["documents"] == 1
    assert_exact(tmp_path / "out", ["The first book.\nIt has two lines.", "The second book. \u00e9"])


def test_validation_split_is_seeded(tmp_path):
    source = write_tinystories(tmp_path / "stories.txt")

    def validation(seed, name):
        prepare(tmp_path / name, text_files=[source], val_fraction=0.25, seed=seed, workers=1)
        return (tmp_path / name / "validation.bin").read_bytes()

    assert validation(1, "a") == validation(1, "b")
    assert validation(1, "a") != validation(2, "c")


@pytest.fixture
def parquet_dir(tmp_path, monkeypatch):
    """A local dataset in Hugging Face layout with train and validation splits; datasets caches in tmp."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    directory = tmp_path / "tinystories-local"
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": STORIES[:30]}), directory / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": STORIES[30:]}), directory / "data" / "validation-00000-of-00001.parquet")
    return directory


def test_parquet_dataset_directory_keeps_its_splits(tmp_path, parquet_dir):
    meta = prepare(tmp_path / "out", dataset=str(parquet_dir), workers=2)
    assert_exact(tmp_path / "out", STORIES)
    enc = get_tokenizer()
    validation = documents_of(open_split(tmp_path / "out", "validation"))
    assert validation == [enc.encode_ordinary(s.strip()) for s in STORIES[30:]]  # its own split, all of it
    assert meta["splits"]["train"]["documents"] == 29  # 30 rows, one empty
    assert meta["source"]["dataset"] == str(parquet_dir.resolve())


def test_dataset_without_the_column_names_its_columns(tmp_path, parquet_dir):
    with pytest.raises(SmallmError, match=r"no column 'story'.*text"):
        prepare(tmp_path / "out", dataset=str(parquet_dir), column="story")
    assert not (tmp_path / "out").exists()


def test_rerun_reuses_a_finished_directory_unless_inputs_change_or_forced(tmp_path):
    source = write_tinystories(tmp_path / "stories.txt")
    first = prepare(tmp_path / "out", text_files=[source], workers=1)
    stamp = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    again = prepare(tmp_path / "out", text_files=[source], workers=1)
    assert again["reused"] and again["splits"] == first["splits"]
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == stamp
    assert not prepare(tmp_path / "out", text_files=[source], workers=1, force=True)["reused"]
    assert not prepare(tmp_path / "out", text_files=[source], workers=1, val_fraction=0.1)["reused"]
    write_tinystories(source, STORIES[:10])
    changed = prepare(tmp_path / "out", text_files=[source], val_fraction=0.1, workers=1)
    assert not changed["reused"] and changed["splits"]["train"]["documents"] < 10


def test_failed_prepare_leaves_the_previous_output_untouched(tmp_path):
    good = write_tinystories(tmp_path / "good.txt")
    prepare(tmp_path / "out", text_files=[good], workers=1)
    before = (tmp_path / "out" / "train.bin").read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(good.read_bytes() + b"caf\xe9 is latin-1\n")
    with pytest.raises(SmallmError, match="bad.txt is not UTF-8"):
        prepare(tmp_path / "out", text_files=[bad], workers=2)
    assert (tmp_path / "out" / "train.bin").read_bytes() == before
    read_meta(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "good.txt", "out"]


def test_empty_text_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text(f"\n{EOT_TEXT}\n  \n")
    with pytest.raises(SmallmError, match="no text"):
        prepare(tmp_path / "out", text_files=[tmp_path / "empty.txt"])
    assert not (tmp_path / "out").exists()


def test_token_id_beyond_uint16_is_a_clear_error():
    assert to_uint16(np.array([0, 65535], dtype=np.uint32)).dtype == np.uint16
    with pytest.raises(SmallmError, match="token id 70000 does not fit uint16"):
        to_uint16(np.array([5, 70000, 80000], dtype=np.uint32))


# ---- the command line ----------------------------------------------------------------------------------


def smallm_prepare(cwd, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "smallm", "prepare", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("smallm prepare: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_unreachable_hub_is_one_clear_line(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = smallm_prepare(tmp_path, "--out", "data/tinystories", env=offline)
    assert_one_line_error(result, "roneneldan/TinyStories", "could not download", "--text-files", "--dataset")
    assert not (tmp_path / "data").exists()


def test_cli_missing_text_file_is_one_clear_line(tmp_path):
    result = smallm_prepare(tmp_path, "--text-files", "nowhere.txt", "--out", "out")
    assert_one_line_error(result, "text file not found: nowhere.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_prepares_then_says_it_reuses(tmp_path):
    write_tinystories(tmp_path / "stories.txt")
    first = smallm_prepare(tmp_path, "--text-files", "stories.txt", "--out", "out", "--val-fraction", "0.1")
    assert first.returncode == 0, first.stderr
    assert "out/train.bin" in first.stdout and "reusing" not in first.stdout
    assert_exact(tmp_path / "out", STORIES)
    second = smallm_prepare(tmp_path, "--text-files", "stories.txt", "--out", "out", "--val-fraction", "0.1")
    assert second.returncode == 0 and "reusing" in second.stdout


def test_cli_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    """The bins outgrow what the filesystem allows (RLIMIT_FSIZE: a real failed write, EFBIG, as a full disk
    gives ENOSPC): one line naming the output and the space left, and no temporary directory."""
    import resource

    write_tinystories(tmp_path / "stories.txt", STORIES * 20)  # ~20 KB of tokens

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, resource.RLIM_INFINITY))

    result = subprocess.run(
        [sys.executable, "-m", "smallm", "prepare", "--text-files", "stories.txt", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=small_files,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("smallm prepare: error: cannot write out (File too large; ")
    assert result.stderr.count("error") == 1 and "pick another --out" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories.txt"]
