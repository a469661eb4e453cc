"""torch.optim.Muon with its Newton-Schulz iterations in a dtype we choose.

torch's Muon orthogonalizes every update in bfloat16, hard-coded (`_zeropower_via_newtonschulz` casts to
bf16, and the class takes no dtype). That is the fast choice where bf16 matmuls are native (GPUs from
Ampere, CPUs with AMX-BF16 or AVX512-BF16), and a trap elsewhere: on a 2-core AMD EPYC with AVX2 only, a
bf16 matmul of the MLP's shape ran 18x slower than in fp32, and Muon's optimizer step at `fast`'s 4 x 128
took 33.4 s against 0.75 s in fp32 (bench/RESULTS.md, "Muon on a CPU without bf16").

torch offers no hook for it, so this subclass keeps torch's Muon (arguments, checks, param groups, state
and state_dict: checkpoints move between the two) and redoes only `step`, the same arithmetic in
`ns_dtype`. tests/test_recipe.py checks that in bf16 it matches torch.optim.Muon bit for bit. In fp32 it
also reorders the iterations around the Gram matrix, where that saves work: on a CPU through its
eigendecomposition (`eigh_newton_schulz`), elsewhere on the Gram matrix itself where the update is
rectangular (`gram_newton_schulz`), the same update to rounding either way.
"""

from __future__ import annotations

import math

import torch


def newton_schulz(grad: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype, form=None):
    """Keller Jordan's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix (U V^T of
    grad's SVD, singular values landing in ~[0.5, 1.5]), as torch runs it, in `dtype`.

    form: "standard" (torch's own arithmetic), "gram" (`gram_newton_schulz`) or "eigh"
    (`eigh_newton_schulz`), the same update to rounding; None picks where it pays (`pick_form`)."""
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)  # a copy even in grad's own dtype: the iterations work in place
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller square
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    form = form or pick_form(x)
    if form == "eigh":
        x = eigh_newton_schulz(x, coefficients, steps)
    elif form == "gram":
        x = gram_newton_schulz(x, coefficients, steps)
    else:
        for _ in range(steps):
            g = x @ x.T
            x = torch.addmm(x, torch.addmm(g, g, g, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def pick_form(x: torch.Tensor) -> str:
    """The cheapest form for a wide matrix: in bf16/fp16 torch's own (the reordered ones square the
    condition number); in fp32 or finer on a CPU the eigendecomposition (LAPACK's eigh of the m x m Gram
    matrix costs less than the iterations' m x m products); elsewhere (GPUs, MPS: no fast eigh) the Gram
    form on matrices at least twice as wide as tall."""
    if x.dtype.itemsize < 4:
        return "standard"
    if x.device.type == "cpu":
        return "eigh"
    return "gram" if x.size(1) >= 2 * x.size(0) else "standard"


def eigh_newton_schulz(x: torch.Tensor, coefficients, steps: int) -> torch.Tensor:
    """The same iteration through the eigendecomposition of the Gram matrix G = X X^T = V diag(l) V^T.

    The iteration's result is Q X with Q a polynomial in G (see `gram_newton_schulz`), so Q = V diag(h(l))
    V^T, where h runs the iteration on each eigenvalue alone: h *= p(l), l <- l p(l)^2. Work: one m x m x n
    product for G, torch.linalg.eigh of m x m, one m^3 product for Q and one m x m x n for Q X, against the
    Gram form's 17 m^3 products between its two m x m x n ones at 5 steps. In fp32 the eigenvectors of
    nearby small eigenvalues mix, which costs some accuracy: within 4-6e-4 (relative) of an fp64 run on this
    model's shapes with singular values from 1 to 1e-9, 2.5e-3 on a 32 x 96 matrix with 1 to 1e-6 (the Gram
    form 1-4e-4, torch's bf16 iteration ~1e-1). LAPACK's eigh is fast on a CPU and slow or missing on GPUs
    and MPS, so only CPUs use it.
    """
    a, b, c = coefficients
    g = x @ x.T
    if not torch.isfinite(g).all():  # NaN out, as the iteration would, rather than LAPACK's error
        return torch.full_like(x, float("nan"))
    eigenvalues, v = torch.linalg.eigh(g)
    h = torch.ones_like(eigenvalues)
    for _ in range(steps):
        p = a + eigenvalues * (b + c * eigenvalues)
        h.mul_(p)
        eigenvalues = eigenvalues * p.square()
    return ((v * h) @ v.T) @ x


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

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, ns_form: str | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype, self.ns_form = ns_dtype, ns_form  # newton_schulz's form (None: where it pays)

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
                                       self.ns_dtype, self.ns_form)  # fmt: skip
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], p.shape))
        return loss
