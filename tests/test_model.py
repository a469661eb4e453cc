import math

import pytest
import torch

from smallm import GPT, GPTConfig, SmallmError
from smallm.errors import WriteFailed


def test_default_config_is_the_seed():
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50257, 128, 6, 6, 384)
    assert c.dropout == 0.1 and c.bias is True


def test_seed_shape_has_30_0m_parameters_counting_the_tied_head_once():
    model = GPT(GPTConfig())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.num_params() - 30.0e6) < 0.1e6
    assert model.num_params() == 29_995_392


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=100, n_head=6), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=-1), "block_size"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_config_is_a_clear_error(kwargs, message):
    with pytest.raises(SmallmError, match=message):
        GPTConfig(**kwargs)


def test_logits_equal_transformers_gpt2(small_config):
    # transformers' GPT2LMHeadModel with the same weights (Conv1D ones transposed) is the external oracle
    from smallm.export import to_transformers

    model = GPT(small_config).eval()
    hf = to_transformers(model)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.activation_function == "gelu"
    idx = torch.randint(0, small_config.vocab_size, (3, small_config.block_size))
    with torch.no_grad():
        ours, _ = model(idx, idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sdpa_and_explicit_attention_agree(small_config):
    model = GPT(small_config).eval()
    idx = torch.randint(0, small_config.vocab_size, (2, 20))
    with torch.no_grad():
        fast, fast_loss = model(idx, idx)
        for block in model.transformer.h:
            block.attn.use_sdpa = False
        slow, slow_loss = model(idx, idx)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert abs(fast_loss.item() - slow_loss.item()) < 1e-5


def test_inference_returns_only_the_last_position(small_config):
    model = GPT(small_config).eval()
    idx = torch.randint(0, small_config.vocab_size, (2, 10))
    with torch.no_grad():
        last, loss = model(idx)
        full, _ = model(idx, idx)
    assert loss is None and last.shape == (2, 1, small_config.vocab_size)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_loss_at_init_is_about_ln_vocab():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, dropout=0.0)).eval()
    idx = torch.randint(0, 50257, (4, 64))
    targets = torch.randint(0, 50257, (4, 64))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(50257)) < 0.1  # 10.82


def test_longer_than_block_size_is_a_clear_error(small_config):
    model = GPT(small_config)
    with pytest.raises(SmallmError, match="block_size"):
        model(torch.zeros(1, small_config.block_size + 1, dtype=torch.long))


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, small_config):
    model = GPT(small_config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == small_config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, small_config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], loaded(idx, idx)[0])


def test_seed_style_state_dict_loads(tmp_path, small_config):
    # The seed notebook: torch.save(model.state_dict()), then model.load_state_dict(torch.load(...)).
    model = GPT(small_config)
    torch.save(model.state_dict(), tmp_path / "best_model_params.pt")
    fresh = GPT(small_config)
    fresh.load_state_dict(torch.load(tmp_path / "best_model_params.pt", weights_only=True))
    assert torch.equal(fresh.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
    compiled_names = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # torch.compile's prefix
    GPT(small_config).load_state_dict(compiled_names)


def test_checkpoint_of_another_shape_names_the_mismatch(tmp_path, small_config):
    GPT(small_config).save_pretrained(tmp_path / "ckpt")
    other = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    from safetensors.torch import load_file

    mismatch = r"transformer\.\S+ has shape \(192,\) in the checkpoint but \(96,\)"
    with pytest.raises(SmallmError, match=mismatch):
        other.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, small_config):
    GPT(small_config).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SmallmError, match="corrupt"):
        GPT.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(SmallmError, match="no checkpoint"):
        GPT.from_pretrained(tmp_path / "nowhere")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, small_config, monkeypatch):
    import os

    import smallm.checkpoint as checkpoint

    GPT(small_config).save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):  # renaming the finished new directory into place fails
        if ".tmp-" in str(src) and os.path.isdir(src):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(WriteFailed, match=r"cannot write .*ckpt \(disk full; .* free there\)"):  # one line
        GPT(small_config).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old copies left
