"""smallm.train: the config, the schedule, the optimizer groups, and short CPU runs on tiny generated data."""

import json
import math
import random
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from smallm.checkpoint import load_model, load_training_state
from smallm.data import prepare
from smallm.errors import SmallmError
from smallm.model import GPT
from smallm.train import (
    PRESETS,
    TrainConfig,
    build_config,
    configure_optimizers,
    get_lr,
    resume_config,
    train,
)

# A model and run small enough for a few seconds on a CPU (the GPT-2 head, 50,257 x 32, dominates), with
# dropout so that resuming and DDP must reproduce the random masks too; a metrics row per step.
SMALL = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1, batch_size=4, gradient_accumulation_steps=2,
    max_iters=12, learning_rate=3e-3, min_lr=3e-4, warmup_iters=3, eval_interval=6, eval_iters=2,
    log_interval=1, device="cpu", dtype="float32",
)  # fmt: skip


def write_stories(path, n=300, seed=0):
    """TinyStories-shaped text: short template stories, learnable in a few dozen steps."""
    rng = random.Random(seed)
    names = ["Tim", "Lily", "Sam", "Mia", "Ben", "Sue"]
    animals = ["cat", "dog", "bird", "fish", "frog", "bunny"]
    things = ["ball", "kite", "box", "hat", "cake", "tree"]
    stories = []
    for _ in range(n):
        name, animal, thing = rng.choice(names), rng.choice(animals), rng.choice(things)
        stories.append(
            f"Once upon a time there was a little {animal} named {name}. {name} had a red {thing}. "
            f"One day {name} lost the {thing}. {name} was sad. Then a friend found the {thing}. "
            f"{name} was happy and said thank you. The end."
        )
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")


_SHARED = {}  # test_train_cli uses these fixtures too: make the data and the reference run once per session


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    if "data" not in _SHARED:
        root = tmp_path_factory.mktemp("data")
        write_stories(root / "stories.txt")
        prepare(out_dir=root / "prepared", text_files=[root / "stories.txt"], val_fraction=0.1, workers=1)
        _SHARED["data"] = root / "prepared"
    return _SHARED["data"]


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the config ----------------------------------------------------------------------------------------


def test_seed_preset_resolves_to_the_seed_document():
    c = build_config("seed")
    assert (c.batch_size, c.gradient_accumulation_steps, c.block_size) == (32, 32, 128)
    assert c.batch_size * c.gradient_accumulation_steps * c.block_size == 131_072  # tokens per optimizer step
    assert (c.max_iters, c.warmup_iters, c.lr_decay_iters) == (20_000, 1_000, 20_000)
    assert (c.learning_rate, c.beta1, c.beta2, c.weight_decay, c.grad_clip, c.dropout) == (
        1e-4, 0.9, 0.95, 0.1, 0.5, 0.1
    )  # fmt: skip
    assert 0 < c.min_lr < c.learning_rate  # a floor below the peak, not the notebook's 5e-4
    assert (c.n_layer, c.n_head, c.n_embd, c.bias) == (6, 6, 384, True)
    assert build_config() == c  # seed is the default


def test_presets_files_and_flags_stack_in_order(tmp_path):
    config_file = tmp_path / "c.yaml"
    # YAML reads 1e-3 as a string; the config coerces it
    config_file.write_text("learning_rate: 1e-3\nmin_lr: 1e-4\nmax_iters: 300\nbatch_size: 4\n")
    c = build_config("tiny", config_file, {"batch_size": "8", "compile": "false"})
    assert c.n_embd == PRESETS["tiny"]["n_embd"]  # from the preset
    assert (c.learning_rate, c.max_iters, c.lr_decay_iters) == (1e-3, 300, 300)  # the file; decay follows
    assert c.batch_size == 8 and c.compile is False  # flags last


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"min_lr": 1e-3, "learning_rate": 1e-4}, "min_lr"),
        ({"n_embd": 100, "n_head": 3}, "divisible"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"dtype": "float8"}, "dtype"),
    ],
)
def test_bad_config_values_are_one_clear_error(values, message):
    with pytest.raises(SmallmError, match=message):
        build_config("seed", overrides=values)


def test_unknown_field_in_config_file_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(SmallmError, match="learning_rat"):
        build_config("seed", tmp_path / "c.yaml")


# ---- schedule and optimizer ------------------------------------------------------------------------------


def test_schedule_warms_up_linearly_peaks_then_cosines_to_min_lr():
    c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=1100)
    assert get_lr(0, c) == pytest.approx(1e-5)  # first warmup step: lr / warmup
    assert get_lr(49, c) == pytest.approx(5e-4)
    assert get_lr(99, c) == pytest.approx(1e-3)  # end of warmup: the peak
    assert get_lr(100, c) == pytest.approx(1e-3)
    assert get_lr(600, c) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    assert get_lr(1100, c) == pytest.approx(1e-4)  # the floor at lr_decay_iters ...
    assert get_lr(5000, c) == pytest.approx(1e-4)  # ... and after it
    lrs = [get_lr(s, c) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and max(lrs) <= 1e-3


def test_weight_decay_applies_to_matrices_only(small_config):
    model = GPT(small_config)
    (optimizer,) = configure_optimizers(model, TrainConfig(weight_decay=0.1), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert "transformer.wte.weight" in {names[id(p)] for p in decayed["params"]}
    assert {names[id(p)] for p in plain["params"]} >= {
        "transformer.ln_f.weight",
        "transformer.h.0.attn.c_attn.bias",
    }
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))  # tied head once


# ---- runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted SMALL run in one process: the reference for resumed and DDP runs (test_train_cli)."""
    if "full" not in _SHARED:
        run = tmp_path_factory.mktemp("full") / "run"
        _SHARED["full"] = run, train(build_config("seed", overrides=SMALL), data_dir, run, progress=False)
    return _SHARED["full"]


def test_tiny_preset_learns_in_a_short_cpu_run(data_dir, tmp_path):
    # the preset's model, learning rate and warmup; a smaller batch and fewer steps keep the test short
    short = dict(batch_size=4, max_iters=20, eval_interval=20, eval_iters=2, device="cpu")
    config = build_config("tiny", overrides=short)
    result = train(config, data_dir, tmp_path / "run", progress=False)
    evals = [r for r in read_rows(tmp_path / "run") if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] > 10.0  # ~ln(50257) at initialization
    assert result["val_loss"] < evals[0]["val_loss"] - 2.5  # learned the template stories
    assert result["step"] == 20 and not result["interrupted"]


def test_first_line_says_dtype_and_why_and_tf32_comes_back_after_training(
    data_dir, tmp_path, monkeypatch, capsys
):
    import smallm.device

    monkeypatch.setattr(smallm.device, "cpu_bf16_flag", lambda: "avx512_bf16")
    config = build_config("seed", overrides={**SMALL, "dtype": "auto", "max_iters": 1, "eval_iters": 1})
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for before in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
            train(config, data_dir, tmp_path / f"run-{before}", progress=False)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
                before,
                before,
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    first = capsys.readouterr().out.splitlines()[0]
    assert "on cpu, dtype bfloat16 (auto: the CPU has avx512_bf16)" in first


def test_torchrun_on_mps_is_refused_before_any_process_waits(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SmallmError, match="torchrun on MPS is not supported"):
        train(build_config("seed", overrides={**SMALL, "device": "mps"}), data_dir, tmp_path / "run")


def test_run_directory_holds_config_metrics_plot_and_checkpoints(data_dir, full_run):
    run, result = full_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved.pop("data_dir") == str(data_dir)
    assert TrainConfig(**saved) == build_config("seed", overrides=SMALL)
    rows = read_rows(run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert set(train_rows[0]) == {"step", "tokens", "elapsed", "loss", "lr", "tokens_per_sec"}
    assert train_rows[-1]["tokens"] == 12 * 4 * 32 * 2  # steps x batch x block x accumulation
    assert [r["step"] for r in eval_rows] == [0, 6, 12]
    assert {"step", "val_loss", "train_loss"} <= set(eval_rows[0])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_model(run / "best").config.n_embd == 32
    best = json.loads((run / "best" / "config.json").read_text())
    assert best["val_loss"] == pytest.approx(result["best_val_loss"]) == min(r["val_loss"] for r in eval_rows)
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] == 12 and state["best_val_loss"] == pytest.approx(result["best_val_loss"])
    assert load_file(str(run / "last" / "rng.safetensors"))["torch"].dtype == torch.uint8
    assert load_file(str(run / "last" / "optimizer.safetensors"))["0.exp_avg"].shape == (50257, 32)
    assert not list(run.glob(".*"))  # no temporary files left behind
    with pytest.raises(SmallmError, match="already holds a run"):
        train(build_config("seed", overrides=SMALL), data_dir, run, progress=False)


def test_resume_may_extend_max_iters_but_not_the_shape(data_dir, tmp_path, full_run):
    run = tmp_path / "run"
    shutil.copytree(full_run[0], run)
    config, _ = resume_config(run, {"max_iters": 14})
    assert config.max_iters == 14 and config.lr_decay_iters == 12  # past the decay: min_lr
    result = train(config, data_dir, run, resume=True, progress=False)
    assert result["step"] == 14
    last_row = [r for r in read_rows(run) if "lr" in r][-1]
    assert last_row["step"] == 14 and last_row["lr"] == pytest.approx(config.min_lr)
    with pytest.raises(SmallmError, match="n-embd"):
        resume_config(run, {"n_embd": 64})


def test_default_out_is_a_timestamped_run_with_latest_link(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = build_config("seed", overrides={**SMALL, "max_iters": 1, "eval_iters": 1})
    result = train(config, data_dir, progress=False)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == (tmp_path / result["out_dir"]).resolve()
    assert (latest / "best" / "model.safetensors").is_file()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 7:  # from optimizer step 7 on (2 micro-steps per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(SmallmError, match=r"training loss is nan at step 7.*last good checkpoint"):
        train(build_config("seed", overrides=SMALL), data_dir, run, progress=False)
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 6  # the evaluation before
    weights = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert math.isfinite(json.loads((run / "best" / "config.json").read_text())["val_loss"])


# ---- stopping when asked, failing cleanly -----------------------------------------------------------------


def test_a_second_ctrl_c_during_the_save_quits_at_once_and_keeps_the_previous_last(
    data_dir, tmp_path, monkeypatch
):
    """Ctrl-C in step 8 asks to stop; a second Ctrl-C arrives while last/ for step 7 is being written: the
    write is dropped, and last/ still holds step 6 (the evaluation before), complete and loadable."""
    import os
    import signal

    import smallm.checkpoint

    forward, write_model = GPT.forward, smallm.checkpoint._write_model
    micro_batches = {"n": 0}

    def forward_then_ctrl_c(self, idx, targets=None, **kwargs):
        if self.training:
            micro_batches["n"] += 1
            if micro_batches["n"] == 2 * 7 + 1:  # the first micro-batch of step 8
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, idx, targets, **kwargs)

    def write_model_then_ctrl_c(directory, model, extra_config, tokenizer_file=None):
        if extra_config == {"step": 7}:  # the stop's own save of last/
            os.kill(os.getpid(), signal.SIGINT)
        write_model(directory, model, extra_config, tokenizer_file)

    monkeypatch.setattr(GPT, "forward", forward_then_ctrl_c)
    monkeypatch.setattr(smallm.checkpoint, "_write_model", write_model_then_ctrl_c)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's default, when started in the background
    with pytest.raises(KeyboardInterrupt):
        train(build_config("seed", overrides=SMALL), data_dir, run, progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    assert not list(run.glob(".*"))  # the interrupted write left no temporary directory
    config = build_config("seed", overrides=SMALL)
    model = GPT(config.model_config(50257))
    state = load_training_state(run / "last", model, configure_optimizers(model, config, "cpu"))
    assert (state["step"], state["evaluated"]) == (6, True)


@pytest.mark.parametrize("failing", ["checkpoint", "plot"])
def test_a_full_disk_is_one_line_keeps_the_checkpoints_and_resumes_exactly(
    data_dir, tmp_path, monkeypatch, full_run, failing
):
    """Once last/ is written at step 6 the disk is full: the next checkpoint (step 12) or plot (step 6) write
    raises ENOSPC. Training stops with one line, no temporary file is left, best/ and last/ (step 6) load, and
    a resume once space is back ends exactly where the uninterrupted run did."""
    import errno

    import safetensors.torch
    from matplotlib.figure import Figure

    save_file, savefig = safetensors.torch.save_file, Figure.savefig
    last_writes = {"n": 0}

    def disk_full():
        return last_writes["n"] >= 2 * 3  # last/ has been written at steps 0 and 6 (3 files each)

    def save_file_until_full(tensors, filename, metadata=None):
        if failing == "checkpoint" and disk_full():
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, filename, metadata)
        last_writes["n"] += ".last.tmp" in filename

    def savefig_until_full(self, path, **kwargs):
        if failing == "plot" and disk_full():
            path.write_bytes(b"\x89PNG half")  # what a full disk leaves: part of the temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        savefig(self, path, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_until_full)
    monkeypatch.setattr(Figure, "savefig", savefig_until_full)
    run = tmp_path / "run"
    with pytest.raises(SmallmError) as failure:
        train(build_config("seed", overrides=SMALL), data_dir, run, progress=False)
    message = str(failure.value)
    written = run / ("loss.png" if failing == "plot" else "")
    assert "\n" not in message and message.startswith(f"cannot write {written}")
    assert "No space left on device" in message and "free there" in message
    assert f"smallm train --out {run} --resume" in message
    assert not list(run.glob(".*"))  # no temporary file or directory left
    assert load_model(run / "best").config.n_embd == 32
    assert "holds step 6" in message and json.loads((run / "last" / "state.json").read_text())["step"] == 6

    monkeypatch.undo()  # space is back
    config, _ = resume_config(run, {})
    result = train(config, data_dir, run, resume=True, progress=False)
    assert result["val_loss"] == pytest.approx(full_run[1]["val_loss"], rel=1e-6)
    assert [r["step"] for r in read_rows(run)] == [r["step"] for r in read_rows(full_run[0])]


def test_time_left_says_weeks_for_the_seed_recipe_on_a_slow_cpu():
    from smallm.train import _time_left

    seed = build_config("seed")  # 20,000 steps, evaluated every 500
    line = _time_left(2, step_seconds=140.0, tokens_per_step=131_072, eval_seconds=600.0, config=seed)
    assert line.startswith("speed: 936 tokens/s, 140 s/step; the 19,998 steps left and 40 evaluations")
    assert "take about 4.7 weeks" in line  # (19,998 x 140 s + 40 x 600 s) / 7 days
