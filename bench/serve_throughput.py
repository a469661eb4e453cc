"""`smallm serve` under concurrent clients: continuous batching (1 vs 8 clients) and back-pressure.

Saves the seed-shaped GPT (6 layers, 6 heads, 384 dims, 128 positions, random weights) to a temporary
checkpoint and starts `python -m smallm serve CKPT --port 0` as a child process. Every request is a
streamed POST /v1/completions (max_tokens --max-tokens, temperature 0.8, a seed per request), so the
client sees the time to its first token.

1. Throughput: --rounds rounds alternate 1 client and --clients concurrent clients, each client sending
   --requests-per-client requests one after another; the table gives the median total tokens/s, their
   ratio, p50/p95 time to first token and the median per-request tokens/s (its tokens / its time).
   With --baseline-src (a `src` directory of an older smallm), a second server runs that code, and its
   1-client rounds are alternated with ours: the batch-1 latency of the two in the same run.
2. Back-pressure: a server with --max-queue 8 gets --burst concurrent requests, --burst-rounds times;
   counts 200s and 503s, checks every 200 is complete and equals the text the same request gets alone
   (sent afterwards, one at a time), and reads the server's RSS before and after.

    flock /tmp/smallm-bench.lock python bench/serve_throughput.py --baseline-src /path/to/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

PROMPT = "Once upon a time, there was a little girl named Lily. She"
SRC = Path(__file__).resolve().parent.parent / "src"


def start_server(checkpoint: Path, src: Path = SRC, *flags: str) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "smallm",
        "serve",
        str(checkpoint),
        "--port",
        "0",
        "--max-tokens-cap",
        "1024",
    ]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(
        [*cmd, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    line = proc.stdout.readline()
    match = re.search(r"http://[\d.]+:(\d+)/", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    base = f"http://127.0.0.1:{match.group(1)}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not answer /health")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(http: httpx.Client, base: str, seed: int, max_tokens: int) -> dict:
    """One streamed completion: status, text, tokens, time to first token, total time."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed, "stream": True}
    body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    first, text, tokens, finish = None, [], 0, None
    with http.stream("POST", base + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "headers": response.headers, "body": response.text}
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    seconds = time.perf_counter() - start
    return {
        "status": 200,
        "text": "".join(text),
        "tokens": tokens,
        "finish": finish,
        "ttft": first,
        "seconds": seconds,
    }


def clients_round(base: str, clients: int, per_client: int, max_tokens: int, seed0: int) -> dict:
    def client(c: int) -> list[dict]:
        with httpx.Client(timeout=600) as http:
            return [request(http, base, seed0 + c * per_client + r, max_tokens) for r in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    elapsed = time.perf_counter() - start
    assert all(r["status"] == 200 for r in results), [r["status"] for r in results]
    return {"tok_s": sum(r["tokens"] for r in results) / elapsed, "requests": results}


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def burst(base: str, n: int, max_tokens: int, seed0: int) -> list[dict]:
    def one(i):
        with httpx.Client(timeout=600) as http:
            return {**request(http, base, seed0 + i, max_tokens), "seed": seed0 + i}

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, help="src/ of another smallm: its 1-client latency")
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--burst-rounds", type=int, default=3)
    parser.add_argument("--burst-tokens", type=int, help="max_tokens in the bursts (default --max-tokens)")
    args = parser.parse_args()

    from smallm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(dropout=0.0)).eval()
    print(
        f"seed shape, {model.num_params() / 1e6:.1f}M params, random init; {args.clients} clients x "
        f"{args.requests_per_client} requests x {args.max_tokens} tokens, streamed; {args.rounds} rounds"
    )
    one, many, old = [], [], []
    with tempfile.TemporaryDirectory(prefix="smallm-serve-bench-") as tmp:
        checkpoint = Path(tmp) / "best"
        model.save_pretrained(checkpoint)
        procs = {}
        try:
            if args.rounds:
                procs["ours"] = start_server(checkpoint)
            if args.rounds and args.baseline_src:
                procs["old"] = start_server(checkpoint, args.baseline_src)
            for _, base in procs.values():  # warm-up
                clients_round(base, 2, 1, 8, 0)
            n = args.requests_per_client
            for i in range(args.rounds):  # alternate, so that all see the same background load
                seed0 = (i + 1) * 1000
                one.append(clients_round(procs["ours"][1], 1, n, args.max_tokens, seed0))
                if "old" in procs:
                    old.append(clients_round(procs["old"][1], 1, n, args.max_tokens, seed0))
                many.append(clients_round(procs["ours"][1], args.clients, n, args.max_tokens, seed0))
            peak = rss_mib(procs["ours"][0].pid, "VmHWM") if args.rounds else 0
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=30)

        def row(label, rounds):
            reqs = [r for rnd in rounds for r in rnd["requests"]]
            ttft = [r["ttft"] for r in reqs]
            per = [r["tokens"] / r["seconds"] for r in reqs]
            tok_s = statistics.median(r["tok_s"] for r in rounds)
            print(
                f"| {label:34} | {tok_s:8.1f} | {pct(ttft, 0.5):8.3f} | {pct(ttft, 0.95):8.3f} | "
                f"{statistics.median(per):8.1f} |"
            )
            return tok_s

        if args.rounds:
            print(f"\n| {'':34} | {'tokens/s':>8} | {'TTFT p50':>8} | {'TTFT p95':>8} | {'req tok/s':>8} |")
            print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
            t1 = row("ours, 1 client", one)
            t8 = row(f"ours, {args.clients} concurrent clients", many)
            if old:
                t_old = row("baseline (--baseline-src), 1 client", old)
            print(
                f"\n{args.clients} clients / 1 client, total tokens/s: {t8 / t1:.2f}x; "
                f"server peak RSS {peak:.0f} MiB"
            )
            if old:
                print(f"1 client, ours / baseline tokens/s: {t1 / t_old:.3f}x")
            for label, rounds in (("1 client", one), (f"{args.clients} clients", many), ("baseline", old)):
                if rounds:
                    print(f"rounds, {label} tokens/s:", ", ".join(f"{r['tok_s']:.1f}" for r in rounds))

        tokens = args.burst_tokens or args.max_tokens
        print(
            f"\nback-pressure: {args.burst} concurrent clients, --max-batch 8 --max-queue 8, "
            f"{args.burst_rounds} bursts, {tokens} tokens each"
        )
        proc, base = start_server(checkpoint, SRC, "--max-batch", "8", "--max-queue", "8")
        try:
            clients_round(base, 2, 1, 8, 0)  # warm-up
            rss = [rss_mib(proc.pid)]
            results = []
            for b in range(args.burst_rounds):
                results += burst(base, args.burst, tokens, (b + 1) * 100_000)
                rss.append(rss_mib(proc.pid))
            statuses = [r["status"] for r in results]
            ok = [r for r in results if r["status"] == 200]
            with httpx.Client(timeout=600) as http:  # the same requests alone, one at a time
                alone = {r["seed"]: request(http, base, r["seed"], tokens)["text"] for r in ok}
            rss.append(rss_mib(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    refused = [r for r in results if r["status"] == 503]
    complete = sum(r["tokens"] == tokens or r["finish"] == "stop" for r in ok)
    same = sum(r["text"] == alone[r["seed"]] for r in ok)
    retry = sorted({r["headers"].get("retry-after") for r in refused})
    codes = sorted({json.loads(r["body"])["error"]["code"] for r in refused})
    print(
        f"statuses: {statuses.count(200)} x 200, {len(refused)} x 503 (Retry-After {retry}, code {codes}), "
        f"{len(statuses) - len(ok) - len(refused)} other"
    )
    print(f"200s complete: {complete}/{len(ok)}; equal to their alone-run text: {same}/{len(ok)}")
    print(
        f"server RSS MiB: before {rss[0]:.0f}, "
        + ", ".join(f"after burst {i} {x:.0f}" for i, x in enumerate(rss[1:-1], 1))
        + f", after the alone runs {rss[-1]:.0f}"
    )


if __name__ == "__main__":
    main()
