"""What Muon costs: a training step of the `fast` recipe (Muon + AdamW) against the same step with AdamW.

Both run the seed shape in one process on the same batches, alternating step by step (so load on the
machine hits both alike): forward, backward, clip, optimizer step, zero_grad, in the dtype `--dtype auto`
picks. Prints the median seconds per step, tokens/s, the ratio, and the optimizer step alone (Muon's
Newton-Schulz iterations on the 24 block matrices against a fused AdamW update), plus peak RSS. The `fast`
row is the preset's whole step: Muon + AdamW, then its moving average of the weights (`ema`) updated.

    flock /tmp/smallm-bench.lock python bench/optimizer_step.py              # batch 4 x 128, as `fast`
    flock /tmp/smallm-bench.lock python bench/optimizer_step.py --batch-size 32
    flock /tmp/smallm-bench.lock python bench/optimizer_step.py --ns-steps 5,3   # fewer NS iterations
    flock /tmp/smallm-bench.lock python bench/optimizer_step.py --ns-dtypes float32,bfloat16   # NS dtype
    flock /tmp/smallm-bench.lock python bench/optimizer_step.py --ns-forms auto,standard,gram   # NS forms

Muon's Newton-Schulz iterations run in the dtype `--muon-ns-dtype auto` picks for this CPU (bf16 with native
bf16, else fp32), in fp32 through the Gram matrix's eigendecomposition (smallm.muon.pick_form);
`--ns-dtypes` and `--ns-forms` add a row per dtype and form asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from smallm.device import pick_ns_dtype
from smallm.model import GPT
from smallm.muon import Muon
from smallm.train import build_config, configure_optimizers, pick_dtype


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per optimizer (after 3 warm-up)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--ns-steps", default="5", help="comma-separated Newton-Schulz counts")
    parser.add_argument("--ns-dtypes", default="auto", help="comma-separated: auto, bfloat16, float32")
    parser.add_argument("--ns-forms", default="auto", help="comma-separated: auto (smallm.muon.pick_form's), "
                        "standard (torch's arithmetic), gram, eigh (on every matrix)")  # fmt: skip
    args = parser.parse_args()

    dtype, why = pick_dtype(args.dtype, torch.device("cpu"))
    autocast = (
        torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    )
    runs = {}
    variants = {"adamw": dict(optimizer="adamw", ema=0.0)}
    for n in args.ns_steps.split(","):
        for ns_dtype in args.ns_dtypes.split(","):
            for form in args.ns_forms.split(","):
                name = "muon" + ("" if n == "5" else f"-ns{n}")
                name += "" if ns_dtype == "auto" else f"-{ns_dtype}"
                name += "" if form == "auto" else f"-{form}"
                variants[name] = dict(optimizer="muon", muon_ns_steps=int(n), muon_ns_dtype=ns_dtype, ema=0.0,
                                      ns_form=None if form == "auto" else form)  # fmt: skip
    variants["fast"] = {}
    for name, overrides in variants.items():
        ns_form = overrides.pop("ns_form", None)
        config = build_config("fast", overrides=dict(overrides, batch_size=args.batch_size))
        torch.manual_seed(0)
        model = GPT(config.model_config())
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99)) if config.ema else None
        optimizers = configure_optimizers(model, config, "cpu")
        for optimizer in optimizers:
            if isinstance(optimizer, Muon):
                optimizer.ns_form = ns_form
        runs[name] = dict(model=model, optimizers=optimizers, average=average, step=[], opt=[])
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (args.batch_size, 129), generator=g) for _ in range(4)]

    for i in range(3 + args.steps):
        for run in runs.values():
            x, y = batches[i % 4][:, :-1], batches[i % 4][:, 1:]
            t0 = time.perf_counter()
            with autocast:
                _, loss = run["model"](x, y, return_logits=False)
            loss.backward()
            t1 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
            for optimizer in run["optimizers"]:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if run["average"] is not None:
                run["average"].update_parameters(run["model"])
            t2 = time.perf_counter()
            if i >= 3:
                run["step"].append(t2 - t0)
                run["opt"].append(t2 - t1)

    tokens = args.batch_size * 128
    ns_dtype, ns_why = pick_ns_dtype("auto", torch.device("cpu"))
    print(f"seed shape, batch {args.batch_size} x 128, dtype {dtype} ({why}), Newton-Schulz in "
          f"{ns_dtype} unless named ({ns_why}), {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")  # fmt: skip
    base = statistics.median(runs["adamw"]["step"])
    for name, run in runs.items():
        step, opt = statistics.median(run["step"]), statistics.median(run["opt"])
        print(f"{name:16} {step:7.3f} s/step  {tokens / step:7.0f} tokens/s  ratio {base / step:5.2f}  "
              f"optimizer step {opt * 1000:6.1f} ms")  # fmt: skip
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB (all models)")


if __name__ == "__main__":
    main()
