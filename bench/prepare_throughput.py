"""How fast `smallm prepare --text-files` tokenizes ~100 MB of TinyStories, against one tiktoken thread.

Builds a TinyStories-format file of about --mb megabytes by repeating the given stories (in a temporary
directory, never in the repo), then times, --repeats times each:
  - the peer: one thread of tiktoken's `encode_ordinary` over the same stories (tokenization only), and
  - tiktoken's own `encode_ordinary_batch` with one thread per core (for comparison: threads), and
  - `smallm prepare --text-files FILE --force` as a subprocess, end to end (start-up, reading, workers,
    writing the bins).
Prints MB/s, tokens/s, the medians, their ratio and peak memory (the prepare's, via GNU time, is the
largest of its processes). Run it alone:

    flock /tmp/smallm-bench.lock python bench/prepare_throughput.py
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smallm.data import _cpu_count
from smallm.tokenizer import EOT_TEXT, get_tokenizer

DEFAULT_INPUT = "/work/shared/data/tinystories-valid-*.txt"


def build_file(pattern: str, megabytes: float, path: Path) -> list[str]:
    """Write stories from the files matching `pattern`, repeated to `megabytes`; return the stories."""
    stories = []
    for name in sorted(glob.glob(pattern)):
        text = Path(name).read_text(encoding="utf-8")
        stories += [s.strip() for s in text.split(f"\n{EOT_TEXT}\n") if s.strip()]
    if not stories:
        sys.exit(f"no stories found in {pattern}")
    block = "".join(f"{s}\n{EOT_TEXT}\n" for s in stories)
    repeats = max(1, round(megabytes * 1e6 / len(block.encode("utf-8"))))
    path.write_text(block * repeats, encoding="utf-8")
    return stories * repeats


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", default=DEFAULT_INPUT, help="TinyStories-format file(s), a glob")
    parser.add_argument("--mb", type=float, default=100, help="size of the generated file in MB")
    parser.add_argument("--workers", type=int, default=None, help="smallm prepare --workers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workers = args.workers or _cpu_count()

    with tempfile.TemporaryDirectory(prefix="smallm-prepare-bench-") as tmp:
        path = Path(tmp) / "stories.txt"
        stories = build_file(args.input, args.mb, path)
        megabytes = path.stat().st_size / 1e6
        print(f"input: {path} {megabytes:.1f} MB, {len(stories):,} stories; {_cpu_count()} cores")

        enc = get_tokenizer()
        command = [sys.executable, "-m", "smallm", "prepare", "--text-files", str(path)]
        command += ["--out", str(Path(tmp) / "out"), "--force", "--workers", str(workers)]
        rss_file = Path(tmp) / "rss"
        if Path("/usr/bin/time").exists():  # GNU time: peak RSS of the prepare
            command = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command]
        single_s, threads_s, prepare_s, tokens, prepare_rss = [], [], [], 0, 0.0
        for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits all alike
            t0 = time.perf_counter()
            tokens = sum(len(enc.encode_ordinary(story)) for story in stories)
            single_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(stories, num_threads=workers)
            threads_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            prepare_s.append(time.perf_counter() - t0)
            if rss_file.exists():
                prepare_rss = max(prepare_rss, int(rss_file.read_text().split()[-1]) / 1024)
        tokens += len(stories)  # one <|endoftext|> per story, as prepare writes
        peer_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        written = sum(os.path.getsize(p) for p in Path(tmp, "out").glob("*.bin")) // 2
        assert written == tokens, f"prepare wrote {written} tokens, tiktoken counts {tokens}"

    single, prepared = statistics.median(single_s), statistics.median(prepare_s)
    threads = statistics.median(threads_s)
    print(f"tokens: {tokens:,} (prepare wrote the same number)")
    for name, seconds, runs, rss in (
        ("single-thread encode_ordinary", single, single_s, peer_rss),
        (f"encode_ordinary_batch, {workers} threads", threads, threads_s, peer_rss),
        (f"smallm prepare --workers {workers}", prepared, prepare_s, prepare_rss),
    ):
        print(
            f"{name:34s} median {seconds:6.2f} s  {megabytes / seconds:6.1f} MB/s  "
            f"{tokens / seconds / 1e6:5.2f} M tokens/s  peak RSS {rss:5.0f} MB  "
            f"runs {np.round(runs, 2).tolist()}"
        )
    print(
        f"ratio (single-thread time / prepare time): {single / prepared:.2f}x (best runs: "
        f"{min(single_s) / min(prepare_s):.2f}x); threads: {single / threads:.2f}x"
    )


if __name__ == "__main__":
    main()
