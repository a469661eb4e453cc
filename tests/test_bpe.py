"""A byte-level BPE trained on your own text: `smallm prepare --tokenizer bpe:N`, and a model trained on it
generating, evaluating, serving and exporting to transformers with its own tokenizer."""

import json

import numpy as np
import pytest
import test_train
import torch
from fastapi.testclient import TestClient

from smallm.cli import main
from smallm.data import prepare
from smallm.errors import SmallmError
from smallm.export import export_hf
from smallm.generate import generate_text, load_for_inference
from smallm.serve import create_app
from smallm.tokenizer import BPETokenizer, get_tokenizer, tokenizer_id, train_bpe
from smallm.train import build_config, train

transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extras")

UNICODE = "Café déjà vu — naïve 🐶 dog, 東京, résumé.\t  Tabs  and\r\n spaces \x00 \u200b end"
SMALL = {**test_train.SMALL, "dropout": 0.0, "max_iters": 6, "eval_interval": 3}


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """Template stories plus one unicode story, prepared with a 300-token BPE trained on them."""
    root = tmp_path_factory.mktemp("bpe")
    test_train.write_stories(root / "stories.txt")
    with open(root / "stories.txt", "a") as f:
        f.write(UNICODE + "\n<|endoftext|>\n")
    meta = prepare(root / "data", text_files=[root / "stories.txt"], val_fraction=0.1, tokenizer="bpe:300")
    return root, meta


@pytest.fixture(scope="module")
def run(bpe_data):
    root, _ = bpe_data
    train(build_config("seed", overrides=SMALL), root / "data", root / "run", progress=False)
    return root / "run"


def test_trained_tokenizer_round_trips_unicode_and_keeps_endoftext_special(tmp_path):
    tok = train_bpe(
        ["Once upon a time there was a cat.", "The cat was happy."] * 50, 280, tmp_path / "t.json"
    )
    assert tok.n_vocab == 280 and tok.eot_token == 0
    for text in (UNICODE, "Once upon a time, 日本語 🎈", ""):
        ids = tok.encode_ordinary(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == text.encode()
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [*tok.encode("a"), 0, *tok.encode("b")]
    literal = tok.encode_ordinary("a<|endoftext|>b")
    assert 0 not in literal and tok.decode(literal) == "a<|endoftext|>b"
    assert len(tok.encode("Once upon a time")) < len(b"Once upon a time")  # it learned merges


def test_prepare_writes_ids_that_decode_to_the_input(bpe_data):
    root, meta = bpe_data
    data = root / "data"
    assert meta["tokenizer"] == "tokenizer.json" and meta["vocab_size"] == 300 and meta["eot_token"] == 0
    assert meta["tokenizer_seconds"] > 0
    tok = get_tokenizer(data)
    assert isinstance(tok, BPETokenizer)
    stories = (root / "stories.txt").read_bytes().decode().split("\n<|endoftext|>\n")[:-1]  # keeps \r\n
    ids = np.concatenate([np.fromfile(data / f"{s}.bin", dtype=np.uint16) for s in ("train", "validation")])
    decoded = [doc for doc in tok.decode(ids.tolist()).split("<|endoftext|>") if doc]
    assert sorted(decoded) == sorted(s.strip() for s in stories)  # validation documents are drawn from all
    assert UNICODE.strip() in decoded
    assert int(ids.max()) < 300


@pytest.mark.parametrize("where", ["data/tokenizer.json", "data", "run"])
def test_prepare_with_an_existing_tokenizer_gives_the_same_ids(where, bpe_data, run, tmp_path):
    root, _ = bpe_data
    again = prepare(tmp_path / "again", text_files=[root / "stories.txt"], val_fraction=0.1,
                    tokenizer=str(root / where))  # fmt: skip
    assert again["tokenizer_seconds"] is None
    assert tokenizer_id(tmp_path / "again") == tokenizer_id(root / "data")
    for split in ("train", "validation"):
        ours = np.fromfile(tmp_path / "again" / f"{split}.bin", dtype=np.uint16)
        assert np.array_equal(ours, np.fromfile(root / "data" / f"{split}.bin", dtype=np.uint16))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bpe:70000", "at most 65,536 so that ids fit the uint16 token files"),
        ("bpe:many", "the size after bpe: must be a number"),
        ("no/such/tokenizer.json", "neither gpt2, bpe:N (train one) nor an existing tokenizer.json"),
    ],
)
def test_bad_tokenizer_is_one_line(spec, message, bpe_data, tmp_path, capsys):
    root, _ = bpe_data
    args = ["prepare", "--text-files", str(root / "stories.txt"), "--out", str(tmp_path / "d"), "--tokenizer"]
    assert main([*args, spec]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_every_checkpoint_carries_the_tokenizer(bpe_data, run):
    root, _ = bpe_data
    for checkpoint in (run / "best", run / "last"):
        assert tokenizer_id(checkpoint) == tokenizer_id(root / "data")
        assert json.loads((checkpoint / "config.json").read_text())["vocab_size"] == 300


def test_generate_decodes_with_the_checkpoints_tokenizer(run, capsys):
    model, checkpoint = load_for_inference(run, "cpu")
    tok = get_tokenizer(checkpoint)
    prompt = "Once upon a time there was"
    text = generate_text(model, prompt, max_new_tokens=12, temperature=0, tokenizer=tok, stop_at_eot=False)[0]
    with torch.no_grad():
        ids = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=12, temperature=0)
    assert text == tok.decode(ids[0].tolist())
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--no-stop-at-eot", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out == text + "\n"


def test_eval_reads_bpe_data_and_refuses_data_of_another_tokenizer(bpe_data, run, tmp_path, capsys):
    root, meta = bpe_data
    assert main(["eval", str(run), "--data", str(root / "data"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == meta["splits"]["validation"]["tokens"] - 1 and result["bits_per_byte"] > 0
    prepare(tmp_path / "gpt2", text_files=[root / "stories.txt"], val_fraction=0.1, workers=1)
    capsys.readouterr()  # prepare's progress bar
    assert main(["eval", str(run), "--data", str(tmp_path / "gpt2"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "is tokenized with gpt2 but" in err and len(err.strip().splitlines()) == 1


def test_serve_completes_with_the_checkpoints_tokenizer(run):
    model, checkpoint = load_for_inference(run, "cpu")
    tok = get_tokenizer(checkpoint)
    client = TestClient(create_app(model, tokenizer=tok))
    prompt = "Once upon a time there was"
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    with torch.no_grad():
        ids = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=10, temperature=0)[0].tolist()
    new = ids[len(tok.encode(prompt)) :]
    expected = tok.decode(new[: new.index(0)] if 0 in new else new)  # 0 is <|endoftext|>: it stops there
    assert answer["choices"][0]["text"] == expected
    bad = client.post("/v1/completions", json={"prompt": [5, 300], "max_tokens": 1})
    assert bad.status_code == 400 and "below 300" in bad.json()["error"]["message"]


def test_export_loads_in_transformers_with_identical_tokens_and_logits(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_hf(run, tmp_path / "hf")
    model, checkpoint = load_for_inference(run, "cpu")
    ours = get_tokenizer(checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "Once upon a time there was a little cat named Tim. " + UNICODE + "<|endoftext|>"
    ids = ours.encode(text, allowed_special="all")
    assert theirs(text).input_ids == ids and theirs.decode(ids) == text
    assert theirs.eos_token_id == ours.eot_token == hf.config.eos_token_id
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        logits, _ = model(x, targets=x)
        assert (logits - hf(x).logits).abs().max().item() < 1e-4
        prompt = torch.tensor([ours.encode("Once upon a time")])
        mine = model.generate(prompt, max_new_tokens=12, temperature=0)
        hf_ids = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert mine.tolist() == hf_ids.tolist()
    assert tokenizer_id(tmp_path / "hf") == tokenizer_id(checkpoint)  # smallm reads it back as the same


def test_a_tokenizer_file_that_is_not_byte_level_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SmallmError, match="not a byte-level BPE"):
        BPETokenizer(tmp_path / "tokenizer.json")
