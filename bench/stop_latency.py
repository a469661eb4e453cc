"""How fast a seed-shaped `smallm train` stops on SIGTERM, measured from outside, and that it resumes exactly.

Prepares --text (TinyStories format) into WORK/data once, then runs `smallm train` (the `seed` preset: 6
layers, 384 dims, 32 x 128 tokens per micro-batch, 32 micro-batches per step) as a subprocess and sends
SIGTERM:
  1. during the step-0 evaluation (200 batches per split): --delay seconds after the run directory
     appears (config.yaml is written just before the evaluation starts);
  2. during a 32-micro-batch step: with --eval-iters 2 so that step 0 is evaluated quickly, --delay seconds
     after step 1's metrics row appears (so step 2 is under way and last/ must be written as of step 1).
For each it prints the seconds from SIGTERM to the process's exit, the exit code, the step last/ holds,
and the peer: how long the interrupted phase takes in full (what the loop used to finish before stopping),
measured in the same run.

Then, unless --no-resume-check, the exactness check on a shortened run (seed shape, --eval-iters 2,
--gradient-accumulation-steps 4, --max-iters 3, evaluated at steps 0 and 3): one run never stopped, one
stopped by SIGTERM during its step-0 evaluation and one during step 2, each resumed to the end; the loss
rows must equal the never-stopped run's.

Peak RSS is the largest of the training processes'. Run it alone:

    flock /tmp/smallm-bench.lock python bench/stop_latency.py
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

SMALLM = [sys.executable, "-m", "smallm"]
print = functools.partial(print, flush=True)  # noqa: A001  (the figures survive the script being stopped)


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def last_step(run: Path):
    state = run / "last" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


def stop_when(command: list[str], ready, delay: float, log: Path) -> dict:
    """Start `command`, wait until ready(), then `delay` seconds more; SIGTERM; time the exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        started = time.time()
        while not ready():
            if proc.poll() is not None:
                sys.exit(f"{' '.join(command)} exited early with {proc.returncode}; see {log}")
            time.sleep(0.05)
        time.sleep(delay)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        return dict(seconds=time.time() - sent, code=code, waited=sent - started)


def train(data: Path, run: Path, *flags: str, resume: bool = False) -> list[str]:
    if resume:
        return [*SMALLM, "train", "--out", str(run), "--resume", *flags]
    return [*SMALLM, "train", "--data", str(data), "--out", str(run), *flags]


def run_to_end(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{' '.join(command)} failed; see {log}")


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--text", default="/work/shared/data/tinystories-valid-more.txt")
    parser.add_argument("--work", default="/tmp/signals/stop-bench", help="data and runs go here")
    parser.add_argument("--delay", type=float, default=20.0, help="seconds into the phase before SIGTERM")
    parser.add_argument("--no-resume-check", action="store_true", help="skip the exactness check")
    args = parser.parse_args()
    work = Path(args.work)
    data, runs = work / "data", work / f"runs-{time.strftime('%H%M%S')}"
    runs.mkdir(parents=True)
    subprocess.run([*SMALLM, "prepare", "--text-files", args.text, "--out", str(data)], check=True)

    # ---- 1. SIGTERM during the step-0 evaluation of the seed preset --------------------------------------
    run = runs / "eval"
    started = lambda: (run / "config.yaml").is_file()  # noqa: E731
    result = stop_when(train(data, run), started, args.delay, runs / "eval.log")
    print(f"during the step-0 evaluation: exit {result['code']} {result['seconds']:.1f} s after SIGTERM, "
          f"last/ holds step {last_step(run)}")  # fmt: skip
    measured = [("step-0 evaluation (200 batches x 2 splits)", result, last_step(run))]

    # ---- 2. SIGTERM during a 32-micro-batch step -----------------------------------------------------------
    run = runs / "step"
    flags = ["--eval-iters", "2", "--log-interval", "1"]
    ready = lambda: any(r.get("step") == 1 and "loss" in r for r in rows(run))  # noqa: E731
    result = stop_when(train(data, run, *flags), ready, args.delay, runs / "step.log")
    evaluated, step1 = rows(run)[0], rows(run)[1]
    step_seconds = step1["tokens"] / step1["tokens_per_sec"]  # step 1 alone (the rate leaves evaluation out)
    print(f"during step 2 (32 micro-batches, {step_seconds:.0f} s each step): exit {result['code']} "
          f"{result['seconds']:.1f} s after SIGTERM, last/ holds step {last_step(run)}")  # fmt: skip
    measured.append(("a 32-micro-batch step", result, last_step(run)))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print("\n| SIGTERM during | seconds to exit | exit code | last/ holds step | the phase in full |")
    print("|---|---|---|---|---|")
    # the peer: the whole phase, which the loop used to finish first (eval: 2 batches were timed in run 2)
    eval_batch = evaluated["elapsed"] / 4  # run 2's step-0 evaluation: 2 batches x 2 splits (+ start-up)
    full = {0: 400 * eval_batch, 1: step_seconds}
    for i, (what, result, step) in enumerate(measured):
        print(f"| {what} | {result['seconds']:.1f} | {result['code']} | {step} | ~{full[i]:.0f} s |")
    print(f"peak RSS of a training process: {peak:.0f} MB")

    if not args.no_resume_check:
        resume_check(data, runs)


def resume_check(data: Path, runs: Path) -> None:
    """Never stopped vs stopped (in the step-0 evaluation; in step 2) and resumed: the same loss rows."""
    short = ["--eval-iters", "2", "--gradient-accumulation-steps", "4", "--max-iters", "3",
             "--eval-interval", "3", "--log-interval", "1"]  # fmt: skip
    reference = runs / "never-stopped"
    run_to_end(train(data, reference, *short), runs / "never-stopped.log")

    in_eval = runs / "stopped-in-eval"  # a long evaluation (--eval-iters 200), resumed with the reference's 2
    started = lambda: (in_eval / "config.yaml").is_file()  # noqa: E731
    stop_when(train(data, in_eval, *short, "--eval-iters", "200"), started, 5.0, runs / "stopped-in-eval.log")
    held_eval = last_step(in_eval)
    run_to_end(train(data, in_eval, "--eval-iters", "2", resume=True), runs / "stopped-in-eval.log")

    in_step = runs / "stopped-in-step"
    ready = lambda: any(r.get("step") == 1 and "loss" in r for r in rows(in_step))  # noqa: E731
    stop_when(train(data, in_step, *short), ready, 3.0, runs / "stopped-in-step.log")
    held_step = last_step(in_step)
    run_to_end(train(data, in_step, resume=True), runs / "stopped-in-step.log")

    def losses(run):
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("train_loss")) for r in rows(run)]

    print(f"\nresume check (seed shape, 4 micro-batches/step, 3 steps): never stopped {losses(reference)}")
    stopped = (("in the step-0 evaluation", in_eval, held_eval), ("in step 2", in_step, held_step))
    for name, run, held in stopped:
        same = "identical" if losses(run) == losses(reference) else "DIFFERENT"
        final, expected = losses(run)[-1][2], losses(reference)[-1][2]
        print(f"stopped {name} (last/ held step {held}), resumed: {same} loss rows; final val loss {final!r} "
              f"vs {expected!r}")  # fmt: skip


if __name__ == "__main__":
    main()
