"""The whole GPT in one file: nanoGPT's architecture and parameter names, plus a KV cache for sampling.

Shapes: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size (C // nh), V vocabulary.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from smallm.config import GPTConfig
from smallm.errors import SmallmError


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no `bias=False` before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None when autocast is off. torch 2.4 has
    no MPS autocast and raises when asked about it: off, there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, never holding all the logits at once.

    The forward pass goes over chunks of rows: logits (rows, V), log-softmax, the loss, and right away the
    gradient of the summed loss w.r.t. the logits (softmax - one_hot), turned into the gradients w.r.t. x
    and weight. Only those two (the size of x and of weight) are kept for backward, which just scales them.
    Same three matmuls as the straightforward way, but (rows, V) buffers reused per chunk instead of several
    (N, V) copies.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int, grad_enabled: bool):
        # x (N, C), weight (V, C), targets (N,) with -1 = ignore
        N, V = x.size(0), weight.size(0)
        # needs_input_grad only says requires_grad, also under no_grad/inference_mode (evaluation), where
        # the two gradient matmuls would be wasted; grad mode is off in here, so the caller passes it.
        want_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        dtype = autocast_dtype(x.device.type) or x.dtype  # matmul dtype: autocast's if on, else x's
        low = dtype != torch.float32  # autocast: matmuls in bf16/fp16, into buffers reused per chunk
        # In bf16 the logits matmul is ~1.5x faster with V padded to a multiple of 64 (50257 -> 50304; no
        # gain in fp32): zero rows in the weight give zero logits there, which are never read.
        Vp = -(-V // 64) * 64 if low else V
        if Vp > V:
            w = torch.empty(Vp, weight.size(1), dtype=dtype, device=x.device)
            w[:V].copy_(weight)
            w[V:].zero_()
        else:
            w = weight.to(dtype)
        valid = targets != -1  # (N,)
        n_valid = valid.sum()
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_grad else None
        grad_w = torch.zeros_like(weight) if want_grad else None
        rows = min(chunk_rows, N)
        buf = torch.empty(rows, V, dtype=torch.float32, device=x.device)  # logits, reused per chunk
        low_buf = torch.empty(rows, Vp, dtype=dtype, device=x.device) if low else None
        # On CPU, grad_w's (V, C) products a vocabulary slice at a time: adding a whole bf16 product to the
        # fp32 grad_w first copies it to fp32 there (77 MB more at the seed shape, and slower); CUDA fuses it.
        step = min(4096, V) if x.device.type == "cpu" else V
        grad_w_buf = torch.empty(step, x.size(1), dtype=dtype, device=x.device) if low and want_grad else None
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            xc, tc, vc = x[s:e].to(dtype), targets[s:e], valid[s:e]
            logits = buf[: e - s]  # (n, V) float32
            if low:
                logits.copy_(torch.mm(xc, w.t(), out=low_buf[: e - s])[:, :V])
            else:
                torch.mm(xc, w.t(), out=logits)
            torch.log_softmax(logits, dim=1, out=logits)  # in place: no (n, V) temporaries
            tgt = tc.clamp(min=0).unsqueeze(1)  # (n, 1); ignored rows are masked below
            loss -= (logits.gather(1, tgt).squeeze(1) * vc).sum()
            if not want_grad:
                continue
            # d(sum of row losses)/d logits = softmax - one_hot(target), zero for ignored rows
            logits.exp_()
            logits.scatter_add_(1, tgt, torch.full(tgt.shape, -1.0, device=x.device))
            keep = vc.unsqueeze(1).to(dtype)  # (n, 1): masking the (n, C) side is cheaper than (n, V)
            g = low_buf[: e - s, :V].copy_(logits) if low else logits
            grad_x[s:e] = (g @ w[:V]) * keep  # (n, C)
            if low:
                xk = xc * keep
                for v0 in range(0, V, step):
                    v1 = min(v0 + step, V)
                    grad_w[v0:v1].add_(torch.mm(g[:, v0:v1].t(), xk, out=grad_w_buf[: v1 - v0]))
            else:
                grad_w.addmm_(g.t(), xc * keep)  # (V, C), accumulated in place
        if want_grad:  # gradients of the mean
            grad_x.div_(n_valid)
            grad_w.div_(n_valid)
        ctx.save_for_backward(grad_x, grad_w)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return grad_x, grad_w, None, None, None  # the usual loss.backward(): no (V, C) copy
        scale = grad_loss.to(grad_w.dtype)
        return grad_x * scale, grad_w * scale, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_rows: int = 256):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1) for x (N, C), weight (V, C), targets (N,),
    computed in chunks of rows so the (N, V) logits never exist; gradients flow to x and weight."""
    return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows, torch.is_grad_enabled())


class KVCache:
    """Keys and values of every layer, preallocated to block_size, for batch_size rows.

    Row b holds its first lengths[b] positions. Rows may hold different numbers of positions (a ragged
    batch, as continuous batching makes): each row then writes at its own position and attends only to
    its own positions, through a mask. When every row is at the same position there is no mask.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        self.block_size = config.block_size
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        # zeros, not empty: keys past a row's length are masked out but still multiplied (by 0), so no nan
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # positions cached per row (CPU)
        # set by begin() for the next forward: where the new positions go (an int, the same for every
        # row, or (row index (B, 1), positions (B, T))), how many keys to read, which keys each query sees
        self.start, self.end, self.mask = 0, 0, None

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start .. stop-1 as a cache of their own, sharing this one's memory and lengths."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]  # a view: advancing it advances this cache's rows
        return view

    def move(self, src: int, dst: int) -> None:
        """Copy row src (its cached positions) into row dst."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def begin(self, T: int, device):
        """Prepare a forward of T new positions in every row; returns their positions, (T,) or (B, T)."""
        first, last = int(self.lengths.min()), int(self.lengths.max())
        if last + T > self.block_size:
            raise SmallmError(
                f"cannot forward {last + T} positions: the model's block_size is {self.block_size}"
            )
        arange = torch.arange(T, device=device)
        self.end = last + T
        if first == last:  # every row at the same position: a slice, and a mask only to see past positions
            self.start = first
            self.mask = None
            if first > 0 and T > 1:
                self.mask = torch.ones(T, first + T, dtype=torch.bool, device=device).tril(diagonal=first)
            return arange + first  # (T,)
        pos = self.lengths.to(device).unsqueeze(1) + arange  # (B, T)
        self.start = (torch.arange(pos.size(0), device=device).unsqueeze(1), pos)  # (B, 1), (B, T)
        # the query at position p sees its row's keys 0 .. p
        keys = torch.arange(self.end, device=device)
        self.mask = (keys <= pos.unsqueeze(2)).unsqueeze(1)  # (B, 1, T, end)
        return pos

    def update(self, layer: int, k, v):
        """Store k, v (B, nh, T, hs) at the positions begin() set; return every row's keys and values up
        to the longest row (B, nh, L, hs)."""
        if isinstance(self.start, int):
            self.k[layer, :, :, self.start : self.start + k.size(2)] = k
            self.v[layer, :, :, self.start : self.start + k.size(2)] = v
        else:
            rows, pos = self.start
            # two index tensors around a slice: the indexed view is (B, T, nh, hs)
            self.k[layer][rows, :, pos] = k.transpose(1, 2)
            self.v[layer][rows, :, pos] = v.transpose(1, 2)
        return self.k[layer, :, :, : self.end], self.v[layer, :, :, : self.end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # SDPA picks flash / memory-efficient kernels where available; the explicit path below computes
        # the same thing step by step, for readers and for backends without SDPA.
        self.use_sdpa = hasattr(F, "scaled_dot_product_attention")

    def forward(self, x, kv_cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, L, hs)
            mask = kv_cache.mask  # (T, L) or (B, 1, T, L): which keys each query sees; None: causal or all
        causal = mask is None and T > 1 and k.size(2) == T
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0 and causal and x.device.type == "cpu" and torch.is_grad_enabled():
            y = _CausalAttentionDropout.apply(q, k, v, dropout_p)  # SDPA's CPU fallback keeps 4x more
        elif self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, L)
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class _CausalAttentionDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(hs), causal) with dropout, @ v, for training on CPU, where SDPA has no fused
    kernel with dropout and falls back to its math path, which keeps the scores, the softmax, the dropout
    mask and the dropped probabilities (B, nh, T, T) for backward. This keeps q, k, v (already alive in
    the qkv projection), a 1-byte mask and the softmax's log-sum-exp, and recomputes the probabilities in
    backward, like flash attention does: ~40 MB less kept per layer at the seed shape, for a small matmul."""

    @staticmethod
    def forward(ctx, q, k, v, p: float):
        keep = torch.empty(q.shape[:-1] + (k.size(-2),), dtype=torch.bool, device=q.device).bernoulli_(1 - p)
        scale = 1.0 / math.sqrt(q.size(-1))
        s = _causal_scores(q, k, scale)  # (B, nh, T, T)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, nh, T, 1)
        probs = s.sub_(lse).exp_()  # softmax, in place
        y = probs.mul_(keep).div_(1 - p).to(v.dtype) @ v  # (B, nh, T, hs)
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.p, ctx.scale = p, scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, keep, lse = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        probs = _causal_scores(q, k, scale).sub_(lse).exp_()  # the forward's softmax, again
        dropped = (probs * keep).div_(1 - p)
        grad_v = dropped.to(grad_y.dtype).transpose(-2, -1) @ grad_y
        del dropped
        grad_probs = _wide(grad_y @ v.transpose(-2, -1).to(grad_y.dtype)).mul_(keep).div_(1 - p)
        # softmax backward: probs * (grad_probs - sum_j probs_j grad_probs_j), then the 1/sqrt(hs) scale
        row = (grad_probs * probs).sum(-1, keepdim=True)
        grad_s = probs.mul_(grad_probs.sub_(row)).mul_(scale).to(q.dtype)
        del probs, grad_probs
        grad_q = grad_s @ k.to(grad_s.dtype)
        grad_k = grad_s.transpose(-2, -1) @ q.to(grad_s.dtype)
        return grad_q, grad_k, grad_v.to(v.dtype), None


def _wide(t):
    """t in float32 if it is in a 16-bit float type (autocast), else as is."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _causal_scores(q, k, scale: float):
    """q k^T * scale in float32 (or wider), -inf where a query would see a later key: (B, nh, T, T)."""
    s = _wide(q @ k.transpose(-2, -1)).mul_(scale)
    T = s.size(-1)
    return s.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(diagonal=1), float("-inf"))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, 4C)
        if torch.is_grad_enabled():
            y = _GeluLinear.apply(h, self.c_proj.weight, self.c_proj.bias)  # same values, less memory
            autocast = autocast_dtype(x.device.type) is not None
            if self.training and self.dropout.p > 0 and x.device.type == "cpu" and not autocast:
                return _BoolMaskDropout.apply(y, self.dropout.p)  # same mask and values as nn.Dropout
            return self.dropout(y)
        return self.dropout(self.c_proj(self.gelu(h)))


class _BoolMaskDropout(torch.autograd.Function):
    """nn.Dropout for training on CPU, keeping a 1-byte mask for backward instead of PyTorch's float one
    there (4 bytes an element); it draws the same mask from the same generator, so results are identical."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
        ctx.save_for_backward(keep)
        ctx.p = p
        return x * keep.to(x.dtype).div_(1 - p)

    @staticmethod
    def backward(ctx, grad_out):
        (keep,) = ctx.saved_tensors
        return grad_out * keep.to(grad_out.dtype).div_(1 - ctx.p), None


class _GeluLinear(torch.autograd.Function):
    """c_proj(gelu(h)) that keeps only h for backward and recomputes gelu(h) there: one (B, T, 4C)
    activation per layer less to hold (150 MB at the seed shape, 75 MB in bf16) for one cheap elementwise
    op. Under autocast the matmuls run in h's dtype (the autocast one); gradients come back in fp32."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        weight = weight.to(grad_out.dtype)  # bf16 under autocast (a no-op in fp32)
        a = F.gelu(h)  # recomputed, (B, T, 4C)
        g = grad_out.reshape(-1, grad_out.size(-1))  # (B*T, C)
        grad_w = g.t() @ a.reshape(-1, a.size(-1)) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_h = torch.ops.aten.gelu_backward(grad_out @ weight, h) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w, grad_b


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied head counted once; `non_embedding` also leaves out both embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, return_logits: bool = True):
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits for every position (B, T, V) and the mean cross-entropy (targets of -1
        are ignored). Without: logits of the last position only (B, 1, V), loss None.
        With a kv_cache, idx continues the cached positions and the cache advances by T.
        With targets and return_logits=False: (None, loss), computed chunk by chunk without ever holding
        the (B*T, V) logits (see linear_cross_entropy); the same loss and gradients, faster, far less memory.
        """
        B, T = idx.size()
        if kv_cache is not None:
            pos = kv_cache.begin(T, idx.device)  # (T,), or (B, T) when the rows are at different positions
        elif T > self.config.block_size:
            raise SmallmError(
                f"cannot forward {T} positions: the model's block_size is {self.config.block_size}"
            )
        else:
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.lengths += T
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): only the next token is needed
        if not return_logits:
            return None, linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_kv_cache: bool = True,
        generator=None,
    ):
        """Continue each prompt by up to max_new_tokens sampled tokens; returns ids with the prompt included.

        idx is a (B, T) tensor, or a list of B prompts (lists or 1-D tensors of ids) of any lengths; the
        result is then a (B, T + new) tensor, or a list of B 1-D tensors. All rows decode as one batch
        (see Decoder), each at its own position. temperature 0 or top_k 1 is greedy. generator is one
        torch.Generator for every row, or a list of one per row: then row b's tokens depend only on its
        prompt and generator[b], not on the rest of the batch. With eos_token_id a row stops after
        producing it (in a tensor result it is padded with it). The model sees at most the last
        block_size tokens. Runs in eval mode (no dropout) and restores the previous mode.
        """
        ragged = not torch.is_tensor(idx)
        prompts = [[int(t) for t in p] for p in idx] if ragged else idx.tolist()
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise SmallmError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(prompts)
        if len(generators) != len(prompts):
            raise SmallmError(f"{len(generators)} generators for {len(prompts)} prompts; pass one per prompt")
        was_training = self.training
        self.eval()
        try:
            if use_kv_cache:
                decoder = Decoder(self, max(1, len(prompts)))
                rows = [
                    decoder.add(p, temperature, top_k, top_p, g)
                    for p, g in zip(prompts, generators, strict=True)
                ]
                for _ in range(max_new_tokens):
                    if not decoder.sequences:
                        break
                    decoder.step()
                    for row in [r for r in decoder.sequences if r.tokens[-1] == eos_token_id]:
                        decoder.remove(row)  # done: its slot is free at once
                outs = [row.tokens for row in rows]
            else:  # the reference: every token recomputed from the whole context, one prompt at a time
                outs = []
                for prompt, g in zip(prompts, generators, strict=True):
                    outs.append(list(prompt))
                    steps = self.generate_tokens(
                        torch.tensor([prompt]),
                        max_new_tokens,
                        temperature,
                        top_k,
                        top_p,
                        use_kv_cache=False,
                        generator=g,
                    )
                    for next_id in steps:
                        outs[-1].append(int(next_id))
                        if outs[-1][-1] == eos_token_id:
                            break
        finally:
            self.train(was_training)
        device = idx.device if not ragged else self.lm_head.weight.device
        if ragged:
            return [torch.tensor(out, dtype=torch.long, device=device) for out in outs]
        width = max((len(out) for out in outs), default=idx.size(1))
        padded = [out + [eos_token_id] * (width - len(out)) for out in outs]  # rows that stopped early
        return torch.tensor(padded, dtype=torch.long, device=device).view(len(outs), width)

    @torch.inference_mode()
    def generate_tokens(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_kv_cache: bool = True,
        generator: torch.Generator | None = None,
    ):
        """Yield the next token ids (B, 1) of idx (B, T), one step at a time, up to max_new_tokens steps.

        The loop behind smallm.generate.stream(); it never stops early (the caller decides about eos) and
        uses the model in whatever mode it is in (call eval() first).
        """
        check_sampling(temperature, top_k, top_p)
        B, T = idx.size()
        if T == 0:
            raise SmallmError("cannot generate from an empty prompt; start from <|endoftext|> (id 50256)")
        if use_kv_cache:
            decoder = Decoder(self, B)
            for prompt in idx.tolist():
                decoder.add(prompt, temperature, top_k, top_p, generator)
            for _ in range(max_new_tokens):
                yield torch.tensor(decoder.step(), dtype=torch.long, device=idx.device).view(B, 1)
            return
        block_size = self.config.block_size
        seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T + new)
        seq[:, :T] = idx
        for n in range(T, T + max_new_tokens):  # n tokens so far; no cache: the last block_size in full
            logits, _ = self(seq[:, max(0, n - block_size) : n])
            next_id = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            seq[:, n : n + 1] = next_id
            yield next_id

    # ---- loading and saving -------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load_state_dict, plus: torch.compile's `_orig_mod.` prefixes are dropped, a missing
        `lm_head.weight` is fine (it is the tied embedding), and a mismatch is one clear SmallmError."""
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
        if "lm_head.weight" not in state_dict and "transformer.wte.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
        own = self.state_dict()
        for name, tensor in state_dict.items():
            if name in own and tuple(own[name].shape) != tuple(tensor.shape):
                raise SmallmError(
                    f"checkpoint does not fit this model: {name} has shape {tuple(tensor.shape)} in the "
                    f"checkpoint but {tuple(own[name].shape)} in the model ({self.config})"
                )
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise SmallmError(
                    f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, directory, extra_config: dict | None = None) -> None:
        """Write `model.safetensors` (the tied head stored once) and `config.json` into directory."""
        from smallm.checkpoint import save_model

        save_model(self, directory, extra_config)

    @classmethod
    def from_pretrained(cls, directory, device="cpu") -> GPT:
        """Read a directory written by save_pretrained."""
        from smallm.checkpoint import load_model

        return load_model(directory, device)

    @classmethod
    def from_hf(cls, directory, device="cpu") -> GPT:
        """Read a GPT-2-shaped Hugging Face checkpoint (config.json + safetensors, exact "gelu" activation),
        e.g. one written by `smallm export`."""
        from smallm.export import load_hf

        return load_hf(directory, device)


class Sequence:
    """One prompt being continued by a Decoder: its tokens so far (prompt included) and how to sample."""

    def __init__(self, prompt, temperature, top_k, top_p, generator):
        self.tokens = list(prompt)
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.greedy = temperature == 0 or top_k == 1
        self.slot = None  # its row in the Decoder's KV cache, while it has one
        self.started = False  # has produced a token


class Decoder:
    """Continuous batching: sequences decoded together, one new token each per step().

    add() a prompt at any time: the next step() prefills it (in one forward with the other prompts added
    since the last step that have the same length) and from then on it decodes in one batch with every
    other sequence, each in its own row of a shared KVCache at its own position. remove() drops a
    sequence at once. Each sequence samples with its own settings and generator, so what it produces does
    not depend on the rest of the batch (up to float rounding in batched matmuls; greedy is argmax).
    Past block_size a sequence's context is its last block_size tokens, run in full at every step
    (positions are learned, so they cannot slide), as at batch 1.
    """

    def __init__(self, model: GPT, max_batch: int):
        param = model.lm_head.weight
        self.model = model
        self.max_batch = max_batch
        self.cache = KVCache(model.config, max_batch, param.device, param.dtype)
        self.slots: list[Sequence] = []  # slots[i] owns cache row i; these decode one position per step
        self.sequences: list[Sequence] = []  # every sequence, in the order added

    def add(self, prompt, temperature=1.0, top_k=None, top_p=None, generator=None) -> Sequence:
        """A new sequence continuing prompt (token ids); it gets its first token at the next step()."""
        check_sampling(temperature, top_k, top_p)
        if len(prompt) == 0:
            raise SmallmError("cannot generate from an empty prompt; start from <|endoftext|> (id 50256)")
        if len(self.sequences) >= self.max_batch:
            raise SmallmError(f"the decoder is full ({self.max_batch} sequences); remove one first")
        seq = Sequence(prompt, temperature, top_k, top_p, generator)
        self.sequences.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop seq (finished, or its client is gone), freeing its cache row."""
        self._free_slot(seq)
        self.sequences.remove(seq)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Give every sequence one new token (appended to its tokens); returns them, in self.sequences'
        order."""
        block_size = self.model.config.block_size
        device = self.cache.k.device
        decoding = list(self.slots)
        new = [s for s in self.sequences if not s.started and len(s.tokens) < block_size]
        full = [s for s in self.sequences if s.slot is None and s not in new]
        if decoding:  # one new position for every cached sequence, as one batch
            last = torch.tensor([[s.tokens[-1]] for s in decoding], device=device)  # (n, 1)
            logits, _ = self.model(last, kv_cache=self.cache.rows(0, len(decoding)))
            self._sample(decoding, logits)
        while new:  # prefill: the next run of new prompts of one length, into fresh cache rows
            run = [s for s in new if len(s.tokens) == len(new[0].tokens)]
            new = [s for s in new if len(s.tokens) != len(run[0].tokens)]
            first = len(self.slots)
            for s in run:
                s.slot = len(self.slots)
                self.slots.append(s)
                self.cache.lengths[s.slot] = 0
            prompts = torch.tensor([s.tokens for s in run], device=device)  # (n, T)
            logits, _ = self.model(prompts, kv_cache=self.cache.rows(first, first + len(run)))
            self._sample(run, logits)
        if full:  # the context is full: its last block_size tokens, run in full without a cache
            contexts = torch.tensor([s.tokens[-block_size:] for s in full], device=device)  # (n, block_size)
            logits, _ = self.model(contexts)
            self._sample(full, logits)
        for seq in decoding:
            if int(self.cache.lengths[seq.slot]) >= block_size:
                self._free_slot(seq)  # its context is full: from the next step on, run in full
        return [s.tokens[-1] for s in self.sequences]

    def _sample(self, seqs: list[Sequence], logits) -> None:
        """Append to each of seqs its next token, from its row of logits (n, 1, V)."""
        logits = logits[:, -1, :]  # (n, V)
        if all(s.greedy for s in seqs):
            ids = logits.argmax(dim=-1).tolist()
        else:
            rows = [
                sample_next_token(logits[i : i + 1], s.temperature, s.top_k, s.top_p, s.generator)
                for i, s in enumerate(seqs)
            ]
            ids = torch.cat(rows).flatten().tolist()
        for seq, token in zip(seqs, ids, strict=True):
            seq.tokens.append(token)
            seq.started = True

    def _free_slot(self, seq: Sequence) -> None:
        """Give up seq's cache row; the sequence in the last row moves into it, so rows stay 0 .. n-1."""
        if seq.slot is None:
            return
        last = self.slots.pop()
        if last is not seq:
            self.cache.move(last.slot, seq.slot)
            last.slot = seq.slot
            self.slots[seq.slot] = last
        seq.slot = None


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row (ties at the k-th value kept too); the rest become -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = F.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    remove_sorted = before >= p  # the most likely token always stays (before == 0)
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def check_sampling(temperature=1.0, top_k=None, top_p=None) -> None:
    """Raise SmallmError for sampling settings that mean nothing (negative temperature, top_k 0, ...)."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:  # `not >=` also catches nan
        raise SmallmError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SmallmError(f"top_k must be an integer >= 1 (1 is greedy) or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise SmallmError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B, 1): greedy for temperature 0 or top_k 1, else sampled from
    softmax(logits / temperature) restricted to the top_k tokens and then to the top_p nucleus."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
