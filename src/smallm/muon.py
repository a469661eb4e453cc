"""torch.optim.Muon with its Newton-Schulz iterations in a dtype we choose.

torch's Muon orthogonalizes every update in bfloat16, hard-coded (`_zeropower_via_newtonschulz` casts to
bf16, and the class takes no dtype). That is the fast choice where bf16 matmuls are native (GPUs from
Ampere, CPUs with AMX-BF16 or AVX512-BF16), and a trap elsewhere: on a 2-core AMD EPYC with AVX2 only, a
bf16 matmul of the MLP's shape ran 18x slower than in fp32, and Muon's optimizer step at `fast`'s 4 x 128
took 33.4 s against 0.75 s in fp32 (bench/RESULTS.md, "Muon on a CPU without bf16").

torch offers no hook for it, so this subclass keeps torch's Muon (arguments, checks, param groups, state
and state_dict: checkpoints move between the two) and redoes only `step`, the same arithmetic in
`ns_dtype`. tests/test_recipe.py checks that in bf16 it matches torch.optim.Muon bit for bit. In fp32 it
also reorders the iterations around the Gram matrix where that saves FLOPs (`gram_newton_schulz`): the
same update to rounding, 0.6x the work on this model's rectangular matrices.
"""

from __future__ import annotations

import math

import torch


def newton_schulz(grad: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype, gram=None):
    """Keller Jordan's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix (U V^T of
    grad's SVD, singular values landing in ~[0.5, 1.5]), as torch runs it, in `dtype`.

    gram: iterate on the Gram matrix (`gram_newton_schulz`); None: where it pays, in fp32 or finer on
    matrices at least twice as wide as tall (bf16 keeps torch's own arithmetic, bit for bit)."""
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)  # a copy even in grad's own dtype: the iterations work in place
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller square
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    if gram is None:
        gram = dtype.itemsize >= 4 and x.size(1) >= 2 * x.size(0)
    if gram:
        x = gram_newton_schulz(x, coefficients, steps)
    else:
        for _ in range(steps):
            g = x @ x.T
            x = torch.addmm(x, torch.addmm(g, g, g, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def gram_newton_schulz(x: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    """The same iteration on a wide m x n matrix (m < n), with every step in m x m.

    Each step is X <- p(G) X with G = X X^T and p(G) = a + b G + c G^2. Every p(G) is a polynomial in the
    first Gram matrix G0, so they commute, X_k = Q_k X_0 with Q_k = p(G_{k-1}) ... p(G_0), and the next Gram
    matrix is G_{k+1} = p(G_k) G_k p(G_k). So one m x m x n product makes G0, one more applies Q at the end,
    and the steps between are m x m products: 4 m^2 n + 2 m^3 (4 steps - 3) FLOPs against torch's
    steps (4 m^2 n + 2 m^3), 0.66x at 5 steps for the attention's 384 x 1152 and 0.56x for the MLP's
    384 x 1536 (`bench/optimizer_step.py --ns-forms auto,standard` times the step). The Gram matrix squares
    the condition number, so this wants fp32 or finer: there it lands within ~1e-4 of an fp64 run (torch's
    bf16 iteration: ~1e-2), and in bf16 it drifts twice as far as torch's own (the Dao AI Lab's
    "Gram Newton-Schulz", 2026, restarts it for half precision; we only run it in fp32). torch has no such
    routine, hence our own.
    """
    a, b, c = coefficients
    g, q = x @ x.T, None
    for step in range(steps):
        p = torch.addmm(g, g, g, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
        if step < steps - 1:  # the last step needs no next Gram matrix
            g = p @ g @ p
    return x if q is None else q @ x


def lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's per-matrix rate factor: "match_rms_adamw" 0.2 sqrt(max(A, B)) (an update of AdamW's RMS);
    None or "original" sqrt(max(1, A / B))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iterations run in `ns_dtype` (torch: always bfloat16)."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, gram: bool | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype, self.gram = ns_dtype, gram  # gram: newton_schulz's (None: where it pays)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype, self.gram)  # fmt: skip
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], p.shape))
        return loss
