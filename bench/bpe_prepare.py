"""How long `smallm prepare --tokenizer bpe:N` takes on ~100 MB of text, against `--tokenizer gpt2`.

    python bench/bpe_prepare.py --text-files stories.txt --mb 100 --vocab 8192 --repeats 3

The text files are repeated into a temporary corpus of at least --mb megabytes. Each prepare runs in its
own process (wall time, and peak RSS of it and its workers); for bpe the BPE training time is what prepare
itself reports. Prints the medians and the ratio bpe/gpt2 of the whole prepare.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run in a fresh process: prepare, then peak RSS (MB) of this process and of its worker processes.
HARNESS = """
import resource, sys
from smallm.cli import main
code = main(sys.argv[1:])
peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(f"peak_rss_mb {peak / 1024:.0f}")
sys.exit(code)
"""


def build_corpus(files: list[Path], mb: float, out: Path) -> int:
    data = b"".join(f.read_bytes().rstrip(b"\n") + b"\n<|endoftext|>\n" for f in files)
    written = 0
    with open(out, "wb") as f:
        while written < mb * 1e6:
            f.write(data)
            written += len(data)
    return written


def run_prepare(corpus: Path, out: Path, tokenizer: str) -> dict:
    args = ["prepare", "--text-files", str(corpus), "--out", str(out), "--tokenizer", tokenizer, "--force"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", HARNESS, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    trained = re.search(r"trained in ([0-9.]+) s", done.stdout)
    return {
        "wall": wall,
        "train": float(trained.group(1)) if trained else None,
        "peak_mb": int(re.search(r"peak_rss_mb (\d+)", done.stdout).group(1)),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text-files", nargs="+", type=Path, required=True)
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = build_corpus(args.text_files, args.mb, corpus)
        print(f"corpus: {size / 1e6:.1f} MB ({', '.join(p.name for p in args.text_files)} repeated)")
        results = {"gpt2": [], f"bpe:{args.vocab}": []}
        for _ in range(args.repeats):  # interleaved, so that both see the same machine load
            for tokenizer, runs in results.items():
                runs.append(run_prepare(corpus, Path(tmp) / "out", tokenizer))
    for tokenizer, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        line = (
            f"{tokenizer:>10}: prepare {wall:6.1f} s (median of {len(runs)}, {size / 1e6 / wall:5.1f} MB/s)"
        )
        if runs[0]["train"] is not None:
            line += f", of which BPE training {statistics.median(r['train'] for r in runs):.1f} s"
        print(f"{line}, peak RSS {max(r['peak_mb'] for r in runs)} MB")
    gpt2, bpe = (statistics.median(r["wall"] for r in runs) for runs in results.values())
    print(f"ratio bpe/gpt2 (whole prepare): {bpe / gpt2:.2f}x")


if __name__ == "__main__":
    main()
