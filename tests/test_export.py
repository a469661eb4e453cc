"""`smallm export --format hf`: transformers loads the result offline as GPT-2 and computes the same thing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from smallm import GPTConfig, get_tokenizer
from smallm.cli import main
from smallm.errors import SmallmError
from smallm.export import export_hf
from smallm.model import GPT

transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extras")

PARAGRAPH = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park!\n\n"
    "One day, she saw a big, red ball -- \"Can I play?\" she asked.  Her mom said: 'Yes, 123 times.'\n"
    "Café, naïve, 日本語, emoji 🎈 and <|endoftext|> The End."
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random model saved as RUN/best with a metrics.jsonl, exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(1234)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)).eval()
    model.save_pretrained(root / "run" / "best")
    rows = [{"step": 100, "val_loss": 3.5}, {"step": 200, "val_loss": 3.25}, {"step": 300, "val_loss": 3.4}]
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(root / "hf")]) == 0
    return model, root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    _, directory = exported
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_export_writes_gpt2_config_with_exact_gelu(exported):
    model, directory = exported
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu"
    assert config["n_positions"] == model.config.block_size == 32
    assert (config["bos_token_id"], config["eos_token_id"]) == (50256, 50256)
    weights = load_file(str(directory / "model.safetensors"))
    # Conv1D stores (in, out): c_fc maps 64 -> 256
    assert tuple(weights["transformer.h.0.mlp.c_fc.weight"].shape) == (64, 256)
    assert not list(directory.parent.glob(".hf.tmp-*")), "the temporary export directory was left behind"


def test_exported_model_loads_offline_as_gpt2(hf_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()  # tied


def test_exported_logits_equal_smallm(exported, hf_model):
    model, _ = exported
    idx = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx, targets=idx)  # (B, T, V)
        theirs = hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_exported_greedy_continuation_is_identical(exported, hf_model):
    model, _ = exported
    prompt = torch.tensor([get_tokenizer().encode("Once upon a time, there was a")])
    with torch.no_grad():
        ours = model.generate(prompt, max_new_tokens=16, temperature=0)
        theirs = hf_model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert ours.tolist() == theirs.tolist()


def test_exported_tokenizer_ids_equal_smallm(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, directory = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ours = get_tokenizer().encode(PARAGRAPH, allowed_special="all")
    assert tokenizer(PARAGRAPH).input_ids == ours
    assert tokenizer.decode(ours) == PARAGRAPH
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256


def test_model_card_names_shape_and_best_validation_loss(exported):
    _, directory = exported
    card = (directory / "README.md").read_text()
    assert "2 layers, 2 heads, 64 channels, context 32 tokens" in card
    assert "3.2500" in card  # the best val_loss of metrics.jsonl, the truncated last line ignored
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_from_hf_reads_the_export_back(exported):
    model, directory = exported
    again = GPT.from_hf(directory).eval()
    assert again.config.block_size == 32 and again.config.n_layer == 2
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(idx, targets=idx)[0], again(idx, targets=idx)[0])


def test_generate_accepts_an_exported_directory(exported, capsys):
    # `smallm generate hf-model` (and eval, serve) read a Hugging Face directory through GPT.from_hf
    model, directory = exported
    assert main(["generate", str(directory), "--prompt", "Once upon a time", "--temperature", "0",
                 "--max-new-tokens", "8", "--no-stop-at-eot"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    from smallm import get_tokenizer

    enc = get_tokenizer()
    prompt = enc.encode("Once upon a time")
    expected = model.generate(torch.tensor([prompt]), 8, temperature=0)[0].tolist()
    assert out.rstrip("\n") == enc.decode(expected)


def test_from_hf_refuses_tanh_gelu(exported, tmp_path):
    _, directory = exported
    for name in ("model.safetensors", "vocab.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_new"}))
    with pytest.raises(SmallmError, match="gelu_new"):
        GPT.from_hf(tmp_path)


def test_from_hf_refuses_pickle_weights(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SmallmError, match="safetensors only"):
        GPT.from_hf(tmp_path)


def test_from_hf_accepts_original_gpt2_names(exported, tmp_path):
    """The original GPT-2 files name GPT2Model's tensors without the `transformer.` prefix."""
    model, directory = exported
    weights = load_file(str(directory / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in weights.items()}
    save_file(bare, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    again = GPT.from_hf(tmp_path)
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)


def test_export_refuses_to_replace_an_unrelated_directory(exported, tmp_path, capsys):
    _, directory = exported
    (tmp_path / "notes.txt").write_text("keep me")
    code = main(["export", str(directory.parent / "run"), "--format", "hf", "--out", str(tmp_path)])
    assert code == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_of_a_missing_run_is_one_line_error(tmp_path, capsys):
    code = main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert not (tmp_path / "hf").exists()


def test_export_of_bias_free_model_matches(tmp_path):
    torch.manual_seed(5)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0, bias=False)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert (model(idx, targets=idx)[0] - hf_model(idx).logits).abs().max().item() < 1e-4
