import hashlib
import inspect
import json

import pytest
import tiktoken_ext.openai_public as openai_public

from smallm import SmallmError, get_tokenizer
from smallm import tokenizer as tok

PARAGRAPH = (
    'Once upon a time, Lily found 3 shiny "stars" in the garden.\n\n'
    "She said: \"Mom, look! It's 12:30 and they're glowing...\"\n"
    "Café déjà vu — naïve 🐶 dog, 東京, résumé.\t  Tabs and  spaces.  "
)


def test_hello_world_is_gpt2():
    assert get_tokenizer().encode("Hello world") == [15496, 995]


def test_vocabulary_and_endoftext():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_paragraph_ids_match_reference_and_round_trip():
    enc = get_tokenizer()
    ids = enc.encode_ordinary(PARAGRAPH)
    # Reference ids of GPT-2's tokenizer for the start of the paragraph (checked against transformers).
    assert ids[:8] == [7454, 2402, 257, 640, 11, 20037, 1043, 513]
    assert enc.decode(ids) == PARAGRAPH


def test_paragraph_ids_match_transformers_gpt2_tokenizer():
    # transformers' GPT-2 tokenizer (the Rust `tokenizers` BPE) over the same two files is an
    # independent implementation of GPT-2's byte-level BPE.
    from transformers import GPT2Tokenizer

    vocab_bpe, encoder_json = tok.bpe_files()
    merges = [tuple(line.split()) for line in vocab_bpe.read_text(encoding="utf-8").split("\n")[1:] if line]
    hf = GPT2Tokenizer(vocab=json.loads(encoder_json.read_text(encoding="utf-8")), merges=merges)
    assert get_tokenizer().encode_ordinary(PARAGRAPH) == hf.encode(PARAGRAPH)


def test_hashes_are_the_ones_tiktoken_uses_for_gpt2():
    source = inspect.getsource(openai_public.gpt2)
    assert tok.VOCAB_BPE_SHA256 in source
    assert tok.ENCODER_JSON_SHA256 in source
    vocab_bpe, encoder_json = tok.bpe_files()
    assert hashlib.sha256(vocab_bpe.read_bytes()).hexdigest() == tok.VOCAB_BPE_SHA256
    assert hashlib.sha256(encoder_json.read_bytes()).hexdigest() == tok.ENCODER_JSON_SHA256


def test_hash_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tok, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(SmallmError, match="sha256"):
        tok.bpe_files()
