"""Prepared token data: `smallm prepare` writes it, `Batches` reads random training windows from it.

A prepared directory holds `train.bin` and `validation.bin` (flat uint16 token ids, `<|endoftext|>`
after every story, stories in source order), `meta.json` (tokenizer, dtype, and per split the number
of documents, tokens and UTF-8 bytes of source text) and, for a trained tokenizer, its `tokenizer.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import time
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from smallm.checkpoint import atomic_directory, writing
from smallm.errors import SmallmError
from smallm.tokenizer import (
    EOT_TEXT,
    TOKENIZER_FILE,
    BPETokenizer,
    file_id,
    get_tokenizer,
    parse_tokenizer_spec,
    train_bpe,
)

# torch and datasets are imported where they are used: `smallm prepare --text-files` and its worker
# processes need neither, and importing torch alone takes about a second.

META = "meta.json"
SPLITS = ("train", "validation")
DTYPE = np.uint16
DEFAULT_DATASET = "roneneldan/TinyStories"
BLOCK_BYTES = 1 << 20  # about 1 MB of text per task sent to a worker
DATASET_BATCH = 1024  # dataset rows per task
# A separator: a line reading <|endoftext|> (trailing blanks allowed). Blocks of text always start with a
# newline, so every separator is "\n<|endoftext|>", a literal prefix that `re` finds at memchr speed.
SEPARATOR = re.compile(rb"\n<\|endoftext\|>[ \t\r]*(?=\n|\Z)")
SEPARATOR_STR = re.compile(SEPARATOR.pattern.decode())
SEPARATOR_BEFORE_NEWLINE = re.compile(rb"\n<\|endoftext\|>[ \t\r]*(?=\n)")

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
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallmError(f"{meta_path} is not valid JSON ({e}); rerun `smallm prepare --force`") from e
    splits = meta.get("splits")
    if (
        meta.get("dtype") != "uint16"
        or not isinstance(splits, dict)
        or not all(isinstance(info, dict) and isinstance(info.get("tokens"), int) for info in splits.values())
    ):
        raise SmallmError(f"{meta_path} does not describe uint16 token files; rerun `smallm prepare --force`")
    if meta.get("tokenizer", "gpt2") != "gpt2" and not (data_dir / TOKENIZER_FILE).is_file():
        raise SmallmError(f"{data_dir / TOKENIZER_FILE} is missing; rerun `smallm prepare --force`")
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
    """Windows of `block_size + 1` tokens from one split, identical for any number of DDP ranks.

    For optimizer step `step` the GLOBAL batch of batch_size * accum_steps * world_size window starts is a
    function of (seed, step) alone; rank r at micro-step m takes rows [(r * accum_steps + m) * batch_size,
    +batch_size). Ranks therefore see disjoint rows, a DDP run sees the same windows per step as one
    process with the same global batch, and resuming needs only `step`.

    sampling "random" (nanoGPT's) draws every start anywhere, with replacement: one epoch's worth of windows
    leaves ~37% of the text unseen (e^-1) and shows some twice. "epoch" cuts the split into windows
    block_size apart (from an offset drawn per epoch) and takes them in a shuffled order, so an epoch sees
    every token once (the last < 2 * block_size tokens of each epoch's cut aside). Its windows are counted
    from `origin` = (step, windows taken before it), so that the batch size may change during a run (a time
    budget's plan may raise it) without skipping or repeating windows.
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
        sampling="random",
        origin=(0, 0),
    ):
        if sampling not in ("random", "epoch"):
            raise SmallmError(f"sampling must be random or epoch, got {sampling!r}")
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
        self.device = device
        self.sampling = sampling
        self.origin = origin
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
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, self.num_tokens - self.block_size, size=global_rows)
        per_epoch = max(1, (self.num_tokens - self.block_size) // self.block_size)
        first = self.origin[1] + (step - self.origin[0]) * global_rows
        rows = np.arange(first, first + global_rows)
        epochs, index = np.divmod(rows, per_epoch)
        starts = np.empty(global_rows, dtype=np.int64)
        for epoch in np.unique(epochs):
            offset, order = self._epoch(int(epoch), per_epoch)
            starts[epochs == epoch] = offset + order[index[epochs == epoch]] * self.block_size
        return starts

    @lru_cache(maxsize=2)  # noqa: B019 (a handful of Batches per process, each alive for a whole run)
    def _epoch(self, epoch: int, per_epoch: int) -> tuple[int, np.ndarray]:
        """This epoch's offset (< block_size, so that every window k * block_size + offset fits) and order
        of windows; the 3 keeps its random stream apart from "random"'s."""
        rng = np.random.default_rng([self.seed, epoch, 3])
        room = self.num_tokens - self.block_size - 1 - (per_epoch - 1) * self.block_size
        return int(rng.integers(0, min(self.block_size, room + 1))), rng.permutation(per_epoch)

    def get(self, step: int, micro_step: int = 0):
        """(x, y) int64 tensors of shape (batch_size, block_size) on the device; y is x shifted by one."""
        import torch

        if not 0 <= micro_step < self.accum_steps:
            raise SmallmError(f"micro_step {micro_step} is outside 0..{self.accum_steps - 1}")
        row = (self.rank * self.accum_steps + micro_step) * self.batch_size
        starts = self.starts(step)[row : row + self.batch_size]
        # A fresh memmap per call: numpy memmaps keep pages referenced, so reusing one grows memory.
        data = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(self.num_tokens,))
        windows = np.stack([data[s : s + self.block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        del data
        windows = torch.from_numpy(windows)
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T) each
        if torch.device(self.device).type == "cuda":
            # from page-locked memory the copy is asynchronous; pinning a strided view instead would send
            # it through a pageable temporary
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ---- writing -------------------------------------------------------------------------------------------


def prepare(
    out_dir="data/tinystories",
    dataset=DEFAULT_DATASET,
    text_files=None,
    column="text",
    val_fraction=0.005,
    workers=None,
    seed=1337,
    force=False,
    tokenizer="gpt2",
) -> dict:
    """Tokenize a dataset (or text files) into `out_dir/{train,validation}.bin` and `meta.json`; return meta.

    Arguments:
        out_dir: the directory to write; it is replaced atomically, never left half-written.
        dataset: anything `datasets.load_dataset` accepts: a Hub name or a local directory in Hugging Face
            layout (data/train-*.parquet, data/validation-*.parquet, json, ...). Ignored with `text_files`.
        text_files: plain text files, each either in TinyStories format (stories separated by lines that
            read `<|endoftext|>`) or holding one document.
        column: the dataset column holding the text.
        val_fraction: the share of documents held out for validation (seeded, deterministic) when the
            source has no validation split of its own.
        workers: tokenizer processes (default: every core).
        seed: seeds the validation split.
        force: rebuild even when `out_dir` already holds these inputs.
        tokenizer: "gpt2"; "bpe:N" to train a byte-level BPE of N tokens on the training split first
            (stored as out_dir/tokenizer.json); or the path of an existing tokenizer.json (or of a
            directory holding one, e.g. a checkpoint), to tokenize more text the way a model expects.

    Every document is stripped of surrounding whitespace (empty ones are dropped), tokenized with the
    tokenizer's ordinary encoding and followed by `<|endoftext|>`; documents keep their source order within
    a split. The returned meta has two extra keys: "reused" (True when `out_dir` was already prepared from
    these inputs) and "tokenizer_seconds" (the time spent training a BPE, else None).
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise SmallmError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    kind, tokenizer_arg = parse_tokenizer_spec(tokenizer)
    workers = workers or _cpu_count()
    if workers < 1:
        raise SmallmError(f"--workers must be at least 1, not {workers}")
    if text_files:
        text_files = [Path(p) for p in text_files]
        for path in text_files:
            if not path.is_file():
                raise SmallmError(f"text file not found: {path}")
        source = {"text_files": [str(p.resolve()) for p in text_files]}
        files = _file_listing(text_files)
    else:
        local = Path(dataset).exists()
        source = {"dataset": str(Path(dataset).resolve()) if local else dataset, "column": column}
        listing = sorted(Path(dataset).rglob("*")) if Path(dataset).is_dir() else [Path(dataset)]
        files = _file_listing(listing) if local else []
    # a given tokenizer.json counts by its content, so that another file means other inputs
    tokenizer_input = file_id(tokenizer_arg) if kind == "file" else tokenizer
    inputs = {**source, "files": files, "val_fraction": val_fraction, "seed": seed}
    inputs["tokenizer"] = tokenizer_input

    reused = _finished_with(out_dir, inputs)
    if reused is not None and not force:
        return {**reused, "reused": True, "tokenizer_seconds": None}
    if out_dir.exists() and not (out_dir / META).is_file() and any(out_dir.iterdir()):
        raise SmallmError(f"{out_dir} exists and is not a `smallm prepare` directory; choose another --out")

    def tasks():  # blocks of raw text (workers split them into stories), or batches of dataset rows
        if text_files:
            return _text_file_tasks(text_files, val_fraction, seed)
        return _dataset_tasks(dataset, column, val_fraction, seed)[0]

    if text_files:
        encode, total, unit = _encode_block, sum(p.stat().st_size + 1 for p in text_files), "B"
    else:
        encode, (_, total), unit = _encode_texts, _dataset_tasks(dataset, column, val_fraction, seed), "doc"

    full_disk = f"{out_dir} is as it was; free some space or pick another --out, then prepare again"
    with atomic_directory(out_dir) as tmp:
        enc, seconds = None, None  # None: GPT-2, in every worker process
        if kind == "bpe":
            t0 = time.perf_counter()
            documents = _training_documents(tasks(), bool(text_files))
            enc = train_bpe(documents, tokenizer_arg, tmp / TOKENIZER_FILE)
            seconds = time.perf_counter() - t0
        elif kind == "file":
            shutil.copyfile(tokenizer_arg, tmp / TOKENIZER_FILE)
            enc = BPETokenizer(tmp / TOKENIZER_FILE)
        if enc is not None:
            encode, workers = partial(encode, tokenizer=enc), 1  # the Rust tokenizer uses every core itself
        meta = {
            "tokenizer": "gpt2" if enc is None else TOKENIZER_FILE,
            "vocab_size": (enc or get_tokenizer()).n_vocab,
            "dtype": "uint16",
            "eot_token": (enc or get_tokenizer()).eot_token,
            "source": source,
            "splits": {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS},
            "inputs": inputs,
        }
        bar = tqdm(total=total, unit=unit, unit_scale=True, desc=f"prepare {out_dir}", smoothing=0.1)
        _encode_into(tmp, meta, encode, tasks(), workers, bar, out_dir, full_disk)
        with writing(out_dir, then=full_disk):
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "reused": False, "tokenizer_seconds": seconds}


def _encode_into(tmp: Path, meta: dict, encode, tasks, workers: int, bar, out_dir, full_disk: str) -> None:
    """Encode `tasks` into tmp/{train,validation}.bin in `workers` processes, counting into meta's splits.
    A failed write is a WriteFailed naming out_dir (atomic_directory then removes tmp)."""
    with _worker_pool(workers) as pool:
        # unbuffered: a failed write raises at once with its reason (ENOSPC), and closing cannot fail
        bins = {split: open(tmp / f"{split}.bin", "wb", buffering=0) for split in SPLITS}
        try:
            # imap keeps the order of the tasks; it reads ahead only as far as the pipes to the workers hold.
            for done, results in pool.imap(encode, tasks) if pool is not None else map(encode, tasks):
                for split, (ids, documents, n_bytes) in results.items():
                    with writing(out_dir, then=full_disk):  # atomic_directory removes the temporary one
                        remaining = memoryview(ids).cast("B")
                        while remaining:  # a raw write may write only part
                            remaining = remaining[bins[split].write(remaining) :]
                    info = meta["splits"][split]
                    info["documents"] += documents
                    info["tokens"] += len(ids)
                    info["bytes"] += n_bytes
                bar.update(done)
        finally:
            bar.close()
            for f in bins.values():
                f.close()
    if meta["splits"]["train"]["tokens"] == 0:
        raise SmallmError(f"no text found in {_describe(meta['source'])}: nothing to train on")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _describe(source: dict) -> str:
    return ", ".join(source["text_files"]) if "text_files" in source else source["dataset"]


def _file_listing(paths) -> list:
    """(path, size, mtime) of every input file, so that a changed file means new inputs."""
    return [
        {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in paths
        if p.is_file() and ".cache" not in p.parts
    ]


def _finished_with(out_dir: Path, inputs: dict) -> dict | None:
    """The meta of `out_dir` if it is a complete, consistent directory prepared from `inputs`."""
    if not (out_dir / META).is_file():
        return None
    try:
        meta = read_meta(out_dir)
    except SmallmError:
        return None
    return meta if meta.get("inputs") == inputs else None


def _validation_mask(count: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which of `count` documents go to validation: a seeded random `val_fraction` of them, at least one
    (and not all) when val_fraction > 0 and there are two or more."""
    is_val = np.zeros(count, dtype=bool)
    if val_fraction > 0 and count >= 2:
        n_val = min(max(round(count * val_fraction), 1), count - 1)
        is_val[np.random.default_rng(seed).choice(count, size=n_val, replace=False)] = True
    return is_val


# ---- sources: tasks for the workers, in source order ---------------------------------------------------


def _text_file_blocks(path: Path, block_bytes: int | None = None):
    """Cut a text file into blocks of about `block_bytes`, each ending at a separator: (block, documents,
    last). Every block starts with a newline (added before the file's first byte) so that a separator on
    the first line is found too; a block ends just after a separator (before its newline), except the
    file's last, which also holds the text after the last separator. A file without separators is one
    document."""
    buffer, searched = bytearray(b"\n"), 0
    with open(path, "rb") as f:
        while data := f.read(block_bytes or BLOCK_BYTES):
            buffer += data
            cut = _last_separator_end(buffer, searched)
            if cut is not None:
                block = bytes(buffer[:cut])
                del buffer[:cut]
                yield block, len(SEPARATOR.findall(block)), False
            searched = max(0, len(buffer) - 64)  # a separator may still be missing its newline
    block = bytes(buffer)
    yield block, len(SEPARATOR.findall(block)) + 1, True


def _last_separator_end(buffer: bytearray, start: int) -> int | None:
    """The end of the last separator in buffer[start:] that is followed by a newline, if any."""
    end = len(buffer)
    while (position := buffer.rfind(b"\n" + EOT_TEXT.encode(), start, end)) >= 0:
        match = SEPARATOR_BEFORE_NEWLINE.match(buffer, position)
        if match:
            return match.end()
        end = position
    return None


def _text_file_tasks(paths, val_fraction: float, seed: int):
    """(path, block, last, is_val of the block's documents) for every block of every file."""
    count = sum(n for path in paths for _, n, _ in _text_file_blocks(path)) if val_fraction > 0 else 0
    is_val = _validation_mask(count, val_fraction, seed)
    first = 0
    for path in paths:
        for block, n, last in _text_file_blocks(path):
            yield str(path), block, last, is_val[first : first + n] if val_fraction > 0 else None
            first += n


def _dataset_tasks(dataset: str, column: str, val_fraction: float, seed: int):
    """(tasks, documents) of a `datasets.load_dataset` source: tasks are (texts, is_val) batches, from its
    train split and then its own validation split, or `val_fraction` of train when it has none."""
    import datasets

    local = Path(dataset).exists()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # without network the Hub client warns at each of its retries
    try:
        splits = datasets.load_dataset(dataset)
    except Exception as e:  # the Hub client raises many kinds (offline, HTTP, not found, bad files)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise SmallmError(f"could not load the dataset at {dataset}: {reason}") from e
        raise SmallmError(
            f"could not download {dataset} from the Hugging Face Hub ({reason}); without network, use a "
            "local copy of TinyStories: `smallm prepare --text-files TinyStories-train.txt` or "
            "`--dataset DIR` (a directory in Hugging Face layout, e.g. DIR/data/train-*.parquet)"
        ) from e
    finally:
        hub_log.setLevel(level)
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({"train": splits})
    train_name = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if train_name is None:
        raise SmallmError(f"{dataset} has splits {', '.join(splits)} but none named 'train'")
    val_name = next((name for name in ("validation", "valid", "val") if name in splits), None)
    for name in filter(None, (train_name, val_name)):
        if column not in splits[name].column_names:
            raise SmallmError(
                f"{dataset} ({name} split) has no column {column!r}; its columns are: "
                f"{', '.join(splits[name].column_names)} (pick one with --column)"
            )
    n_train = len(splits[train_name])
    n_val = len(splits[val_name]) if val_name else 0
    train_is_val = (
        _validation_mask(n_train, val_fraction, seed) if val_name is None else np.zeros(n_train, bool)
    )

    def tasks():
        for name, is_val in ((train_name, train_is_val), (val_name, np.ones(n_val, bool))):
            if name is None:
                continue
            first = 0
            for batch in splits[name].select_columns([column]).iter(batch_size=DATASET_BATCH):
                texts = batch[column]
                yield texts, is_val[first : first + len(texts)]
                first += len(texts)

    return tasks(), n_train + n_val


# ---- tokenizing in worker processes --------------------------------------------------------------------


@contextlib.contextmanager
def _worker_pool(workers: int):
    """A `multiprocessing.Pool` of `workers` processes that ignore Ctrl-C (the parent handles it), or None."""
    if workers == 1:
        yield None
        return
    # fork: the workers inherit the loaded modules and the tokenizer built here (0.3 s saved in each).
    get_tokenizer()
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    pool = context.Pool(workers, initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _init_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer()  # inherited through fork; built here where workers are spawned


def _block_documents(task) -> tuple[int, list[str], np.ndarray | None]:
    """A block of a text file split into its documents: (bytes, documents, is_val)."""
    path, block, last, is_val = task
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SmallmError(f"{path} is not UTF-8 text ({e.reason} in a block of the file)") from None
    documents = SEPARATOR_STR.split(text)
    if not last:
        documents.pop()  # the empty text after the block's final separator
    return len(block), documents, is_val


def _row_documents(task) -> tuple[int, list[str], np.ndarray | None]:
    """A batch of dataset rows, checked to be text: (rows, documents, is_val)."""
    texts, is_val = task
    for text in texts:
        if not isinstance(text, str):
            raise SmallmError(
                f"a row holds {type(text).__name__}, not text; pick a text column with --column"
            )
    return len(texts), texts, is_val


def _encode_block(task, tokenizer=None) -> tuple[int, dict]:
    """Split a block of a text file into documents and encode them: (bytes done, {split: encoded})."""
    done, documents, is_val = _block_documents(task)
    return done, _encode_by_split(documents, is_val, tokenizer)


def _encode_texts(task, tokenizer=None) -> tuple[int, dict]:
    """Encode a batch of dataset rows: (rows done, {split: encoded})."""
    done, documents, is_val = _row_documents(task)
    return done, _encode_by_split(documents, is_val, tokenizer)


def _by_split(texts: list[str], is_val: np.ndarray | None) -> dict[str, list[str]]:
    """{split: stripped non-empty texts}; is_val=None puts every text in train."""
    by_split = {}
    for i, text in enumerate(texts):
        text = text.strip()
        if text:
            by_split.setdefault("validation" if is_val is not None and is_val[i] else "train", []).append(
                text
            )
    return by_split


def _encode_by_split(texts: list[str], is_val: np.ndarray | None, tokenizer=None) -> dict:
    """{split: (uint16 ids, documents, UTF-8 bytes)}; is_val=None puts every text in train."""
    return {split: encode_documents(docs, tokenizer) for split, docs in _by_split(texts, is_val).items()}


def _training_documents(tasks, text_files: bool):
    """Batches of the training split's documents, exactly as prepare will encode them (to train a BPE)."""
    for task in tasks:
        _, documents, is_val = _block_documents(task) if text_files else _row_documents(task)
        batch = _by_split(documents, is_val).get("train")
        if batch:
            yield batch


def encode_documents(texts: list[str], tokenizer=None) -> tuple[np.ndarray, int, int]:
    """Ids of `texts`, each followed by `<|endoftext|>`, as uint16; with the count and UTF-8 bytes.

    tokenizer None is GPT-2, where one tiktoken call on the joined texts gives the ids of concatenating
    `encode_ordinary(text) + [50256]` (it encodes the text between allowed special tokens independently),
    only faster. A `BPETokenizer` encodes the batch in parallel.
    """
    enc = tokenizer or get_tokenizer()
    joined = EOT_TEXT.join(texts) + EOT_TEXT
    n_bytes = len(joined.encode("utf-8")) - len(texts) * len(EOT_TEXT.encode())
    eot = enc.eot_token
    if tokenizer is not None:
        ids = np.array([i for doc in enc.encode_ordinary_batch(texts) for i in [*doc, eot]], np.int64)
    elif any(EOT_TEXT in text for text in texts):  # the literal text must stay ordinary text
        ids = np.fromiter((i for text in texts for i in [*enc.encode_ordinary(text), eot]), np.uint32)
    else:
        ids = enc.encode_to_numpy(joined, allowed_special={EOT_TEXT})
    return to_uint16(ids), len(texts), n_bytes


def to_uint16(ids: np.ndarray) -> np.ndarray:
    """`ids` as uint16, or a SmallmError naming the first id that does not fit."""
    too_big = ids > np.iinfo(np.uint16).max
    if too_big.any():
        raise SmallmError(
            f"token id {int(ids[np.argmax(too_big)])} does not fit uint16 (at most 65535); "
            "this tokenizer needs wider token files"
        )
    return ids.astype(np.uint16)
