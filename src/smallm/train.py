"""Training: one loop from disk to loss, on one device or many, resumable.

The config and its presets live in smallm.train_config (re-exported here). Read top to bottom: the
learning-rate schedule and the optimizer, evaluation, devices, then `train`: checks, processes, model,
data, the loop (accumulate, clip, step, log, evaluate, checkpoint) and its three exits (finished,
interrupted, loss not finite).

Under `torchrun` the same code trains with DistributedDataParallel: every rank runs this file, gradient
accumulation is divided across ranks so the global batch is unchanged, and only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from smallm.checkpoint import (
    load_model,
    load_training_state,
    save_model,
    save_training_state,
    write_text,
    writing,
)
from smallm.data import Batches, read_meta
from smallm.device import peak_flops, pick_device, pick_dtype, pick_ns_dtype
from smallm.errors import SmallmError, WriteFailed
from smallm.generate import resolve_checkpoint
from smallm.model import GPT
from smallm.muon import Muon
from smallm.tokenizer import TOKENIZER_FILE, check_same_tokenizer
from smallm.train_config import (  # noqa: F401  (re-exported: smallm.train.TrainConfig etc.)
    FIELDS,
    PRESETS,
    SHAPE_FIELDS,
    TrainConfig,
    build_config,
    config_to_yaml,
    grow_steps,
    plan_steps,
    read_config_file,
    resume_config,
)

clock = time.time  # the wall clock that time budgets and tokens/s read (tests replace it)

# ---- schedule and optimizer ----------------------------------------------------------------------------


def get_lr(step: int, config: TrainConfig) -> float:
    """AdamW's learning rate for optimizer step `step` (0-based): linear warmup, then a cosine down to
    min_lr at lr_decay_iters (schedule "cosine") or the peak held until the last decay_frac of the run and
    a straight line down to min_lr (schedule "wsd", warmup-stable-decay); flat at min_lr after that.
    Muon's rate follows the same curve, scaled by muon_lr / learning_rate."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / config.warmup_iters
    if step >= config.lr_decay_iters:
        return config.min_lr
    if config.schedule == "wsd":
        decay_start = max(config.warmup_iters, (1 - config.decay_frac) * config.lr_decay_iters)
        if step < decay_start:
            return config.learning_rate
        coeff = (config.lr_decay_iters - step) / (config.lr_decay_iters - decay_start)  # 1 -> 0
    else:
        progress = (step - config.warmup_iters) / (config.lr_decay_iters - config.warmup_iters)  # 0 -> 1
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def configure_optimizers(model: torch.nn.Module, config: TrainConfig, device: torch.device | str) -> list:
    """The optimizers, AdamW first (set_lr gives each its rate for a step).

    adamw: AdamW for everything, weight decay on matrices (>= 2-D: Linear weights, embeddings) and none on
    biases and LayerNorm gains; PyTorch's fused kernel on CUDA and CPU.
    muon: torch.optim.Muon for the blocks' 2-D matrices (attention and MLP weights), which it updates with
    orthogonalized momentum, its Newton-Schulz iterations in pick_ns_dtype's dtype (smallm.muon); AdamW, as
    above, for the embeddings (and so the tied head), gains and biases.
    """
    device = torch.device(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied head counted once
    optimizers = []
    if config.optimizer == "muon":
        hidden = [p for n, p in named if p.dim() == 2 and n.startswith("transformer.h.")]
        muon = Muon(
            hidden,
            ns_dtype=getattr(torch, pick_ns_dtype(config.muon_ns_dtype, device)[0]),
            lr=config.muon_lr,
            weight_decay=config.weight_decay,
            momentum=config.muon_momentum,
            ns_steps=config.muon_ns_steps,
            adjust_lr_fn="match_rms_adamw",  # rates on AdamW's scale: 0.2 * sqrt(max(A, B)) per matrix
        )
        optimizers.append(muon)
        named = [(n, p) for n, p in named if not any(p is q for q in hidden)]
    params = [p for _, p in named]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (config.beta1, config.beta2)
    # One fused kernel instead of a loop over tensors: on CUDA, and on CPU, where it is ~5x faster here.
    fused = device.type in ("cuda", "cpu")
    optimizers.insert(0, torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=fused))
    return optimizers


def set_lr(optimizers: list, step: int, config: TrainConfig) -> float:
    """Set every group's rate for `step` (its optimizer's peak times the schedule); returns AdamW's."""
    lr = get_lr(step, config)
    for optimizer in optimizers:
        peak = config.muon_lr if isinstance(optimizer, torch.optim.Muon) else config.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = peak * lr / config.learning_rate
    return lr


def ema_decay(config: TrainConfig) -> float:
    """The weight average's decay per step: a half-life of `ema` x the run's steps (at least one step)."""
    return 0.5 ** (1 / max(1.0, config.ema * config.max_iters))


PLAN_STEPS = (3, 10)  # a time budget's plan: at least 3 timed steps, 10 unless they take 5% of the budget


def plan_due(timed: dict, spent: float, budget: float) -> bool:
    """Whether enough steps are timed to fix a time budget's plan: the first steps after the first evaluation
    run up to ~25% slower than the rest here (three alone once planned a run that ended 13% early), so time
    ten, or at least three when ten would use more than a twentieth of the budget."""
    steps = len(timed["micro"])
    return steps >= PLAN_STEPS[1] or (steps >= PLAN_STEPS[0] and spent >= budget / 20)


def plan_time(
    config: TrainConfig, seconds_left: float, timed: dict, eval_seconds: float, step: int, world_size: int = 1
) -> dict:
    """A time budget's plan, fixed once after the first steps: as many steps as fit in `seconds_left`.

    timed: the seconds of each step timed so far, in its micro-batches ("micro") and in the optimizer
    ("optimizer"); the median of each is the rate, so a few slow steps (a CPU warming up, a neighbour's
    burst) do not shorten the whole run. eval_seconds: one evaluation with its checkpoint, counted every
    eval_interval steps and once at the end. The tokens per step grow (batch_size, then gradient
    accumulation) as grow_steps says, judged by the steps of the grown size that fit.
    """
    micro_per_step = config.gradient_accumulation_steps // world_size  # per rank
    micro_seconds = statistics.median(timed["micro"]) / micro_per_step
    optimizer_seconds = statistics.median(timed["optimizer"])

    def step_seconds(batch: int, accum: int) -> float:  # a larger micro-batch: at most proportionally slower
        return accum / world_size * micro_seconds * batch / config.batch_size + optimizer_seconds

    # steps grow while the steps of the grown size, each with its optimizer update, keep min_steps
    batch, accum = grow_steps(config, lambda b, a: seconds_left / step_seconds(b, a), world_size)
    per_step = step_seconds(batch, accum)
    steps = int((seconds_left - eval_seconds) / (per_step + eval_seconds / config.eval_interval))
    max_iters = step + max(1, steps)
    return dict(max_iters=max_iters, batch_size=batch, gradient_accumulation_steps=accum,
                warmup_iters=min(config.warmup_iters, max_iters // 10), lr_decay_iters=max_iters)  # fmt: skip


REPLAN_TOLERANCE = 0.02  # of the budget: a time budget's plan is redrawn when it would miss by more
REPLAN_CHECKS = 20  # looks at the plan per run (at least 10 steps apart)


def replan_time(config: TrainConfig, spent: float, step: int, step_seconds: float, eval_seconds: float):
    """A time budget's plan kept on time: {max_iters, lr_decay_iters} for the steps that now fit, or None
    while the plan's end, at the measured speed (`step_seconds`: the steps since the plan was made,
    evaluations left out), stays within REPLAN_TOLERANCE of the budget. A machine's speed can drift after
    the plan is made (a VM's moved by a quarter within 15 minutes here), which a plan fixed once cannot
    follow. The cosine stretches or shrinks with the run; the learning rate moves a little where it does."""
    projected = spent + (config.max_iters - step) * step_seconds + _evals_left(step, config) * eval_seconds
    if abs(projected - config.time) <= REPLAN_TOLERANCE * config.time:
        return None
    left = config.time - spent - eval_seconds  # the final evaluation and save
    steps = int(left / (step_seconds + eval_seconds / config.eval_interval))
    max_iters = step + max(1, steps)
    return None if max_iters == config.max_iters else dict(max_iters=max_iters, lr_decay_iters=max_iters)


def init_weights(model, init_from) -> None:
    """Load the weights of `init_from` (a run, a checkpoint or an export directory) into `model` (fine-tuning:
    the optimizer starts fresh). A SmallmError when the shapes differ."""
    source = resolve_checkpoint(init_from)
    try:
        model.load_state_dict(load_model(source, "cpu").state_dict())
    except SmallmError as e:
        raise SmallmError(f"--init-from {source}: {e}") from e


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """The torch seed for one micro-batch's dropout masks: a function of its place in training only."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1)[0])


# ---- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(
    model, readers: dict, eval_iters: int, autocast, rank=0, world_size=1, check_stop=None, progress=False
):
    """Mean loss over batches 0..eval_iters-1 of each reader: the same batches at every call, whatever
    the number of ranks (rank r evaluates batches r, r + world_size, ...). `check_stop` is called before
    every batch and may raise to abandon the evaluation; `progress` shows a bar that goes when done."""
    model.eval()
    rounds = range(0, eval_iters, world_size)  # every rank goes through as many rounds (and stop checks)
    bar = tqdm(total=len(readers) * len(rounds), desc="evaluating", unit="batch", leave=False,
               disable=not progress, dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    losses = {}
    try:
        for split, reader in readers.items():
            total = torch.zeros((), device=reader.device)
            for start in rounds:
                if check_stop is not None:
                    check_stop()
                if start + rank < eval_iters:
                    x, y = reader.get(start + rank)
                    with autocast:
                        _, loss = model(x, y, return_logits=False)  # chunked: no (B*T, V) logits
                    total += loss.float()
                bar.update(1)
            if world_size > 1:
                torch.distributed.all_reduce(total)
            losses[split] = total.item() / eval_iters
    finally:
        bar.close()
        model.train()
    return losses


# ---- stopping when asked ---------------------------------------------------------------------------------


class StopRequested(Exception):
    """Raised by StopFlag.check at the first boundary after Ctrl-C or SIGTERM."""


class StopFlag:
    """Ctrl-C and SIGTERM as a flag that the loop reads at every micro-batch boundary and before every
    evaluation batch (`check`), so a stop lands within one micro-batch. The handler only sets the flag: a
    checkpoint being written completes. A second Ctrl-C raises KeyboardInterrupt at once (an atomic write
    under way is dropped and the previous checkpoint kept).

    Under DDP the ranks must stop at the same boundary, so `check` all-reduces the flag, on a gloo group of
    its own (a CPU tensor: no GPU sync) and without waiting for it: the value acted on at one boundary was
    sent at the boundary before, and has long arrived. A stop lands one micro-batch later; it costs a
    4-byte message per micro-batch.
    """

    def __init__(self, ddp: bool):
        self.signum = None
        self.group = torch.distributed.new_group(backend="gloo") if ddp else None
        self.sent = None  # (work, flag) of the all_reduce started at the previous boundary
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
            self.handlers = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame):  # only sets a flag: printing inside a signal handler is unsafe
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now (last/ keeps its previous state)
        self.signum = self.signum or signum

    def check(self) -> None:
        """Raise StopRequested if this process (under DDP: any rank) has been asked to stop."""
        if self.group is None:
            if self.signum is not None:
                raise StopRequested
            return
        stop = False
        if self.sent is not None:
            work, flag = self.sent
            work.wait()
            stop = flag.item() > 0
        flag = torch.tensor([float(self.signum is not None)])
        self.sent = torch.distributed.all_reduce(flag, group=self.group, async_op=True), flag
        if stop:
            raise StopRequested

    def close(self) -> None:
        """Put the previous signal handlers back; let the last all_reduce (every rank started it) finish."""
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        if self.sent is not None:
            self.sent[0].wait()


# ---- the run directory ------------------------------------------------------------------------------------


def new_run_dir(runs: Path = Path("runs")) -> Path:
    """runs/<timestamp> (not created), a new name even if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = runs / stamp, 1
    while out.exists():
        n += 1
        out = runs / f"{stamp}-{n}"
    return out


def point_latest(out_dir: Path) -> None:
    """Make runs/latest a symlink to out_dir (atomically replaced)."""
    link = out_dir.parent / "latest"
    tmp = out_dir.parent / f".latest.tmp-{os.getpid()}"
    with contextlib.suppress(OSError):  # e.g. filesystems without symlinks: the run itself is fine
        os.symlink(out_dir.name, tmp)
        os.replace(tmp, link)


def rewrite_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics rows up to `last_step` (rows a killed run wrote after its checkpoint go)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


# ---- the loop ----------------------------------------------------------------------------------------------


def train(
    config: TrainConfig, data_dir="data/tinystories", out_dir=None, resume=False, progress=True
) -> dict:
    """Train per `config` on the prepared data in `data_dir`, writing the run into `out_dir`.

    out_dir None: runs/<timestamp>, with runs/latest pointing at it. resume: continue from out_dir/last/.
    Returns the final metrics (step, tokens, val_loss, train_loss, best_val_loss, elapsed, interrupted).
    """
    t_begin = clock()  # a --time budget counts from here
    # ---- processes: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE -----------------------------------
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if config.gradient_accumulation_steps % world_size != 0:
        raise SmallmError(
            f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) must be divisible by the "
            f"number of processes ({world_size}) so that the global batch stays the same"
        )

    # ---- checks that read only (every rank, before any process waits on another) -----------------
    device = pick_device(config.device, local_rank, distributed=ddp)
    if ddp and device.type == "mps":
        raise SmallmError(
            "torchrun on MPS is not supported (torch.distributed has no MPS backend); run `smallm train` "
            "without torchrun, or pass --device cpu"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before anything asks "the current GPU" (e.g. the dtype choice)
    dtype, dtype_reason = pick_dtype(config.dtype, device)
    meta = read_meta(data_dir)
    new_run = out_dir is None
    out_dir = new_run_dir() if new_run else Path(out_dir)
    if resume and not (out_dir / "last" / "state.json").is_file():
        raise SmallmError(f"nothing to resume in {out_dir}: {out_dir}/last/state.json is missing")
    if resume:
        check_same_tokenizer(data_dir, out_dir / "last", f"resume {out_dir}")
    elif config.init_from is not None:
        check_same_tokenizer(data_dir, resolve_checkpoint(config.init_from), f"fine-tune {config.init_from}")
    if not resume and (out_dir / "config.yaml").exists():
        raise SmallmError(
            f"{out_dir} already holds a run; add --resume to continue it, or pick another --out"
        )

    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # TF32 matmuls on Ampere+ while training (no effect elsewhere); the caller's setting comes back after
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        return _train_loop(
            config, data_dir, out_dir, resume, progress, new_run, meta, device, dtype, dtype_reason, t_begin
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if ddp:
            torch.distributed.destroy_process_group()


def _train_loop(
    config, data_dir, out_dir: Path, resume, progress, new_run, meta, device, dtype, dtype_reason, t_begin
) -> dict:
    """The body of `train`, once the checks have passed and the processes have met."""
    ddp = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if ddp else 0
    world_size = torch.distributed.get_world_size() if ddp else 1
    master = rank == 0  # only rank 0 logs and writes
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    tokenizer_file = Path(data_dir) / TOKENIZER_FILE  # a trained tokenizer goes into every checkpoint
    tokenizer_file = tokenizer_file if tokenizer_file.is_file() else None
    metrics_path = out_dir / "metrics.jsonl"
    device_type = device.type
    autocast = (
        contextlib.nullcontext()
        if dtype == "float32"
        else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    )

    # ---- model and optimizer (same init on every rank; DDP also broadcasts it) ----------------------
    torch.manual_seed(config.seed)
    raw_model = GPT(config.model_config(meta.get("vocab_size", 50257))).to(device)
    if config.init_from is not None and not resume:
        init_weights(raw_model, config.init_from)
    optimizers = configure_optimizers(raw_model, config, device)
    # --ema: evaluations, best/ and last/'s model are a moving average of the weights (torch's AveragedModel,
    # a copy of the model); its decay follows the plan's length, so it is set once the plan is known
    average = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(0.0)) if config.ema else None
    averaged = None if average is None else average.module  # the average's weights, as a GPT
    given = raw_model if average is None else averaged  # the model the run evaluates and saves
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    step, tokens, elapsed_before, best_val_loss = 0, 0, 0.0, float("inf")
    # A budget's plan (steps, accumulation, warmup, decay) is fixed once and kept in last/ for resuming:
    # a token budget's right away, a time budget's once the first steps have measured the speed.
    plan = plan_steps(config, config.tokens, world_size) if config.tokens else None
    evaluated = False  # whether the evaluation due at `step` is done (a new run starts with one)
    if resume:
        state = load_training_state(last_dir, raw_model, optimizers, device, averaged=averaged)
        if average is not None:
            average.n_averaged.fill_(state["ema_updates"])
        plan = state.get("plan") or plan
        if state.get("data_tokens") not in (None, meta["splits"]["train"]["tokens"]):
            raise SmallmError(
                f"{data_dir} has {meta['splits']['train']['tokens']:,} training tokens but the run in "
                f"{out_dir} trained on {state['data_tokens']:,}; pass the run's own --data"
            )
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        evaluated = state.get("evaluated", True)  # False: stopped during the evaluation at `step`
        best_val_loss = state["best_val_loss"] if state["best_val_loss"] is not None else float("inf")
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    if plan:
        config = dataclasses.replace(config, **plan)
    if average is not None:
        average.multi_avg_fn = get_ema_multi_avg_fn(ema_decay(config))
    accum = config.gradient_accumulation_steps // world_size  # micro-steps per rank
    model = torch.compile(raw_model) if config.compile else raw_model
    train_model = model
    if ddp:
        device_ids = [device.index] if device_type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ---- data: batches are a function of (seed, step), so the data position is just `step` ------------
    def train_batches(accum: int) -> Batches:
        return Batches(data_dir, "train", config.batch_size, config.block_size, seed=config.seed,
                       rank=rank, world_size=world_size, accum_steps=accum, device=device,
                       sampling=config.sampling, origin=(step, tokens // config.block_size))  # fmt: skip

    batches = train_batches(accum)

    def fixed_batches(size: int) -> dict:  # another seed than training's: comparable evaluations
        return {
            split: Batches(data_dir, split, size, config.block_size, seed=config.seed + 1, device=device)
            for split in ("train", "validation")
        }

    eval_readers = fixed_batches(config.batch_size)
    tokens_per_step = config.batch_size * config.block_size * config.gradient_accumulation_steps
    flops_per_token = 6 * raw_model.num_params() + 12 * config.n_layer * config.n_embd * config.block_size
    peak = peak_flops(device)

    # ---- the run directory ---------------------------------------------------------------------------------
    log = (lambda msg: tqdm.write(msg)) if master else (lambda msg: None)
    saved = (step, evaluated) if resume else None  # what last/ holds: (step, its evaluation done)

    def write_row(row: dict) -> None:
        if master:
            with writing(metrics_path), open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_last(step: int, evaluated: bool) -> None:
        nonlocal saved
        if master:
            state = dict(
                step=step,
                evaluated=evaluated,  # False: stopped during the evaluation at `step`; resume redoes it
                tokens=tokens,
                elapsed=elapsed_before + clock() - t_start,
                best_val_loss=best_val_loss if math.isfinite(best_val_loss) else None,
                scaler=scaler.state_dict(),
                data_tokens=meta["splits"]["train"]["tokens"],
                world_size=world_size,
                plan=plan,
            )
            if average is not None:
                state["ema_updates"] = int(average.n_averaged)
            save_training_state(last_dir, raw_model, optimizers, state, {"step": step}, tokenizer_file,
                                averaged=averaged)  # fmt: skip
        saved = (step, evaluated)

    def evaluate_and_checkpoint(step: int) -> dict:
        nonlocal best_val_loss, t_last, eval_seconds, eval_total
        t_eval = clock()
        losses = estimate_loss(model if average is None else averaged, eval_readers, config.eval_iters,
                               autocast, rank, world_size, check_stop=stop.check,
                               progress=master and progress)  # fmt: skip
        val_loss, train_loss = losses["validation"], losses["train"]
        elapsed = elapsed_before + clock() - t_start
        log(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if not math.isfinite(val_loss):
            raise SmallmError(_not_finite(f"validation loss is {val_loss}", step, last_dir))
        write_row(
            dict(
                step=step, tokens=tokens, elapsed=round(elapsed, 3), val_loss=val_loss, train_loss=train_loss
            )
        )
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            if master:
                extra = {"step": step, "val_loss": val_loss}
                save_model(given, best_dir, extra_config=extra, tokenizer_file=tokenizer_file)
        save_last(step, evaluated=True)
        if master:
            from smallm.plot import plot_losses

            plot_losses(metrics_path, out_dir / "loss.png")
        t_last = clock()  # tokens/s leaves evaluation time out
        eval_seconds = t_last - t_eval
        eval_total += eval_seconds
        return losses

    def eval_due(step: int) -> bool:
        return step % config.eval_interval == 0 or step == config.max_iters

    if master:
        n = raw_model.num_params()
        last_step = "?" if config.time and not plan else config.max_iters  # a time budget decides soon
        log(f"{'resuming' if resume else 'training'} {n / 1e6:.1f}M parameters in {out_dir} on {device}, "
            f"dtype {dtype} ({dtype_reason}), {world_size} process{'es' if world_size > 1 else ''}, "
            f"{tokens_per_step:,} tokens/step, steps {step}..{last_step}")  # fmt: skip
        if config.optimizer == "muon":
            ns_dtype, ns_reason = pick_ns_dtype(config.muon_ns_dtype, device)
            log(f"Muon: {config.muon_ns_steps} Newton-Schulz iterations per step in {ns_dtype} ({ns_reason})")
        if config.tokens and not resume:
            log(f"plan: {config.tokens:,} tokens = {config.max_iters:,} steps of {tokens_per_step:,} tokens, "
                f"{config.schedule} schedule, warmup {config.warmup_iters} steps")  # fmt: skip
        elif config.time and not plan:
            log(f"plan: {config.time:,.0f} s; the number of steps is fixed once the first steps are timed")
    # Ctrl-C / SIGTERM: at the next micro-batch boundary drop the step under way, save last/, return
    stop = StopFlag(ddp)
    bar = tqdm(total=config.max_iters, initial=step, disable=not (master and progress), unit="step",
               dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    t_start = t_last = clock()
    tokens_at_last_log, steps_here, micro_step = tokens, 0, 0
    losses, interrupted = {}, False
    eval_seconds = 0.0  # the last evaluation + checkpoint, for a time budget's plan and the time-left line
    eval_total = 0.0  # all of them in this process
    # A time budget's plan made in this process is checked every twentieth of the run, at the speed of all
    # steps since it was made (`window`: step, clock, eval_total then; 30-step windows swung by +-10% here
    # and redrew the plan back and forth), and redrawn when it drifts off time; a resumed run keeps the plan
    # it was saved with.
    own_plan, window, check_at = False, None, None
    timed = dict(micro=[], optimizer=[])  # after the first step: its warm-up is not typical
    try:
        if master:
            out_dir.mkdir(parents=True, exist_ok=True)
            if new_run:
                point_latest(out_dir)
            # resume reads config.yaml
            write_text(out_dir / "config.yaml", config_to_yaml(config, data_dir=str(data_dir)))
            if resume:
                rewrite_metrics(metrics_path, step)
        if step >= config.max_iters and evaluated:
            log(f"{out_dir} already has {step} steps; pass --max-iters with more to train longer")
        while True:
            if not evaluated:  # step 0, every eval_interval steps, the last step, or a stopped evaluation
                losses = evaluate_and_checkpoint(step)
                evaluated = True
            if step >= config.max_iters:
                break
            # ---- one optimizer step: accumulate gradients over `accum` micro-batches -------------------
            lr = set_lr(optimizers, step, config)
            t_step = clock()
            step_loss = torch.zeros((), device=device)
            x, y = batches.get(step, 0)
            for micro_step in range(accum):
                stop.check()  # Ctrl-C / SIGTERM: the weights have not changed yet; drop this step
                last_micro = micro_step == accum - 1
                # Dropout masks depend only on (seed, step, micro-batch of the global batch): a resumed run
                # and a run on any number of ranks draw the same masks as one uninterrupted process.
                micro_batch = rank * accum + micro_step
                torch.manual_seed(micro_batch_seed(config.seed, step, micro_batch))
                # DDP averages gradients across ranks only on the last micro-step
                no_sync = train_model.no_sync() if ddp and not last_micro else contextlib.nullcontext()
                with no_sync:
                    with autocast:
                        _, loss = train_model(x, y, return_logits=False)
                        loss = loss / accum  # the mean over all micro-batches
                    if not last_micro:
                        x, y = batches.get(step, micro_step + 1)  # read the next batch while the GPU works
                    scaler.scale(loss).backward()
                step_loss += loss.detach().float()
            if ddp:  # every rank learns the mean loss
                torch.distributed.all_reduce(step_loss)
            loss_value = step_loss.item() / world_size
            if not math.isfinite(loss_value):
                raise SmallmError(_not_finite(f"training loss is {loss_value}", step, last_dir))
            t_optimizer = clock()
            if config.grad_clip > 0:
                for optimizer in optimizers:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
            for optimizer in optimizers:
                scaler.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
            scaler.update()
            if average is not None:
                average.update_parameters(raw_model)
            if config.time and not plan and (step > 0 or resume):  # timed for a time budget's plan
                timed["micro"].append(t_optimizer - t_step)
                timed["optimizer"].append(clock() - t_optimizer)
            step += 1
            tokens += tokens_per_step
            evaluated = not eval_due(step)
            bar.update(1)

            # ---- a time budget: once a few steps are timed, fix the plan; then keep it on time -------------
            fixed = None
            checking = own_plan and config.replan and check_at <= step < config.max_iters
            if config.time and (not plan or checking):
                now = clock()
                spent = elapsed_before + now - t_begin
                if not plan:
                    if plan_due(timed, spent, config.time):
                        fixed = plan_time(config, config.time - spent, timed, eval_seconds, step, world_size)
                else:
                    since = window[0]
                    step_seconds = (now - window[1] - (eval_total - window[2])) / (step - since)
                    fixed = replan_time(config, spent, step, step_seconds, eval_seconds)
                    check_at = step + max(10, config.max_iters // REPLAN_CHECKS)
                if ddp:  # every rank follows rank 0's decision and plan
                    shared = [fixed]
                    torch.distributed.broadcast_object_list(shared, src=0)
                    fixed = shared[0]
            if fixed:
                replanned = plan is not None
                was = config.max_iters
                plan = {**(plan or {}), **fixed}
                config = dataclasses.replace(config, **plan)
                accum = config.gradient_accumulation_steps // world_size  # the plan may have raised it
                tokens_per_step = config.batch_size * config.block_size * accum * world_size
                batches = train_batches(accum)
                eval_readers = fixed_batches(config.batch_size)  # as a resumed run, which starts planned
                if average is not None:
                    average.multi_avg_fn = get_ema_multi_avg_fn(ema_decay(config))
                bar.total = config.max_iters
                end = datetime.fromtimestamp(t_begin + config.time - elapsed_before).strftime("%H:%M:%S")
                if replanned:
                    log(f"plan: {config.max_iters:,} steps, not {was:,}, to end near {end} (the "
                        f"{step - since} steps since the plan ran at {step_seconds:.3g} s each)")  # fmt: skip
                else:
                    own_plan = True
                    window = (step, clock(), eval_total)
                    check_at = step + max(10, config.max_iters // REPLAN_CHECKS)
                    log(
                        f"plan: {config.max_iters:,} steps of {tokens_per_step:,} tokens "
                        f"({tokens + (config.max_iters - step) * tokens_per_step:,} in all) to end near {end}"
                    )
                if master:
                    write_text(out_dir / "config.yaml", config_to_yaml(config, data_dir=str(data_dir)))

            # ---- log (and once, early, how long the run will take) ------------------------------------
            steps_here += 1
            step_seconds = clock() - t_step
            # the first step pays one-time costs (allocation, compilation); a slow one is mostly its own work
            first = steps_here == 2 or (steps_here == 1 and step_seconds > 10 and not config.compile)
            if first and not config.time:  # a time budget's plan line says when it ends
                log(_time_left(step, step_seconds, tokens_per_step, eval_seconds, config))
            if step % config.log_interval == 0 or step == config.max_iters:
                now = clock()
                tokens_per_sec = (tokens - tokens_at_last_log) / max(now - t_last, 1e-9)
                row = dict(step=step, tokens=tokens, elapsed=round(elapsed_before + now - t_start, 3),
                           loss=loss_value, lr=lr, tokens_per_sec=round(tokens_per_sec, 1))  # fmt: skip
                if peak is not None:
                    row["mfu"] = round(flops_per_token * tokens_per_sec / world_size / peak, 4)
                write_row(row)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                t_last, tokens_at_last_log = now, tokens
    except StopRequested:
        interrupted = True
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)  # the abandoned step's gradients
        dropped = (f"the evaluation at step {step}" if not evaluated
                   else f"step {step + 1} at micro-batch {micro_step + 1} of {accum}")  # fmt: skip
        try:
            if saved != (step, evaluated):  # else stopped in the step after a checkpoint: last/ has it
                save_last(step, evaluated)
        except WriteFailed as e:
            raise _write_failed(e, last_dir, out_dir, saved) from e
        if ddp:  # the other ranks wait for rank 0's save: torchrun stops them all when one exits non-zero
            torch.distributed.barrier()
        log(f"stopped on request during {dropped} (redone on resume); {last_dir} holds step {step}, "
            f"everything needed to continue:\n  smallm train --out {out_dir} --resume")  # fmt: skip
    except WriteFailed as e:
        raise _write_failed(e, last_dir, out_dir, saved) from e
    finally:
        bar.close()
        stop.close()

    return dict(
        step=step,
        tokens=tokens,
        val_loss=losses.get("validation"),
        train_loss=losses.get("train"),
        best_val_loss=best_val_loss if math.isfinite(best_val_loss) else None,
        elapsed=elapsed_before + clock() - t_start,
        interrupted=interrupted,
        out_dir=str(out_dir),
    )


def _not_finite(what: str, step: int, last_dir: Path) -> str:
    kept = (
        f"{last_dir} keeps the last good checkpoint"
        if (last_dir / "state.json").is_file()
        else "nothing saved"
    )
    return (
        f"{what} at step {step}: training stopped ({kept}); lower --learning-rate or try --dtype float32, "
        "then resume or start again"
    )


def _write_failed(error: WriteFailed, last_dir: Path, out_dir: Path, saved) -> SmallmError:
    """A failed write during training, as one line: what failed, where the run stands, how to go on."""
    if saved is None:
        return SmallmError(f"{error}; training stopped with nothing saved: free some space and start again")
    return SmallmError(
        f"{error}; training stopped, {last_dir} holds step {saved[0]}: free some space, then continue with "
        f"`smallm train --out {out_dir} --resume`"
    )


def _evals_left(step: int, config) -> int:
    """Evaluations still due in step..max_iters: every eval_interval steps, and the last step's."""
    due = config.max_iters // config.eval_interval - (step - 1) // config.eval_interval
    return due + (config.max_iters % config.eval_interval != 0)


def _time_left(step: int, step_seconds: float, tokens_per_step: int, eval_seconds, config) -> str:
    """One line: the speed, and how long the rest of the run takes at it (evaluations included)."""
    steps_left = config.max_iters - step
    evals_left = _evals_left(step, config)
    seconds = steps_left * step_seconds
    evals = ""
    if eval_seconds and evals_left:
        seconds += evals_left * eval_seconds
        evals = f" and {evals_left:,} evaluations of {_duration(eval_seconds)}"
    end = datetime.now() + timedelta(seconds=seconds)
    return (
        f"speed: {tokens_per_step / step_seconds:,.0f} tokens/s, {step_seconds:.3g} s/step; the "
        f"{steps_left:,} steps left{evals} take about {_duration(seconds)}, until {end:%Y-%m-%d %H:%M} "
        f"(fewer steps: --max-iters)"
    )


def _duration(seconds: float) -> str:
    """45 s, 12 min, 3.4 h, 5.2 days, 3.1 weeks."""
    for unit, size in (("weeks", 7 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit != "min" else f"{seconds / size:.0f} min"
    return f"{seconds:.0f} s"
