"""Training throughput: smallm's GPT vs transformers.GPT2LMHeadModel of the same shape, in the same run.

Each model trains in its own subprocess (so peak RSS is that model's alone) for a few whole steps: batch
fetch from a uint16 memmap, forward, backward, clip 0.5, AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.1
on matrices), zero_grad. We print the median tokens/s after warm-up, the ratio to the peer, peak memory
(RSS on CPU, max_memory_allocated on CUDA) and the physical floor (6 x params x tokens FLOPs against the
measured matmul rate of the row's dtype on CPU, the card's 16-bit peak on CUDA, i.e. MFU).

Defaults a user would get: `ours` trains in the dtype `smallm train --dtype auto` resolves to (bf16 autocast
on CPUs with AMX-BF16 or AVX512-BF16 and GPUs of compute capability >= 8.0, fp16 + GradScaler on older GPUs,
else fp32) and `hf` in fp32, what GPT2LMHeadModel does unless told. `MODEL:fp32` / `MODEL:bf16` /
`MODEL:fp16` pin a dtype, for like-for-like rows; each row's ratio is against `hf` (fp32).

    flock /tmp/smallm-bench.lock python bench/train_throughput.py              # CPU, seed shape, 32 x 128
    flock /tmp/smallm-bench.lock python bench/train_throughput.py --models ours,hf   # defaults only
    python bench/train_throughput.py --device cuda --batch-size 64 --compile   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_data(path: Path, tokens: int, vocab: int, seed: int = 0) -> None:
    """A flat uint16 token file, like `smallm prepare` writes."""
    rng = np.random.default_rng(seed)
    rng.integers(0, vocab, size=tokens, dtype=np.uint16).tofile(path)


def get_batch(path: Path, step: int, batch_size: int, block_size: int, device: str):
    """nanoGPT-style: random windows from a memmap re-opened per call; y is x shifted by one."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = np.random.default_rng([1337, step]).integers(0, len(data) - block_size - 1, size=batch_size)
    x = torch.from_numpy(np.stack([data[i : i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block_size].astype(np.int64) for i in ix]))
    if device == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def param_groups(model, weight_decay: float):
    """Weight decay on matrices (dim >= 2) only, as smallm's training does; same for both models."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mmap_big_blocks(threshold: int = 1 << 20) -> None:
    """glibc: serve blocks >= 1 MiB by mmap and unmap them when freed, so RSS follows live memory
    (~0.5 GB less peak RSS here) at the price of page faults (~0.5 s a step here); not smallm's default."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


# ---- one model, in its own process ------------------------------------------------------------------------


def worker(args) -> None:
    from smallm import GPTConfig

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cfg = GPTConfig(block_size=args.block_size, dropout=args.dropout)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]  # the parent's
    scaler = torch.amp.GradScaler(device, enabled=args.dtype == "fp16")
    ours = args.model.startswith("ours")
    if args.model == "ours-lowmem" and device == "cpu":
        mmap_big_blocks()
    if args.model == "ours-mmap32" and device == "cpu":
        mmap_big_blocks(32 << 20)  # only the loss buffers and the (V, C) gradient and weight copies
    if ours:
        from smallm.model import GPT

        model = GPT(cfg)
        n_params = model.num_params()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        from smallm.export import hf_config

        hf_cfg = GPT2Config(**hf_config(cfg))  # same shape and dropout as ours
        hf_cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(hf_cfg)
        n_params = sum(p.numel() for p in model.parameters())
    model.to(device).train()

    fused = args.fused if ours else None  # the peer gets torch's default AdamW
    if args.model == "ours-full":  # the model before issue 7: full logits, torch's default AdamW
        fused = None
    opt_kwargs = dict(lr=1e-4, betas=(0.9, 0.95))
    if fused == "fused":
        opt_kwargs["fused"] = True
    elif fused == "foreach":
        opt_kwargs["foreach"] = True
    elif fused == "loop":
        opt_kwargs["foreach"] = False
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), **opt_kwargs)
    step_model = model
    if args.compile:
        step_model = torch.compile(model)

    def loss_of(x, y):
        if ours:
            if args.loss == "full" or args.model == "ours-full":
                _, loss = step_model(x, y)
            else:
                _, loss = step_model(x, y, return_logits=False)
            return loss
        return step_model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    # Lockstep with the parent: one step per "step" line on stdin, its time as a JSON line on stdout, so
    # the two models' steps alternate and load from other processes hits both alike.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"ready": True, "params": n_params}), flush=True)
    step = 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x, y = get_batch(Path(args.data), step, args.batch_size, args.block_size, device)
        with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_of(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(json.dumps({"step_s": dt, "loss": loss.item()}), flush=True)
        step += 1
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak, "threads": torch.get_num_threads()}), flush=True)


# ---- the parent: run both, print the table ----------------------------------------------------------------


def matmul_gflops(device: str) -> float:
    """fp32 matmul rate of the head's shape (4096 x 384) @ (384 x 50257); best of a few."""
    a = torch.randn(4096, 384, device=device)
    b = torch.randn(384, 50257, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 384 * 50257 / best / 1e9


def bf16_matmul_gflops(device: str) -> float:
    """The same matmul under bf16 autocast (AMX on CPUs that have it)."""
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        return matmul_gflops(device)


def resolve_dtype(spec: str, device: str) -> str:
    """`ours` -> what `smallm train --dtype auto` picks here; `hf` -> fp32 (its default); `X:fp32` -> fp32."""
    name, _, dtype = spec.partition(":")
    if dtype:
        return dtype
    if name.startswith("ours"):
        from smallm.device import pick_device, pick_dtype

        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
        return short[pick_dtype("auto", pick_device(device))[0]]
    return "fp32"


def start_worker(args, spec: str, data: Path) -> subprocess.Popen:
    model, dtype = spec.partition(":")[0], resolve_dtype(spec, args.device)
    cmd = [sys.executable, __file__, "--worker", model, "--data", str(data), "--dtype", dtype]
    for flag in ("device", "batch_size", "block_size", "dropout", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--loss", args.loss, "--fused", args.fused] + (["--compile"] if args.compile else [])
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def ask(proc: subprocess.Popen, line: str) -> dict:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    reply = proc.stdout.readline()
    if not reply:
        raise SystemExit(f"worker exited early (code {proc.wait()})")
    return json.loads(reply)


def run_lockstep(args, models: list[str], data: Path) -> dict:
    """Start one process per model, then alternate their steps; medians of the timed ones."""
    procs = {m: start_worker(args, m, data) for m in models}
    results = {}
    for m, proc in procs.items():
        results[m] = {"params": json.loads(proc.stdout.readline())["params"], "times": []}
        results[m]["dtype"] = resolve_dtype(m, args.device)
    for step in range(args.warmup + args.steps):
        for m, proc in procs.items():
            r = ask(proc, "step")
            print(f"  [{m}] step {step}: {r['step_s']:.3f}s loss {r['loss']:.4f}", file=sys.stderr)
            if step >= args.warmup:
                results[m]["times"].append(r["step_s"])
    for m, proc in procs.items():
        results[m].update(ask(proc, "done"))
        proc.wait()
        results[m]["step_s"] = statistics.median(results[m]["times"])
        results[m]["best_s"] = min(results[m]["times"])
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3, help="steps not timed")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=argparse.SUPPRESS)
    p.add_argument("--loss", default="chunked", choices=["chunked", "full"], help="ours: loss path")
    p.add_argument("--fused", default="fused", choices=["fused", "foreach", "loop"], help="ours: AdamW impl")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument(
        "--models",
        default="ours,hf,ours:fp32,hf:bf16",
        help="comma-separated, run in lockstep: ours (smallm train's defaults, dtype auto), hf (the peer, "
        "fp32), ours-lowmem (ours + glibc mmap threshold 1 MiB), ours-mmap32 (32 MiB), ours-full (full "
        "logits, torch's default AdamW); a :fp32, :bf16 or :fp16 suffix pins the autocast dtype",
    )
    workers = ["ours", "ours-lowmem", "ours-mmap32", "ours-full", "hf"]
    p.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.model = args.worker
        worker(args)
        return

    tokens = args.batch_size * args.block_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.bin"
        make_data(data, 2_000_000, 50257)
        results = run_lockstep(args, args.models.split(","), data)

    if args.device == "cuda":
        from smallm.device import peak_flops_of

        name = torch.cuda.get_device_name()
        peak = peak_flops_of(name)
        rate_note = f"{name}, 16-bit peak {peak / 1e12:.0f} TFLOP/s" if peak else f"{name}, peak unknown"
        mem_label = "peak CUDA mem"
        peak_bf16 = peak
    else:
        peak = matmul_gflops("cpu") * 1e9
        peak_bf16 = bf16_matmul_gflops("cpu") * 1e9
        rate_note = (
            f"matmul measured fp32 {peak / 1e9:.0f} / bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, "
            f"{torch.get_num_threads()} threads"
        )
        mem_label = "peak RSS"
    print(
        f"device {args.device} ({rate_note}); batch {args.batch_size} x {args.block_size}; "
        f"ours: loss {args.loss}, AdamW {args.fused}{', compiled' if args.compile else ''}; "
        f"median (and best) of {args.steps} steps after {args.warmup} warm-up"
    )
    base = results.get("hf")
    print(
        f"{'model':<12}{'dtype':>6}{'params':>8}{'s/step':>9}{'tokens/s':>10}{'ratio':>7}"
        f"{'best s':>8}{'ratio':>7}"
        f"{mem_label:>15}{'ratio':>7}"
        f"{'util':>7}"
    )
    for m, r in results.items():
        tps = tokens / r["step_s"]
        flops = 6 * r["params"] * tokens
        util = flops / r["step_s"] / (peak_bf16 if r["dtype"] == "bf16" and args.device == "cpu" else peak)
        ratio = f"{(base['step_s'] / r['step_s']):.2f}x" if base else "-"
        bratio = f"{(base['best_s'] / r['best_s']):.2f}x" if base else "-"
        mratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base else "-"
        print(
            f"{m:<12}{r['dtype']:>6}{r['params'] / 1e6:>7.1f}M{r['step_s']:>9.3f}{tps:>10.0f}{ratio:>7}"
            f"{r['best_s']:>8.3f}{bratio:>7}"
            f"{r['peak_bytes'] / 2**30:>13.2f}GB{mratio:>7}{util:>7.0%}"
        )
    # Like for like: each pinned-dtype row against hf in the same dtype (hf is fp32 by default).
    by_dtype = {r["dtype"]: r for m, r in results.items() if m.partition(":")[0] == "hf"}
    for m, r in results.items():
        peer = by_dtype.get(r["dtype"])
        if m.startswith("ours") and peer is not None:
            print(
                f"{m} vs hf, both {r['dtype']}: {peer['step_s'] / r['step_s']:.2f}x tokens/s, "
                f"{r['peak_bytes'] / peer['peak_bytes']:.2f} of its {mem_label}"
            )
    ours = results.get("ours") or next(iter(results.values()))
    if ours:
        flops = 6 * ours["params"] * tokens
        floors = f"{flops / peak:.2f} s/step fp32"
        if args.device == "cpu":
            floors += f", {flops / peak_bf16:.2f} s/step bf16"
        print(
            f"floor: 6 x {ours['params'] / 1e6:.1f}M params x {tokens} tokens = {flops / 1e12:.2f} TFLOP/step"
            f" -> {floors} at the measured/peak rate "
            f"({'MFU' if args.device == 'cuda' else 'share of the matmul rate of its dtype'}: "
            "the util column)"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
