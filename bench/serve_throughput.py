"""`smallm serve` under concurrent clients: requests/s and generated tokens/s, against generation in-process.

Saves the seed-shaped GPT (6 layers, 6 heads, 384 dims, 128 positions, random weights) to a temporary
checkpoint, starts `python -m smallm serve CKPT --port 0` as a child process, and has --clients threads
each send --requests-per-client POST /v1/completions (max_tokens --max-tokens, temperature 0.8, a seed
per request, streaming off) at once. The peer, in this process: the same number of tokens produced by
`smallm.generate.stream` directly, one request after another (no HTTP, no JSON); and in between, the
server with one client sending the same requests one after another. Each is repeated --rounds
times, alternating between the two so that both see the same background load; the table shows medians,
their ratio, the server's peak RSS and this process's.

    flock /tmp/smallm-bench.lock python bench/serve_throughput.py
"""

from __future__ import annotations

import argparse
import re
import resource
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


def start_server(checkpoint: Path) -> tuple[subprocess.Popen, str]:
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_round(base: str, clients: int, per_client: int, max_tokens: int, round_index: int) -> dict:
    def client(c: int) -> int:
        tokens = 0
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                body = {
                    "model": "bench",
                    "prompt": PROMPT,
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": (round_index + 1) * 1000 + c * per_client + r,
                }
                response = http.post(base + "/v1/completions", json=body)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    return {"req_s": clients * per_client / elapsed, "tok_s": tokens / elapsed}


def in_process_round(model, requests: int, max_tokens: int, round_index: int) -> dict:
    from smallm.generate import stream
    from smallm.tokenizer import EOT_TOKEN, get_tokenizer

    prompt_ids = get_tokenizer().encode(PROMPT)
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for r in range(requests):
            generator = torch.Generator().manual_seed((round_index + 1) * 1000 + r)
            for token in stream(
                model, prompt_ids, max_tokens, 0.8, eos_token_id=EOT_TOKEN, generator=generator
            ):
                tokens += token != EOT_TOKEN
    elapsed = time.perf_counter() - start
    return {"req_s": requests / elapsed, "tok_s": tokens / elapsed}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from smallm import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(dropout=0.0)).eval()
    requests = args.clients * args.requests_per_client
    print(
        f"seed shape, {model.num_params() / 1e6:.1f}M params, torch threads {torch.get_num_threads()}; "
        f"{args.clients} clients x {args.requests_per_client} requests x {args.max_tokens} tokens, "
        f"{args.rounds} rounds (+1 warm-up)"
    )
    served, single, direct = [], [], []
    with tempfile.TemporaryDirectory(prefix="smallm-serve-bench-") as tmp:
        model.save_pretrained(Path(tmp) / "best")
        proc, base = start_server(Path(tmp) / "best")
        try:
            server_round(base, args.clients, 1, 8, -1)  # warm-up
            in_process_round(model, 2, 8, -1)
            for i in range(args.rounds):  # alternate, so that both sides see the same background load
                served.append(server_round(base, args.clients, args.requests_per_client, args.max_tokens, i))
                single.append(server_round(base, 1, requests, args.max_tokens, i))
                direct.append(in_process_round(model, requests, args.max_tokens, i))
            server_rss = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n| {'':36} | {'req/s':>7} | {'tokens/s':>8} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 10}|{'-' * 14}|")
    label = f"smallm serve, {args.clients} concurrent clients"
    print(f"| {label:36} | {med(served, 'req_s'):7.2f} | {med(served, 'tok_s'):8.1f} | {server_rss:12.0f} |")
    label = "smallm serve, 1 client"
    print(f"| {label:36} | {med(single, 'req_s'):7.2f} | {med(single, 'tok_s'):8.1f} | {server_rss:12.0f} |")
    label = "in-process stream(), sequential"
    print(f"| {label:36} | {med(direct, 'req_s'):7.2f} | {med(direct, 'tok_s'):8.1f} | {own_rss:12.0f} |")
    ratio = med(served, "tok_s") / med(direct, "tok_s")
    print(f"\nserver / in-process tokens/s: {ratio:.2f}x (medians of {args.rounds} rounds)")
    print("rounds, server tokens/s:", ", ".join(f"{r['tok_s']:.1f}" for r in served))
    print("rounds, server 1 client tokens/s:", ", ".join(f"{r['tok_s']:.1f}" for r in single))
    print("rounds, in-process tokens/s:", ", ".join(f"{r['tok_s']:.1f}" for r in direct))


if __name__ == "__main__":
    main()
