"""Greedy generation speed: smallm's KV-cached `GPT.generate` against `transformers` on the same weights.

Both sides get the seed shape (6 layers, 6 heads, 384 dims, 128 positions, GPT-2 vocabulary) with the same
random weights, the same random prompt, and produce exactly `--new-tokens` greedy tokens (no early stop).
Each side runs in its own child process, so that its peak RSS is its own; the two alternate run by run,
so that both see the same load on the machine; the timings are medians of `--runs` runs after a warm-up.
The parent checks that both produced the same tokens, then prints a table.

With --baseline-src DIR a third child runs smallm from DIR (another version's `src`), alternated with the
other two: the same greedy tokens, and the tokens/s of this version against that one.

    flock /tmp/smallm-bench.lock python bench/generate_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def build_models(side: str, seed: int = 0):
    """The seed-shaped smallm GPT (random init from `seed`), or a GPT2LMHeadModel with the same weights."""
    from smallm import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(dropout=0.0)).eval()
    if side == "smallm":
        return model
    from smallm.export import to_transformers

    hf = to_transformers(model)
    del model
    return hf


def worker(side: str, batch_size: int, prompt_len: int, new_tokens: int) -> None:
    """Child process: build one side, then for every line "run" on stdin generate once and answer with
    the seconds it took; on "done" answer with the peak RSS and the tokens of the last run."""
    model = build_models(side)
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, 50257, (batch_size, prompt_len), generator=g)

    def once():
        with torch.inference_mode():
            if side == "smallm":
                return model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=50256,
            )

    out = once()  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "done":
            break
        t0 = time.perf_counter()
        out = once()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    assert out.shape == (batch_size, prompt_len + new_tokens), out.shape
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "tokens": out[:, prompt_len:].tolist()}), flush=True)


def measure(batch_size: int, prompt_len: int, new_tokens: int, runs: int, baseline_src=None) -> dict:
    """Start the sides as children and alternate their runs, so that all see the same machine load.
    With baseline_src, a third side runs smallm from that source tree (an older version, say)."""
    procs = {}
    sides = {"smallm": "smallm", "transformers": "transformers"}
    if baseline_src:
        sides["baseline"] = "smallm"
    for name, side in sides.items():
        cmd = [sys.executable, __file__, "--side", side, "--batch-size", str(batch_size)]
        cmd += ["--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
        env = {**os.environ, "PYTHONPATH": str(baseline_src)} if name == "baseline" else None
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(side, line):
        procs[side].stdin.write(line + "\n")
        procs[side].stdin.flush()
        return json.loads(procs[side].stdout.readline())

    for side, proc in procs.items():
        assert json.loads(proc.stdout.readline())["ready"], side
    times = {side: [] for side in procs}
    for _ in range(runs):
        for side in procs:
            times[side].append(ask(side, "run")["seconds"])
    results = {}
    for side, proc in procs.items():
        final = ask(side, "done")
        proc.wait()
        seconds = statistics.median(times[side])
        results[side] = {"tokens_per_s": batch_size * new_tokens / seconds, **final}
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112, help="prompt + new tokens <= 128 positions")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--baseline-src", help="src/ of another smallm, measured as a third side")
    parser.add_argument("--side", choices=["smallm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        worker(args.side, args.batch_size, args.prompt_len, args.new_tokens)
        return

    print(
        f"greedy generation, seed shape, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"median of {args.runs} alternating runs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'batch':>5} {'side':>12} {'tokens/s':>10} {'peak RSS MB':>12} {'ratio':>7}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        results = measure(batch_size, args.prompt_len, args.new_tokens, args.runs, args.baseline_src)
        same = results["smallm"]["tokens"] == results["transformers"]["tokens"]
        ratio = results["smallm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        for side, r in results.items():
            shown = f"{ratio:6.2f}x" if side == "smallm" else ""
            print(
                f"{batch_size:>5} {side:>12} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} {shown:>7}"
            )
        print(f"{'':>5} same greedy tokens: {same}")
        if "baseline" in results:
            base = results["baseline"]
            same = results["smallm"]["tokens"] == base["tokens"]
            ratio = results["smallm"]["tokens_per_s"] / base["tokens_per_s"]
            print(f"{'':>5} smallm / baseline tokens/s: {ratio:.3f}x; same greedy tokens: {same}")


if __name__ == "__main__":
    main()
