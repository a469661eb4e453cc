"""The training recipe: budgets (--tokens, --time) and their plan, Muon + AdamW groups, the schedules, the
`fast` preset, and resuming exactly with both optimizers."""

import dataclasses
import json
import signal

import pytest
import test_train
import torch
import yaml
from safetensors.torch import load_file

import smallm.device
import smallm.muon
import smallm.train
from smallm.cli import main
from smallm.errors import SmallmError
from smallm.model import GPT
from smallm.muon import Muon, newton_schulz, pick_form
from smallm.train import (
    TrainConfig,
    build_config,
    configure_optimizers,
    get_lr,
    plan_due,
    plan_steps,
    plan_time,
    train,
)
from smallm.train_config import parse_duration, parse_tokens

data_dir = test_train.data_dir  # the session's small prepared stories
read_rows = test_train.read_rows

# A small model on the `fast` recipe: Muon + AdamW, warmup-stable-decay, no dropout.
FAST_SMALL = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
    device="cpu", dtype="float32",
)  # fmt: skip


# ---- budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, tokens",
    [("380k", 380_000), ("82M", 82_000_000), ("1.5B", 1_500_000_000), ("500K", 500_000), ("4096", 4096),
     ("1_000", 1000)],
)  # fmt: skip
def test_token_budgets_parse(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("20m", 1200), ("2h", 7200), ("1h30m", 5400), ("45", 45), ("0.5h", 1800)]
)
def test_time_budgets_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--tokens", "lots", "--tokens takes a count like 380k, 82M or 1.5B, not 'lots'"),
        ("--tokens", "-5k", "--tokens takes a count"),
        ("--tokens", "12x", "--tokens takes a count"),
        ("--time", "soon", "--time takes a duration like 90s, 20m, 2h or 1h30m, not 'soon'"),
        ("--time", "0s", "--time takes a duration"),
        ("--time", "5d", "--time takes a duration"),
    ],
)
def test_bad_budgets_are_one_line(flag, value, message, capsys):
    assert main(["train", "--preset", "fast", f"{flag}={value}", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_both_budgets_at_once_are_refused():
    with pytest.raises(SmallmError, match="one budget"):
        build_config("fast", overrides={"tokens": "1M", "time": "5m"})


def test_a_token_budget_sets_the_steps_and_fits_warmup_and_decay_to_them():
    config = build_config("seed", overrides={"tokens": "82M"})  # 131,072 tokens per step
    assert plan_steps(config, config.tokens) == dict(
        max_iters=626, batch_size=32, gradient_accumulation_steps=32, warmup_iters=62, lr_decay_iters=626
    )  # 1,000 warmup steps would be longer than the run: at most a tenth of it


def test_min_steps_grows_the_batch_with_the_budget_but_never_below_min_steps():
    config = build_config("fast")  # 4 x 128 tokens per step, min_steps 512, micro-batches up to 8

    def shape(plan):
        return plan["batch_size"], plan["gradient_accumulation_steps"], plan["max_iters"]

    assert shape(plan_steps(config, 380_000)) == (4, 1, 742)  # one epoch: small steps
    assert shape(plan_steps(config, 760_000)) == (8, 1, 742)  # the batch grows first, in one micro-batch
    notebook = plan_steps(config, 82_000_000)
    assert shape(notebook) == (8, 128, 626)  # then accumulation: 131,072 tokens per step
    assert 82_000_000 / (256 * 1024) < config.min_steps <= notebook["max_iters"]  # doubling again: too few
    gpu = build_config("fast", overrides={"batch_size": 64})
    assert plan_steps(gpu, 82_000_000)["gradient_accumulation_steps"] == 16  # the same tokens per step
    custom = TrainConfig(batch_size=8, gradient_accumulation_steps=1, block_size=128, min_steps=100)
    assert plan_steps(custom, 1_000_000)["gradient_accumulation_steps"] == 8  # 122 steps; 16 would give 61
    assert plan_steps(custom, 1_000_000)["batch_size"] == 8  # max_batch_size 0: the micro-batch stays
    assert plan_steps(custom, 50_000)["gradient_accumulation_steps"] == 1  # never fewer than one micro-batch
    assert plan_steps(custom, 1_000_000, world_size=3)["gradient_accumulation_steps"] % 3 == 0


def test_a_time_budget_plans_the_steps_that_fit_from_measured_speed():
    config = TrainConfig(batch_size=8, block_size=128, gradient_accumulation_steps=1, eval_interval=50,
                         warmup_iters=20, max_iters=10**6)  # fmt: skip
    # 0.5 s per micro-batch, 0.1 s per update, the medians of steps with a slow start
    timed = dict(micro=[0.9, 0.7, 0.5, 0.5, 0.5], optimizer=[0.3, 0.1, 0.1, 0.1, 0.2])
    plan = plan_time(config, seconds_left=310.0, timed=timed, eval_seconds=5.0, step=5)
    # (310 - 5 for the final evaluation) / (0.6 s per step + 5 s every 50 steps) = 435.7: 435 steps after 5
    assert plan == dict(max_iters=440, batch_size=8, gradient_accumulation_steps=1, warmup_iters=20,
                        lr_decay_iters=440)  # fmt: skip
    grown = plan_time(TrainConfig(**{**config.to_dict(), "min_steps": 100}), 310.0, timed, 5.0, 5)
    assert grown["gradient_accumulation_steps"] == 4  # 610 micro-batches fit: 4 per step keeps >= 100 steps
    assert grown["max_iters"] - 5 == int(305 / (4 * 0.5 + 0.1 + 5 / 50))
    # micro-batches of 4 timed; the batch grows to max_batch_size first, its time (at most) in proportion
    small = TrainConfig(**{**config.to_dict(), "batch_size": 4, "min_steps": 100, "max_batch_size": 8})
    grown = plan_time(small, 310.0, timed, 5.0, 5)
    assert (grown["batch_size"], grown["gradient_accumulation_steps"]) == (8, 2)  # 155 steps of 2,048 tokens
    assert grown["max_iters"] - 5 == int(305 / (2 * 0.5 * 2 + 0.1 + 5 / 50))


@pytest.mark.parametrize("optimizer_seconds, batch", [(0.6, 8), (0.2, 4)])
def test_a_time_budget_doubles_its_steps_below_min_steps_where_that_buys_tokens(optimizer_seconds, batch):
    # 1.2 s per micro-batch of 4 x 128. With a 0.6 s update, 1,200 s fit 666 steps of 512 tokens or 400 of
    # 1,024 (fewer than min_steps, but 1.2x the tokens): the steps double; 2 x (8 x 128) would keep only 222
    # (< min_steps / 2). With a 0.2 s update 461 steps of 1,024 are only 1.08x the tokens: the steps stay.
    config = build_config("fast", overrides={"eval_interval": 10**6})  # 4 x 128, min_steps 512, batch up to 8
    timed = dict(micro=[1.2] * 10, optimizer=[optimizer_seconds] * 10)
    plan = plan_time(config, seconds_left=1200.0, timed=timed, eval_seconds=0.0, step=10)
    assert (plan["batch_size"], plan["gradient_accumulation_steps"]) == (batch, 1)
    assert plan["max_iters"] - 10 == int(1200 / (1.2 * batch / 4 + optimizer_seconds))


def test_a_time_budget_times_ten_steps_before_planning_unless_they_take_a_twentieth_of_it():
    timed = lambda n: dict(micro=[1.0] * n, optimizer=[0.1] * n)  # noqa: E731
    assert not plan_due(timed(2), spent=500.0, budget=600.0)  # never on fewer than three
    assert not plan_due(timed(3), spent=20.0, budget=900.0)  # 20 s of 900: time more
    assert plan_due(timed(3), spent=45.0, budget=900.0)  # a twentieth gone: plan now
    assert not plan_due(timed(9), spent=30.0, budget=900.0)
    assert plan_due(timed(10), spent=30.0, budget=900.0)


class FakeClock:
    """A wall clock that advances a fixed amount each time it is read: a time budget's plan then depends
    only on the code path, never on the machine's speed."""

    def __init__(self, tick: float, interrupt_at: int | None = None, slower: tuple = (None, 1.0)):
        self.now, self.tick, self.reads, self.interrupt_at = 1_000_000.0, tick, 0, interrupt_at
        self.slower = slower  # (from this read on, tick times this)

    def __call__(self) -> float:
        self.reads += 1
        if self.reads == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would: finish the step, save, stop
        if self.reads == self.slower[0]:
            self.tick *= self.slower[1]
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("min_steps, batch, accum", [(512, 4, 1), (40, 8, 2)])  # 40: the steps grow
def test_time_budget_plan_is_fixed_once_and_survives_resume(min_steps, batch, accum, data_dir, tmp_path,
                                                            monkeypatch):  # fmt: skip
    # The fake clock's steps take longer than the timed part of them, which a run would follow (next test):
    # here the plan stays as first made (replan false) for the resumed run to be comparable.
    overrides = {**FAST_SMALL, "time": "60s", "eval_interval": 5, "replan": False, "min_steps": min_steps}
    config = build_config("fast", overrides=overrides)
    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.25))
    whole = train(config, data_dir, tmp_path / "whole", progress=False)
    plan = json.loads((tmp_path / "whole" / "last" / "state.json").read_text())["plan"]
    assert whole["step"] == plan["max_iters"] > 10 and not whole["interrupted"]
    assert (plan["batch_size"], plan["gradient_accumulation_steps"]) == (batch, accum)  # micro-batch first
    last, before = [r for r in read_rows(tmp_path / "whole") if "loss" in r][-1:-3:-1]
    assert last["tokens"] - before["tokens"] == batch * 32 * accum * (last["step"] - before["step"])
    assert plan["lr_decay_iters"] == plan["max_iters"]
    saved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert saved["max_iters"] == plan["max_iters"] and saved["time"] == 60.0  # the plan is on record

    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.25, interrupt_at=120))
    stopped = train(config, data_dir, tmp_path / "split", progress=False)
    assert stopped["interrupted"] and 4 < stopped["step"] < plan["max_iters"]
    assert json.loads((tmp_path / "split" / "last" / "state.json").read_text())["plan"] == plan
    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=5.0))  # a far slower machine now ...
    resumed_config, _ = smallm.train.resume_config(tmp_path / "split")
    resumed = train(resumed_config, data_dir, tmp_path / "split", resume=True, progress=False)
    assert resumed["step"] == whole["step"]  # ... keeps the plan it made
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-4)
    losses = lambda run: [(r["step"], round(r["loss"], 4)) for r in read_rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_a_time_budget_follows_a_machine_that_slows_down_and_ends_on_time(data_dir, tmp_path, monkeypatch):
    config = build_config("fast", overrides={**FAST_SMALL, "time": "60s", "eval_interval": 5})
    assert config.replan  # the default
    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.05, slower=(400, 2.0)))
    once = dataclasses.replace(config, replan=False)  # first: the plan fixed once
    fixed = train(once, data_dir, tmp_path / "fixed", progress=False)
    planned = json.loads((tmp_path / "fixed" / "last" / "state.json").read_text())["plan"]["max_iters"]
    assert fixed["step"] == planned and fixed["elapsed"] > 60 * 1.2  # half the speed after read 400: late

    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.05, slower=(400, 2.0)))
    followed = train(config, data_dir, tmp_path / "followed", progress=False)
    plan = json.loads((tmp_path / "followed" / "last" / "state.json").read_text())["plan"]
    assert followed["step"] == plan["max_iters"] == plan["lr_decay_iters"] < planned  # redrawn, saved
    assert followed["elapsed"] == pytest.approx(60, rel=0.05)  # and on time
    assert (
        yaml.safe_load((tmp_path / "followed" / "config.yaml").read_text())["max_iters"] == plan["max_iters"]
    )
    lrs = [r["lr"] for r in read_rows(tmp_path / "followed") if "lr" in r]
    assert lrs[-1] == pytest.approx(config.min_lr, rel=0.01)  # the cosine still ends with the run


# ---- optimizers and schedules -----------------------------------------------------------------------------


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_once(small_config):
    model = GPT(small_config)
    adamw, muon = configure_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in adamw.param_groups)
    everything = in_muon + decayed + plain
    assert sorted(everything) == sorted(names.values())  # each parameter in exactly one group
    assert len(everything) == len(set(everything))
    assert set(in_muon) == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    assert "transformer.h.0.mlp.c_fc.weight" in in_muon and "transformer.h.1.attn.c_attn.weight" in in_muon
    assert set(decayed) == {"transformer.wte.weight", "transformer.wpe.weight"}  # the tied head is wte
    assert "transformer.h.0.ln_1.weight" in plain and "transformer.h.0.attn.c_attn.bias" in plain
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]


def test_muon_settings_reach_torch_muon_and_bad_ones_are_refused(small_config):
    config = TrainConfig(optimizer="muon", muon_momentum=0.9, muon_ns_steps=3)
    _, muon = configure_optimizers(GPT(small_config), config, "cpu")
    assert (muon.defaults["momentum"], muon.defaults["ns_steps"]) == (0.9, 3)
    with pytest.raises(SmallmError, match="muon_ns_steps must be in 1..99"):
        TrainConfig(muon_ns_steps=0)


@pytest.mark.parametrize("nesterov", [True, False])
def test_smallm_muon_in_bf16_is_torch_muon_bit_for_bit_and_fp32_is_the_same_update_finer(nesterov):
    # smallm.muon redoes torch.optim.Muon's step with a choice of Newton-Schulz dtype: in bf16 it must be
    # torch's own arithmetic (which it replaces everywhere), in fp32 the same update without bf16's rounding
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall, wide and square: the tall ones are transposed
    start = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(3)]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    settings["adjust_lr_fn"] = "match_rms_adamw"

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    theirs, torch_muon = run(lambda ps: torch.optim.Muon(ps, **settings))
    ours, smallm_muon = run(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **settings))
    fine, fine_muon = run(lambda ps: Muon(ps, ns_dtype=torch.float32, **settings))
    for a, b, c, w in zip(theirs, ours, fine, start, strict=True):
        assert torch.equal(a, b)
        moved, apart = (a - w).norm(), (c - a).norm()
        assert moved > 0.1 and 0 < apart < 0.05 * moved  # the same step, bf16's rounding aside
    for a, b, c in zip(theirs, ours, fine, strict=True):  # the same state: checkpoints move between them
        assert torch.equal(torch_muon.state[a]["momentum_buffer"], smallm_muon.state[b]["momentum_buffer"])
        # the momentum is the gradients' alone, whatever dtype the iterations ran in (nor scaled by them)
        assert torch.equal(torch_muon.state[a]["momentum_buffer"], fine_muon.state[c]["momentum_buffer"])
    orthogonal = newton_schulz(torch.randn(64, 16), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    singular = torch.linalg.svdvals(orthogonal)
    assert orthogonal.dtype == torch.float32 and singular.min() > 0.5 and singular.max() < 1.5


def test_muon_newton_schulz_dtype_follows_the_setting(small_config, monkeypatch):
    monkeypatch.setattr(smallm.device, "cpu_bf16_flag", lambda: None)  # a CPU that emulates bf16
    _, muon = configure_optimizers(GPT(small_config), TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(muon, torch.optim.Muon) and muon.ns_dtype == torch.float32
    config = TrainConfig(optimizer="muon", muon_ns_dtype="bfloat16")
    assert configure_optimizers(GPT(small_config), config, "cpu")[1].ns_dtype == torch.bfloat16
    with pytest.raises(SmallmError, match="muon_ns_dtype must be auto, bfloat16 or float32, got 'fp8'"):
        TrainConfig(muon_ns_dtype="fp8")


def test_adamw_alone_is_one_optimizer_with_every_parameter(small_config):
    model = GPT(small_config)
    (adamw,) = configure_optimizers(model, TrainConfig(), "cpu")
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_wsd_schedule_warms_up_holds_the_peak_then_decays_linearly():
    c = TrainConfig(schedule="wsd", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100,
                    decay_frac=0.4)  # fmt: skip
    assert get_lr(0, c) == pytest.approx(1e-4) and get_lr(9, c) == pytest.approx(1e-3)
    assert get_lr(10, c) == get_lr(59, c) == get_lr(60, c) == pytest.approx(1e-3)  # stable until 60
    assert get_lr(80, c) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the line
    assert get_lr(100, c) == get_lr(500, c) == pytest.approx(1e-4)
    lrs = [get_lr(s, c) for s in range(60, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_muon_rate_follows_the_schedule_scaled_to_its_own_peak(small_config):
    config = TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
    optimizers = configure_optimizers(GPT(small_config), config, "cpu")
    lr = smallm.train.set_lr(optimizers, 4, config)
    assert lr == pytest.approx(5e-4)
    assert [g["lr"] for g in optimizers[0].param_groups] == pytest.approx([5e-4, 5e-4])
    assert [g["lr"] for g in optimizers[1].param_groups] == pytest.approx([0.01])


# ---- the fast preset --------------------------------------------------------------------------------------


def test_fast_preset_is_the_seed_model_with_its_documented_recipe():
    fast, seed = build_config("fast"), build_config("seed")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
        assert getattr(fast, name) == getattr(seed, name)  # checkpoints, export and serving unchanged
    documented = dict(
        dropout=0.0, batch_size=4, gradient_accumulation_steps=1, optimizer="muon", grad_clip=1.0, beta1=0.8,
        beta2=0.999, muon_lr=4.5e-3, muon_momentum=0.9, learning_rate=3e-3, min_lr=9e-4, sampling="epoch",
        min_steps=512, max_batch_size=8, ema=0.036,
    )  # fmt: skip
    assert {k: getattr(fast, k) for k in documented} == documented
    assert fast.learning_rate > seed.learning_rate and fast.warmup_iters < seed.warmup_iters
    assert build_config("seed") == TrainConfig()  # the seed preset stays exactly the seed document


def test_fast_learns_clearly_faster_than_the_seed_hyperparameters(data_dir, tmp_path):
    """Same small model, data and steps: only the recipe differs. Two seeds each, so the margin is
    measured against seed-to-seed noise."""
    steps = dict(tokens=40 * 4 * 32, eval_interval=40)  # 40 steps of 4 x 32 tokens, warmup and decay fitted
    shape = {k: FAST_SMALL[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
    system = dict(eval_iters=4, log_interval=10, device="cpu", dtype="float32")
    losses = {}
    for preset in ("fast", "seed"):
        for seed in (1, 2):
            overrides = {**shape, **system, **steps, "seed": seed}
            if preset == "seed":
                overrides |= dict(gradient_accumulation_steps=1, dropout=0.0)  # the same tokens per step
            result = train(build_config(preset, overrides=overrides), data_dir, tmp_path / f"{preset}{seed}",
                           progress=False)  # fmt: skip
            losses.setdefault(preset, []).append(result["val_loss"])
    noise = max(abs(losses["fast"][0] - losses["fast"][1]), abs(losses["seed"][0] - losses["seed"][1]))
    margin = min(losses["seed"]) - max(losses["fast"])
    assert margin > 2.0 and margin > 5 * noise, losses


def test_resume_with_muon_and_wsd_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    overrides = {**FAST_SMALL, "max_iters": 12, "eval_interval": 4, "schedule": "wsd", "dropout": 0.1}
    config = build_config("fast", overrides=overrides)
    whole = train(config, data_dir, tmp_path / "whole", progress=False)
    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.01, interrupt_at=40))
    stopped = train(config, data_dir, tmp_path / "split", progress=False)
    assert stopped["interrupted"]
    monkeypatch.undo()
    assert any(k.startswith("1:") and k.endswith("momentum_buffer")
               for k in load_file(str(tmp_path / "split" / "last" / "optimizer.safetensors")))  # fmt: skip
    resumed = train(config, data_dir, tmp_path / "split", resume=True, progress=False)
    assert resumed["step"] == 12
    losses = lambda run: [(r["step"], round(r["loss"], 5)) for r in read_rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)


# ---- a moving average of the weights (--ema) ------------------------------------------------------------


def test_ema_half_life_is_a_fraction_of_the_run():
    config = TrainConfig(ema=0.1, max_iters=200)
    assert smallm.train.ema_decay(config) ** 20 == pytest.approx(0.5)  # 20 steps = a tenth of 200
    assert smallm.train.ema_decay(TrainConfig(ema=0.001, max_iters=100)) == 0.5  # at least one step
    with pytest.raises(SmallmError, match="ema must be in"):
        TrainConfig(ema=1.5)


def test_ema_run_evaluates_and_saves_the_average_of_the_weights_it_trains(data_dir, tmp_path, monkeypatch):
    overrides = {**FAST_SMALL, "max_iters": 6, "eval_interval": 1, "ema": 0.25}  # half-life 1.5 steps
    config = build_config("fast", overrides=overrides)
    saved = []  # (trained, average) at every evaluation's checkpoint: steps 0..6

    def save_training_state(directory, model, optimizers, state, *args, averaged=None, **kwargs):
        copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        saved.append((copy(model), copy(averaged)))
        return real(directory, model, optimizers, state, *args, averaged=averaged, **kwargs)

    real = smallm.train.save_training_state
    monkeypatch.setattr(smallm.train, "save_training_state", save_training_state)
    averaged = train(config, data_dir, tmp_path / "ema", progress=False)
    monkeypatch.undo()
    decay = smallm.train.ema_decay(config)
    assert len(saved) == 7 and 0.5 < decay < 0.7
    for name in saved[0][0]:
        assert torch.equal(saved[0][1][name], saved[0][0][name])  # step 0: the average is the init
        assert torch.equal(saved[1][1][name], saved[1][0][name])  # the first update copies the weights
        for (_, before), (weights, average) in zip(saved[1:-1], saved[2:], strict=True):
            expected = decay * before[name] + (1 - decay) * weights[name]
            torch.testing.assert_close(average[name], expected, rtol=1e-5, atol=1e-7)
    # the average never feeds back into training: the same losses and trained weights as a run without it
    plain = train(dataclasses.replace(config, ema=0.0), data_dir, tmp_path / "plain", progress=False)
    losses = lambda run: [r["loss"] for r in read_rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "ema") == losses(tmp_path / "plain")
    last = tmp_path / "ema" / "last"
    trained, given = load_file(str(last / "trained.safetensors")), load_file(str(last / "model.safetensors"))
    plain_weights = load_file(str(tmp_path / "plain" / "last" / "model.safetensors"))
    assert all(torch.equal(trained[k], plain_weights[k]) for k in trained)
    assert not all(torch.equal(given[k], trained[k]) for k in trained)  # last/'s model is the average
    assert averaged["val_loss"] != pytest.approx(plain["val_loss"])  # and it is what was evaluated
    best = tmp_path / "ema" / "best"
    best_step = json.loads((best / "config.json").read_text())["step"]
    best_weights = load_file(str(best / "model.safetensors"))
    assert all(torch.equal(best_weights[k], saved[best_step][1][k]) for k in best_weights)  # best/: too


def test_resume_with_ema_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    config = build_config("fast", overrides={**FAST_SMALL, "max_iters": 12, "eval_interval": 4, "ema": 0.2})
    whole = train(config, data_dir, tmp_path / "whole", progress=False)
    monkeypatch.setattr(smallm.train, "clock", FakeClock(tick=0.01, interrupt_at=40))
    assert train(config, data_dir, tmp_path / "split", progress=False)["interrupted"]
    monkeypatch.undo()
    with pytest.raises(SmallmError, match="keeps a moving average of the weights"):
        train(dataclasses.replace(config, ema=0.0), data_dir, tmp_path / "split", resume=True, progress=False)
    resumed = train(config, data_dir, tmp_path / "split", resume=True, progress=False)
    assert resumed["step"] == 12 and resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    for name in ("model.safetensors", "trained.safetensors"):
        a, b = (load_file(str(tmp_path / run / "last" / name)) for run in ("whole", "split"))
        assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a), name


@pytest.mark.parametrize("form, fp32_error", [("gram", 1e-3), ("eigh", 5e-3)])  # measured: 4e-4, 2.5e-3
def test_reordered_newton_schulz_is_the_same_iteration(form, fp32_error):
    # The Gram and eigendecomposition forms reorder torch's iteration around the m x m Gram matrix: in fp64
    # they agree with it to rounding, and in fp32 stay close to fp64 even on an ill-conditioned matrix
    # (singular values from 1 to 1e-6; torch's own bf16 iteration lands ~1e-1 from it)
    torch.manual_seed(0)
    coefficients = (3.4445, -4.7750, 2.0315)
    u, _ = torch.linalg.qr(torch.randn(96, 32, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    tall = (u * torch.logspace(0, -6, 32, dtype=torch.float64)) @ v.T  # 96 x 32, iterated as 32 x 96
    for steps in (5, 1):
        exact = newton_schulz(tall, coefficients, steps, 1e-7, torch.float64, form="standard")
        reordered = newton_schulz(tall, coefficients, steps, 1e-7, torch.float64, form=form)
        assert (reordered - exact).abs().max() < 1e-9
        fine = newton_schulz(tall.float(), coefficients, steps, 1e-7, torch.float32, form=form)
        assert fine.dtype == torch.float32 and (fine.double() - exact).norm() < fp32_error * exact.norm()
    broken = tall.float().clone()
    broken[3, 5] = float("inf")  # a non-finite gradient gives a NaN update, as torch's iteration does
    assert newton_schulz(broken, coefficients, 5, 1e-7, torch.float32, form=form).isnan().all()


def test_newton_schulz_form_is_picked_where_it_pays():
    # bf16: torch's own arithmetic; fp32 on a CPU: the eigendecomposition; fp32 elsewhere (no fast eigh):
    # the Gram form on matrices at least twice as wide as tall
    assert pick_form(torch.zeros(32, 96, dtype=torch.bfloat16)) == "standard"
    assert pick_form(torch.zeros(32, 32)) == pick_form(torch.zeros(32, 96, dtype=torch.float64)) == "eigh"
    shapes = [(32, 96), (32, 64), (40, 64), (32, 32)]
    on_gpu = [pick_form(torch.zeros(shape, device="meta")) for shape in shapes]
    assert on_gpu == ["gram", "gram", "standard", "standard"]
