"""`smallm train` end to end: flags, one-line errors, Ctrl-C + --resume, torchrun with two CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import test_train
import yaml

from smallm.cli import main
from smallm.train import build_config, train

# The data and the uninterrupted reference run are session fixtures of test_train, made once per session.
data_dir, full_run, SMALL = test_train.data_dir, test_train.full_run, test_train.SMALL
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def smallm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "smallm", *args], capture_output=True, text=True, **kwargs)


def start_training(data_dir, run, flags):
    command = [sys.executable, "-m", "smallm", "train", "--data", str(data_dir), "--out", str(run), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, ready, timeout=600):
    """Poll until ready() (the run's files say which phase it is in) while the process is alive."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)


def stop(proc, signum=signal.SIGTERM) -> tuple[float, str, str]:
    """Send `signum`; return the seconds until the process exited, its stdout and stderr."""
    sent = time.time()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return time.time() - sent, out, err


def test_print_config_resolves_preset_file_and_both_flag_spellings(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("eval_iters: 3\nlearning_rate: 0.01\n")
    args = ["train", "--preset", "tiny", "--config", str(tmp_path / "c.yaml"), "--max_iters", "7"]
    assert main([*args, "--min-lr", "1e-3", "--compile", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = build_config("tiny", tmp_path / "c.yaml", {"max_iters": 7, "min_lr": 1e-3, "compile": True})
    assert printed == expected.to_dict()
    assert printed["eval_iters"] == 3 and printed["lr_decay_iters"] == 7 and printed["n_embd"] == 128


def test_unknown_flag_is_one_line_without_traceback():
    result = smallm("train", "--learning-rat", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["smallm: error: unrecognized arguments: --learning-rat 1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "no/such/dir"], "no prepared data at no/such/dir"),
        (["--learning-rate", "fast"], "learning_rate must be a number, got 'fast'"),
        (["--n-embd", "100", "--n-head", "3"], "divisible by n_head"),
        (["--gradient-accumulation-steps", "0"], "must be positive"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--resume", "--out", "no/such/run"], "nothing to resume in no/such/run"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_1(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("smallm train: error:")
    assert not (tmp_path / "runs").exists()  # nothing half-made


def test_ctrl_c_saves_last_and_resume_matches_uninterrupted(data_dir, tmp_path, full_run):
    run = tmp_path / "run"
    proc = start_training(data_dir, run, FLAGS)
    wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and any("loss" in r for r in rows(run)))
    _, out, err = stop(proc, signal.SIGINT)  # after the first training rows
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"smallm train --out {run} --resume" in out
    stopped_at = json.loads((run / "last" / "state.json").read_text())["step"]
    assert 0 < stopped_at < SMALL["max_iters"]

    resumed = smallm("train", "--out", str(run), "--resume", timeout=300)  # data and config from the run
    assert resumed.returncode == 0, resumed.stderr
    result, reference_rows = full_run[1], rows(full_run[0])
    final = rows(run)[-1]
    assert final["step"] == 12 and final["val_loss"] == pytest.approx(result["val_loss"], rel=1e-3)
    assert final["train_loss"] == pytest.approx(result["train_loss"], rel=1e-3)
    train_rows = [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]
    expected = [(r["step"], pytest.approx(r["loss"], rel=1e-3)) for r in reference_rows if "loss" in r]
    assert train_rows == expected  # every step once, same losses


def test_torchrun_two_cpu_processes_match_one_process(data_dir, tmp_path, full_run):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "smallm", "train", "--data", str(data_dir), "--out", str(run), *FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("done: 12 steps") == 1  # rank 0 speaks
    reference_rows = rows(full_run[0])
    ddp_rows = rows(run)
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in reference_rows]  # written once, by rank 0
    for mine, theirs in zip(ddp_rows, reference_rows, strict=True):
        for key in ("loss", "val_loss", "train_loss"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4), (mine, theirs)
    assert mine["tokens"] == theirs["tokens"]  # the same global batch


def test_torchrun_with_a_time_budget_follows_one_plan_on_both_ranks(data_dir, tmp_path):
    """Rank 0 decides when the plan is fixed and what it is: ranks that timed their steps differently would
    otherwise wait for each other forever or stop at different steps."""
    run = tmp_path / "run"
    flags = [f for f in FLAGS if not f.startswith(("--max-iters", "--eval-interval"))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "smallm", "train", "--data", str(data_dir), "--out", str(run), *flags, "--time=8s"]
    command += ["--eval-interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = [line for line in result.stdout.splitlines() if " steps of " in line and "plan:" in line]
    assert len(planned) == 1  # rank 0 speaks, once
    plan = json.loads((run / "last" / "state.json").read_text())["plan"]
    assert rows(run)[-1]["step"] == plan["max_iters"] > 3
    assert yaml.safe_load((run / "config.yaml").read_text())["max_iters"] == plan["max_iters"]


def test_sigterm_during_evaluation_stops_within_seconds_and_resume_redoes_the_evaluation(
    data_dir, tmp_path, full_run
):
    """An evaluation of 10 million batches (hours) is under way at step 0: SIGTERM stops it at the next
    batch, last/ holds step 0 marked unevaluated, and the resumed run (with the reference's 2 eval batches)
    evaluates step 0 first and ends exactly where the uninterrupted run did."""
    run = tmp_path / "run"
    proc = start_training(data_dir, run, [*FLAGS, "--eval-iters=10000000"])
    wait_for(proc, lambda: (run / "config.yaml").is_file())  # written just before the step-0 evaluation
    time.sleep(1.0)  # well into it
    seconds, out, err = stop(proc)
    assert proc.returncode == 130, err
    assert seconds < 60 and "evaluating" in err and "Traceback" not in err  # ~2 s on an idle CPU
    assert "stopped on request during the evaluation at step 0" in out
    assert f"smallm train --out {run} --resume" in out
    state = json.loads((run / "last" / "state.json").read_text())
    assert (state["step"], state["evaluated"]) == (0, False)
    assert not (run / "metrics.jsonl").exists()  # no evaluation row: it was not finished

    resumed = smallm("train", "--out", str(run), "--resume", "--eval-iters", "2", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(full_run[0], approx=True)


def losses(run, approx=False):
    """Each metrics row's step and losses (timings differ between runs)."""
    same = (lambda x: x if x is None else pytest.approx(x, rel=1e-6)) if approx else (lambda x: x)
    return [(r["step"], *(same(r.get(k)) for k in ("loss", "val_loss", "train_loss"))) for r in rows(run)]


# 100 micro-batches per step make a step long enough to be caught in the middle of from outside.
LONG_STEPS = {**SMALL, "gradient_accumulation_steps": 100, "max_iters": 2, "warmup_iters": 1}


def test_sigterm_during_gradient_accumulation_drops_the_step_and_resume_redoes_it(data_dir, tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    proc = start_training(data_dir, run, [f"--{k.replace('_', '-')}={v}" for k, v in LONG_STEPS.items()])
    wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and any(r.get("step") == 1 for r in rows(run)))
    seconds, out, err = stop(proc)  # step 2 has just begun
    assert proc.returncode == 130, err
    assert seconds < 60 and "Traceback" not in err
    # (no time-left line to expect: it comes after step 2, or after step 1 only when that took > 10 s)
    assert "stopped on request during step 2 at micro-batch" in out
    state = json.loads((run / "last" / "state.json").read_text())
    assert (state["step"], state["evaluated"]) == (1, True)  # the step under way left no trace
    assert [r["step"] for r in rows(run)] == [0, 1]

    resumed = smallm("train", "--out", str(run), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    train(build_config("seed", overrides=LONG_STEPS), data_dir, reference, progress=False)
    assert losses(run) == losses(reference, approx=True)
