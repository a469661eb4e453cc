"""Batch-1 greedy decoding in fp32 vs bf16 weights: tokens/s against the memory-bandwidth floor, and how
often bf16 changes the greedy text of a trained model.

Speed: the seed shape (or --checkpoint's) decodes --new-tokens greedy tokens from an 8-token prompt with the
KV cache, the dtypes alternating run by run; median of --runs. Each token reads every weight once (the tied
head, 50257 x 384, is most of it), so bytes per token / memory bandwidth is a floor on the time per token;
the bandwidth is measured here as a large tensor copy (bytes read + written per second).

Agreement (--checkpoint and --data): on validation windows, how often bf16's top-1 next token equals fp32's
given the same context (teacher forcing), and over --prompts prompts, how many greedy continuations are
identical and where the first differing token is.

    flock /tmp/smallm-bench.lock python bench/decode_precision.py                      # speed, seed shape
    python bench/decode_precision.py --checkpoint runs/latest --data data/tinystories  # + agreement
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from smallm import GPT, GPTConfig
from smallm.data import open_split
from smallm.generate import load_for_inference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (best of `repeats`)."""
    src = torch.ones(mib << 18)  # mib MiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once


def decode_seconds(model, prompt, new_tokens: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        return time.perf_counter() - t0


def speed(models: dict, new_tokens: int, runs: int, bandwidth: float) -> None:
    prompt = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    for model in models.values():
        decode_seconds(model, prompt, new_tokens)  # warm-up
    for _ in range(runs):
        for name, model in models.items():  # alternate: load from other processes hits all alike
            times[name].append(decode_seconds(model, prompt, new_tokens))
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    print(
        f"{'dtype':<6}{'weights MB':>11}{'tokens/s':>10}{'ms/token':>10}{'vs fp32':>9}"
        f"{'floor tok/s':>13}{'of floor':>10}"
    )
    for name, t in times.items():
        med = statistics.median(t)
        floor = bandwidth / weight_bytes(models[name])  # tokens/s if reading the weights were all
        ratio = f"{base / med:.2f}x" if base else "-"
        print(
            f"{name:<6}{weight_bytes(models[name]) / 1e6:>11.1f}{new_tokens / med:>10.1f}"
            f"{1000 * med / new_tokens:>10.2f}{ratio:>9}{floor:>13.0f}{(new_tokens / med) / floor:>10.0%}"
        )


def agreement(models: dict, data_dir: str, windows: int, prompts: int, new_tokens: int) -> None:
    ref, half = models["fp32"], models["bf16"]
    tokens = np.asarray(open_split(data_dir, "validation")).astype(np.int64)
    T = ref.config.block_size
    rng = np.random.default_rng(0)
    same = total = 0
    with torch.inference_mode():
        for start in rng.integers(0, len(tokens) - T, size=windows):
            x = torch.from_numpy(tokens[start : start + T])[None]  # (1, T)
            a = ref(x, torch.zeros_like(x))[0].argmax(-1)  # targets given: logits at every position
            b = half(x, torch.zeros_like(x))[0].argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
        print(f"teacher-forced top-1 agreement bf16 vs fp32: {same / total:.2%} of {total:,} positions")
        first_diff = []
        for start in rng.integers(0, len(tokens) - 16, size=prompts):
            p = torch.from_numpy(tokens[start : start + 16])[None]  # (1, 16)
            a = ref.generate(p, new_tokens, temperature=0)[0, 16:]
            b = half.generate(p, new_tokens, temperature=0)[0, 16:]
            diff = (a != b).nonzero()
            first_diff.append(int(diff[0]) if len(diff) else None)
    differ = [d for d in first_diff if d is not None]
    where = (
        f" (first differing token: median {statistics.median(differ):.0f}, min {min(differ)})"
        if differ
        else ""
    )
    print(
        f"greedy {new_tokens} tokens from {prompts} 16-token validation prompts: {prompts - len(differ)} "
        f"identical, {len(differ)} differ{where}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run or checkpoint (default: the seed shape, random weights)")
    p.add_argument("--data", help="prepared data for the agreement check (needs --checkpoint)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--windows", type=int, default=50, help="validation windows for teacher-forced agreement")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    if args.checkpoint:
        base, _ = load_for_inference(args.checkpoint, "cpu", "float32")
    else:
        torch.manual_seed(0)
        base = GPT(GPTConfig(dropout=0.0)).eval()
    models = {}
    for name in names:
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        models[name] = model.to(DTYPES[name]).eval()
    bandwidth = copy_bandwidth()
    cfg = base.config
    print(
        f"{cfg.n_layer} layers, {cfg.n_embd} dims, {base.num_params() / 1e6:.1f}M params; batch 1, "
        f"{args.new_tokens} greedy tokens from 8, KV cache; {torch.get_num_threads()} threads; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); median of {args.runs}"
    )
    speed(models, args.new_tokens, args.runs, bandwidth)
    if args.data and args.checkpoint and {"fp32", "bf16"} <= set(models):
        agreement(models, args.data, args.windows, args.prompts, args.new_tokens)


if __name__ == "__main__":
    main()
