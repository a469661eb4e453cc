"""Why a budget grows the micro-batch before gradient accumulation: the same tokens, split differently.

Forward and backward of the seed shape over the same 1,024 tokens, in one process, alternating: one
micro-batch of 8 x 128 against two of 4 x 128 (gradients accumulated, as `gradient_accumulation_steps` 2
does), and one of 4 x 128 alone for scale. bf16 autocast where the CPU has it (`--dtype auto`). Prints the
median seconds of each, its tokens/s against 8 x 128's, and peak RSS.

    flock /tmp/smallm-bench.lock python bench/micro_batch.py
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch

from smallm.model import GPT
from smallm.train import build_config, pick_dtype


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--reps", type=int, default=12, help="timed repetitions of each (after 3 warm-up)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    dtype, why = pick_dtype(args.dtype, torch.device("cpu"))
    autocast = (
        torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    )
    torch.manual_seed(0)
    model = GPT(build_config("fast").model_config())
    rows = torch.randint(0, 50257, (8, 129), generator=torch.Generator().manual_seed(0))

    def forward_backward(batch: torch.Tensor) -> None:
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
        loss.backward()

    splits = {"8 x 128": [rows], "2 x (4 x 128)": [rows[:4], rows[4:]], "4 x 128 alone": [rows[:4]]}
    times = {name: [] for name in splits}
    for i in range(3 + args.reps):
        for name, parts in splits.items():
            t0 = time.perf_counter()
            for part in parts:
                forward_backward(part)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)

    print(f"seed shape, forward + backward, dtype {dtype} ({why}), {torch.get_num_threads()} threads, "
          f"median of {args.reps}")  # fmt: skip
    base = 1024 / statistics.median(times["8 x 128"])
    for name, values in times.items():
        median = statistics.median(values)
        speed = sum(len(part) for part in splits[name]) * 128 / median
        print(f"{name:14} {median:6.3f} s  {speed:6.0f} tokens/s  ratio vs 8 x 128 {speed / base:5.2f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
