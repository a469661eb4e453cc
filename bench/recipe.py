"""Recipe quality: train recipes on one token budget, then measure them on stories never trained on.

Each recipe is a preset plus field overrides, e.g. `adamw-1e-3=fast optimizer=adamw learning_rate=1e-3`.
Every (recipe, seed) trains with `smallm train --preset P --tokens T --seed S ...` in its own process on
TRAIN's train split, then `smallm eval` measures its final weights (RUN/last, not the best evaluation, which
was chosen on the unseen text) over every token of UNSEEN (both of its splits), with loss and bits per
byte. UNSEEN must hold stories that are not in TRAIN; cut it before tuning anything, and keep a second
unseen directory for the figures you report. The row also holds the loss over every token of TRAIN's own
validation split (`held-out`: the stories `smallm prepare` kept out of TRAIN, which `smallm train` reports
on), for comparing with figures measured there.

The runs evaluate on UNSEEN as they go (RUN/metrics.jsonl, about 8K tokens per evaluation), which
gives the plot of loss against tokens; the table's loss is the full evaluation at the end.

Prints one table (recipe, tokens, loss on unseen stories, bits/byte, wall time, tokens/s: mean and spread
over seeds) and writes OUT/recipes.png; each finished run is a JSON line in --results as soon as it ends, so
an interrupted benchmark keeps what it measured and a rerun skips what is there (the same recipe, budget
and seed on the same TRAIN and UNSEEN directories; rows of other data are left alone).

    python bench/recipe.py --train data/ts-train --unseen data/ts-unseen --tokens 380k --seeds 1,2,3 \\
        --recipe fast --recipe "adamw=fast optimizer=adamw learning_rate=1e-3" --lock /tmp/smallm-bench.lock
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smallm.errors import SmallmError
from smallm.plot import read_metrics
from smallm.train_config import build_config, parse_tokens, plan_steps


def parse_recipe(text: str) -> tuple[str, str, dict]:
    """'name=preset field=value ...' (or just 'preset') -> (name, preset, overrides)."""
    head, *pairs = text.split()
    name, _, preset = head.rpartition("=")
    overrides = dict(pair.split("=", 1) for pair in pairs)
    return name or preset, preset, overrides


def combined_data(train_dir: Path, unseen_dir: Path, out: Path) -> Path:
    """A prepared directory with TRAIN's train split and all of UNSEEN as its validation split."""
    meta = json.loads((train_dir / "meta.json").read_text())
    unseen = json.loads((unseen_dir / "meta.json").read_text())
    if (meta["tokenizer"], meta["vocab_size"]) != (unseen["tokenizer"], unseen["vocab_size"]):
        sys.exit("TRAIN and UNSEEN were prepared with different tokenizers")
    out.mkdir(parents=True, exist_ok=True)
    # temp file, then rename: a run of another bench process may be reading the old files through a memmap
    shutil.copyfile(train_dir / "train.bin", out / "train.bin.tmp")
    os.replace(out / "train.bin.tmp", out / "train.bin")
    with open(out / "validation.bin.tmp", "wb") as f:
        for split in unseen["splits"]:
            f.write((unseen_dir / f"{split}.bin").read_bytes())
    os.replace(out / "validation.bin.tmp", out / "validation.bin")
    parts = unseen["splits"].values()
    meta["splits"] = {
        "train": meta["splits"]["train"],
        "validation": {key: sum(p[key] for p in parts) for key in ("documents", "tokens", "bytes")},
    }
    meta["source"] = {"train": str(train_dir), "validation": f"all of {unseen_dir}"}
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "meta.json.tmp", out / "meta.json")
    return out


@contextlib.contextmanager
def locked(path: str | None):
    """Hold an exclusive flock on `path` (other timing runs wait), or nothing without a path."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def smallm(*args: str) -> str:
    """Run `smallm ARGS...` and return its stdout; if it fails, stop with its last lines of stderr (its
    one-line error), not a traceback of this script that hides them."""
    result = subprocess.run([sys.executable, "-m", "smallm", *args], capture_output=True, text=True)
    if result.returncode:
        tail = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()][-3:]
        sys.exit(f"smallm {args[0]} {args[1]} failed (exit {result.returncode}): " + " | ".join(tail))
    return result.stdout


def evaluate(run: Path, data: Path) -> dict:
    """`smallm eval` over every token of DATA's validation split: {val_loss, bits_per_byte, tokens, ...}."""
    return json.loads(smallm("eval", str(run), "--data", str(data)).strip().splitlines()[-1])


def run_one(name, preset, overrides, tokens, seed, data, out, lock, train_dir) -> dict:
    """Train one recipe with one seed, evaluate its final weights on the unseen split, return the row."""
    config = build_config(preset, overrides={**overrides, "seed": seed})
    steps = plan_steps(config, tokens)["max_iters"]
    eval_iters = max(1, 8192 // (config.batch_size * config.block_size))  # ~8K tokens per evaluation
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    run = out / "runs" / f"{name}-{tokens}-s{seed}"
    shutil.rmtree(run, ignore_errors=True)
    train = ["train", "--data", str(data), "--out", str(run), "--preset", preset, f"--seed={seed}",
             f"--tokens={tokens}", f"--eval-interval={max(1, steps // 6)}", f"--eval-iters={eval_iters}",
             *flags]  # fmt: skip
    with locked(lock):
        t0 = time.time()
        smallm(*train)
        wall = time.time() - t0
    evaluation = evaluate(run / "last", data)
    splits = json.loads((train_dir / "meta.json").read_text())["splits"]
    has_heldout = splits.get("validation", {}).get("tokens")
    heldout = evaluate(run / "last", train_dir) if has_heldout else {}
    rows = read_metrics(run / "metrics.jsonl")
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]  # the first includes warm-up
    return dict(
        recipe=name, preset=preset, overrides=overrides, seed=seed, tokens_budget=tokens,
        tokens=max(r.get("tokens", 0) for r in rows), steps=steps, loss=evaluation["val_loss"],
        bits_per_byte=evaluation["bits_per_byte"], unseen_tokens=evaluation["tokens"],
        heldout_loss=heldout.get("val_loss"), heldout_tokens=heldout.get("tokens"), wall_s=round(wall, 1),
        tokens_per_sec=round(statistics.median(speeds), 1) if speeds else None, cpu=cpu_name(),
        curve=[(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r], run=str(run),
    )  # fmt: skip


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def report(rows: list[dict], png: Path) -> None:
    """The table (mean ± standard deviation over seeds) and the plot of unseen loss against tokens."""
    by_recipe: dict[tuple, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault((r["recipe"], r["tokens_budget"]), []).append(r)
    print(f"{'recipe':32} {'tokens':>9} {'seeds':>5} {'unseen loss':>15} {'bits/byte':>15} "
          f"{'held-out loss':>15} {'wall s':>8} {'tokens/s':>9}")  # fmt: skip
    for (name, budget), group in sorted(
        by_recipe.items(), key=lambda kv: (kv[0][1], spread([r["loss"] for r in kv[1]]))
    ):
        print(
            f"{name:32} {budget:>9,} {len(group):>5} {spread([r['loss'] for r in group]):>15} "
            f"{spread([r['bits_per_byte'] for r in group]):>15} "
            f"{spread([r.get('heldout_loss') for r in group]):>15} "
            f"{statistics.fmean(r['wall_s'] for r in group):>8.0f} "
            f"{statistics.fmean(r['tokens_per_sec'] or 0 for r in group):>9,.0f}"
        )
    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (name, budget), group in sorted(by_recipe.items()):
        curve = {}
        for r in group:
            for tokens, loss in r["curve"]:
                curve.setdefault(tokens, []).append(loss)
        points = sorted((t, statistics.fmean(v)) for t, v in curve.items())
        ax.plot(*zip(*points, strict=True), "o-", markersize=3, label=f"{name} ({budget:,} tokens)")
    ax.set_xlabel("tokens trained on")
    ax.set_ylabel("loss on unseen stories (nats/token, mean over seeds)")
    ax.set_ylim(top=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    print(f"plot: {png}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train", type=Path, required=True, help="prepared directory to train on (its train split)"
    )
    parser.add_argument(
        "--unseen", type=Path, required=True, help="prepared directory of stories not in TRAIN"
    )
    parser.add_argument(
        "--tokens", default="380k", help="token budget of every run (comma-separated for several)"
    )
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds")
    parser.add_argument("--recipe", action="append", required=True, help="'name=preset field=value ...'")
    parser.add_argument("--out", type=Path, default=Path("runs/recipe-bench"), help="runs and plot go here")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines (default: OUT/results.jsonl)")
    parser.add_argument("--lock", default=None, help="flock this file around each training run")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    results = args.results or args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    data = combined_data(args.train, args.unseen, args.out / "data")
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    # a row counts only for the same training and unseen text: a results file may hold other data's rows
    source = dict(train=str(args.train.resolve()), unseen=str(args.unseen.resolve()))
    done = [r for r in done if all(r.get(k) == v for k, v in source.items())]
    recipes = [parse_recipe(r) for r in args.recipe]
    budgets = [parse_tokens(t) for t in args.tokens.split(",")]
    for name, preset, overrides in recipes:  # a bad field or value stops here, before hours of runs
        try:
            build_config(preset, overrides=overrides)
        except SmallmError as e:
            sys.exit(f"recipe {name!r}: {e}")
    seeds = [int(s) for s in args.seeds.split(",")]
    for tokens in budgets:
        for name, preset, overrides in recipes:
            for seed in seeds:
                if any((r["recipe"], r["tokens_budget"], r["seed"]) == (name, tokens, seed) for r in done):
                    continue
                row = run_one(name, preset, overrides, tokens, seed, data, args.out, args.lock, args.train)
                row |= source
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed} {tokens:,} tokens: unseen loss {row['loss']:.4f}, "
                      f"{row['wall_s']:.0f} s", flush=True)  # fmt: skip
                done.append(row)
    wanted = {(name, tokens) for name, _, _ in recipes for tokens in budgets}
    report([r for r in done if (r["recipe"], r["tokens_budget"]) in wanted], args.out / "recipes.png")


if __name__ == "__main__":
    main()
