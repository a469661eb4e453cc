"""The fast training loss (chunked linear + cross-entropy) equals the straightforward computation."""

import pytest
import torch
from torch.nn import functional as F

from smallm.model import GPT, MLP, CausalSelfAttention, _CausalAttentionDropout, linear_cross_entropy


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_close_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_linear_cross_entropy_equals_f_cross_entropy_with_ignored_targets():
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    targets[::5] = -1
    ref = F.cross_entropy(x @ w.t(), targets, ignore_index=-1)
    ref.backward()
    ref_gx, ref_gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    for chunk_rows in (1, 8, 37, 1000):  # uneven last chunk, one chunk, chunk larger than N
        loss = linear_cross_entropy(x, w, targets, chunk_rows=chunk_rows)
        (2.5 * loss).backward()  # an upstream gradient other than 1 is applied too
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, 2.5 * ref_gx, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w.grad, 2.5 * ref_gw, rtol=1e-5, atol=1e-7)
        x.grad = w.grad = None


def test_linear_cross_entropy_all_ignored_is_nan_like_f_cross_entropy():
    x = torch.randn(4, 8)
    w = torch.randn(10, 8)
    targets = torch.full((4,), -1)
    assert torch.isnan(F.cross_entropy(x @ w.t(), targets, ignore_index=-1))
    assert torch.isnan(linear_cross_entropy(x, w, targets))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_forward_without_logits_matches_full_logits_loss_and_all_gradients(small_config, dropout):
    small_config.dropout = dropout
    model = GPT(small_config)
    idx = torch.randint(0, small_config.vocab_size, (3, small_config.block_size))
    targets = torch.randint(0, small_config.vocab_size, (3, small_config.block_size))
    targets[0, :7] = -1
    targets[2, -1] = -1

    torch.manual_seed(1)  # the same dropout masks for both passes
    logits, loss = model(idx, targets)
    loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    none, fast_loss = model(idx, targets, return_logits=False)
    fast_loss.backward()
    assert none is None
    assert logits.shape == (3, small_config.block_size, small_config.vocab_size)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=1e-6)
    _assert_close_grads(_grads(model), ref)


def test_forward_default_still_returns_full_logits_and_the_plain_loss(small_config):
    model = GPT(small_config).eval()
    idx = torch.randint(0, small_config.vocab_size, (2, 9))
    targets = torch.randint(0, small_config.vocab_size, (2, 9))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 9, small_config.vocab_size)
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    torch.testing.assert_close(loss, expected)


def test_loss_without_logits_under_no_grad_matches(small_config):
    model = GPT(small_config).eval()
    idx = torch.randint(0, small_config.vocab_size, (2, 16))
    targets = torch.randint(0, small_config.vocab_size, (2, 16))
    with torch.no_grad():
        _, loss = model(idx, targets)
        _, fast = model(idx, targets, return_logits=False)
    torch.testing.assert_close(fast, loss, rtol=1e-6, atol=1e-6)


def test_loss_without_logits_under_bf16_autocast_is_close(small_config):
    model = GPT(small_config).eval()
    idx = torch.randint(0, small_config.vocab_size, (2, 16))
    targets = torch.randint(0, small_config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
        _, fast = model(idx, targets, return_logits=False)
    torch.testing.assert_close(fast.float(), loss.float(), rtol=1e-2, atol=1e-2)


def test_mlp_recomputing_gelu_matches_the_plain_mlp_and_its_gradients(small_config):
    small_config.dropout = 0.0
    mlp = MLP(small_config)
    x = torch.randn(3, 5, small_config.n_embd, requires_grad=True)
    out = mlp(x)
    out.square().sum().backward()
    fast = [t.grad.clone() for t in (x, *mlp.parameters())]
    for t in (x, *mlp.parameters()):
        t.grad = None

    plain = mlp.c_proj(F.gelu(mlp.c_fc(x)))
    plain.square().sum().backward()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for got, want in zip(fast, [t.grad for t in (x, *mlp.parameters())], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_mlp_recomputing_gelu_under_bf16_autocast_matches_the_plain_mlp(small_config):
    small_config.dropout = 0.0
    mlp = MLP(small_config)
    x = torch.randn(3, 5, small_config.n_embd, requires_grad=True)
    params = (x, *mlp.parameters())
    grads = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(x) if fast else mlp.c_proj(F.gelu(mlp.c_fc(x)))
        out.float().square().sum().backward()
        grads.append([t.grad.clone() for t in params])
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads[-1])
        for t in params:
            t.grad = None
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mlp_dropout_draws_the_same_mask_and_values_as_nn_dropout(small_config):
    small_config.dropout = 0.25
    mlp = MLP(small_config).train()
    x = torch.randn(2, 7, small_config.n_embd, requires_grad=True)
    torch.manual_seed(3)
    out = mlp(x)
    out.sum().backward()
    fast_grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    plain = F.dropout(mlp.c_proj(F.gelu(mlp.c_fc(x))), 0.25, training=True)
    plain.sum().backward()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-5, atol=1e-7)
    assert (out == 0).any()  # dropout really dropped something


def test_linear_cross_entropy_gradients_under_bf16_autocast_match_the_plain_loss():
    # V > 4096 and not a multiple of it: grad_w is accumulated a vocabulary slice at a time, uneven last one
    N, C, V = 40, 16, 9000
    x = torch.randn(N, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[3] = -1
    grads = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fast:
                loss = linear_cross_entropy(x, w, targets, chunk_rows=16)
            else:
                loss = F.cross_entropy((x @ w.t()).float(), targets, ignore_index=-1)
        loss.backward()
        grads.append((loss.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    (loss, gx, gw), (ref_loss, ref_gx, ref_gw) = grads
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    # bf16 inputs to the gradient matmuls: a few parts in 1000 of the largest entry
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-2 * ref_gx.abs().max().item())
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-2 * ref_gw.abs().max().item())
    assert gw[4096:].abs().sum() > 0 and gw[8192:].abs().sum() > 0  # every slice got its share


def _attention_reference(q, k, v, keep, p):
    """softmax(q k^T / sqrt(hs)) with a causal mask, dropout by the given mask, @ v; plain autograd."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    probs = F.softmax(att, dim=-1, dtype=torch.promote_types(att.dtype, torch.float32))  # fp32 for bf16
    return (probs * keep / (1 - p)).to(v.dtype) @ v


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_attention_with_dropout_matches_the_plain_computation_and_its_gradients(dtype):
    p = 0.3
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_y = torch.randn(2, 3, 9, 8, dtype=dtype)
    torch.manual_seed(5)
    y = _CausalAttentionDropout.apply(q, k, v, p)
    y.backward(grad_y)
    got = [y.detach()] + [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(5)  # the same draw: a (B, nh, T, T) boolean mask, first thing
    keep = torch.empty(2, 3, 9, 9, dtype=torch.bool).bernoulli_(1 - p)
    assert 0 < keep.float().mean() < 1
    y_ref = _attention_reference(q, k, v, keep, p)
    y_ref.backward(grad_y)
    want = [y_ref.detach()] + [t.grad for t in (q, k, v)]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("y", "q", "k", "v"), got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_training_attention_on_cpu_draws_the_same_dropout_as_the_explicit_path(small_config):
    small_config.dropout = 0.2
    attn = CausalSelfAttention(small_config, layer=0).train()
    x = torch.randn(2, 10, small_config.n_embd)
    attn.use_sdpa = False
    torch.manual_seed(11)
    with torch.no_grad():  # the explicit path: scores, softmax, nn.Dropout, @ v
        explicit = attn(x)
    torch.manual_seed(11)
    fast = attn(x)  # with grad: the memory-saving autograd Function
    assert fast.grad_fn is not None
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-6)
