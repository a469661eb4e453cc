"""The training config: a typed dataclass with nanoGPT's field names, named presets, YAML files and flags.

Kept apart from the loop (smallm.train) so that reading or printing a config never imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from smallm.config import GPTConfig
from smallm.errors import SmallmError

# ---- the config ----------------------------------------------------------------------------------------


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run depends on, with nanoGPT's names. The defaults are the `seed` recipe.

    Tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps (for any number of
    DDP ranks: the accumulation steps are divided among them).
    """

    # model (the vocabulary is GPT-2's, from the prepared data)
    n_layer: int = _field(6, "transformer blocks")
    n_head: int = _field(6, "attention heads")
    n_embd: int = _field(384, "embedding width")
    block_size: int = _field(128, "context length in tokens")
    dropout: float = _field(0.1, "dropout probability")
    bias: bool = _field(True, "biases in Linear and LayerNorm layers")
    # batch and length
    batch_size: int = _field(32, "sequences per micro-batch")
    gradient_accumulation_steps: int = _field(32, "micro-batches per optimizer step (all ranks together)")
    max_iters: int = _field(20_000, "optimizer steps to train for")
    sampling: str = _field(
        "random",
        "random (nanoGPT's: windows from anywhere, with replacement), or epoch (every window once per epoch, "
        "shuffled)",
    )
    # budgets: either sets max_iters (and the schedule with it); a token budget's plan is fixed once, a time
    # budget's is kept on time by the run that made it (replan); --resume keeps the plan as saved
    tokens: int | None = _field(None, "token budget, e.g. 380k, 82M, 1.5B: the run's length in tokens")
    time: float | None = _field(None, "time budget, e.g. 90s, 20m, 2h: steps fitted to the measured speed")
    min_steps: int = _field(
        0,
        "with a budget, double the tokens per step while the run keeps at least this many steps (a time "
        "budget: or half as many, where the doubled steps fit 1.15x the tokens)",
    )
    max_batch_size: int = _field(
        0,
        "with min_steps, the tokens per step grow by doubling batch_size up to this (fewer, larger "
        "micro-batches: faster), then gradient accumulation; 0: batch_size stays",
    )
    replan: bool = _field(
        True,
        "time budget: redraw the plan when the speed since it was made says the run would miss the time by "
        "more than 2% (false: the first plan, fixed once)",
    )
    # optimizer: AdamW for everything, or Muon for the blocks' matrices and AdamW for the rest
    optimizer: str = _field("adamw", "adamw, or muon (torch.optim.Muon on the blocks' 2-D matrices)")
    muon_lr: float = _field(2e-3, "peak Muon learning rate (RMS-matched to AdamW's scale)")
    muon_momentum: float = _field(0.95, "Muon momentum (Nesterov)")
    muon_ns_steps: int = _field(5, "Muon's Newton-Schulz iterations per step (fewer: cheaper, rougher)")
    muon_ns_dtype: str = _field(
        "auto",
        "dtype of Muon's Newton-Schulz iterations: auto (bfloat16 where the CPU or GPU has native bf16, as "
        "torch does, else float32: emulated bf16 is ~18x slower on a CPU), bfloat16 or float32",
    )
    learning_rate: float = _field(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(0.5, "clip the gradient norm to this (0 turns clipping off)")
    ema: float = _field(
        0.0,
        "evaluate and save a moving average of the weights whose half-life is this fraction of the run's "
        "steps (0.04: the last 4% of the steps weigh half); 0: the weights as trained",
    )
    # schedule: linear warmup, then cosine (or stable, then linear: wsd) down to min_lr at lr_decay_iters
    schedule: str = _field("cosine", "cosine, or wsd (warmup, stable at the peak, linear decay at the end)")
    decay_frac: float = _field(0.2, "wsd: the share of the run spent decaying to min_lr")
    warmup_iters: int = _field(1_000, "linear warmup steps (with a budget: at most a tenth of the run)")
    lr_decay_iters: int | None = _field(None, "step where the decay reaches min_lr (default: max_iters)")
    min_lr: float = _field(1e-5, "learning-rate floor, below learning_rate")
    # evaluation and logging
    eval_interval: int = _field(500, "evaluate and checkpoint every this many steps")
    eval_iters: int = _field(200, "batches per evaluation (the same batches every time)")
    log_interval: int = _field(10, "write a metrics row every this many steps")
    # system
    device: str = _field("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    dtype: str = _field(
        "auto",
        "auto (CUDA: bf16 at compute capability >= 8.0 and on ROCm, else fp16; CPU: bf16 with AMX-BF16 or "
        "AVX512-BF16, else fp32; MPS: fp32), float32, bfloat16, float16",
    )
    compile: bool = _field(False, "torch.compile the model")
    seed: int = _field(1337, "seed for initialization, data order and dropout")
    # fine-tuning
    init_from: str | None = _field(
        None, "start from these weights: a run (its best/), a checkpoint or a `smallm export` directory"
    )

    def __post_init__(self):
        if isinstance(self.tokens, str):
            self.tokens = parse_tokens(self.tokens)
        if isinstance(self.time, str):
            self.time = parse_duration(self.time)
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps")
        positive += ("max_iters", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SmallmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokens is not None and self.time is not None:
            raise SmallmError("give one budget, --tokens or --time, not both")
        for name in ("tokens", "time"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise SmallmError(f"{name} must be positive, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "muon"):
            raise SmallmError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.sampling not in ("random", "epoch"):
            raise SmallmError(f"sampling must be random or epoch, got {self.sampling!r}")
        if self.schedule not in ("cosine", "wsd"):
            raise SmallmError(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if not 0 < self.decay_frac <= 1:
            raise SmallmError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if not 0 < self.muon_lr:
            raise SmallmError(f"muon_lr must be positive, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise SmallmError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.ema < 1:
            raise SmallmError(f"ema must be in [0, 1) (a fraction of the run's steps), got {self.ema}")
        if self.muon_ns_dtype not in ("auto", "bfloat16", "float32"):
            raise SmallmError(f"muon_ns_dtype must be auto, bfloat16 or float32, got {self.muon_ns_dtype!r}")
        if not 1 <= self.muon_ns_steps <= 99:
            raise SmallmError(f"muon_ns_steps must be in 1..99, got {self.muon_ns_steps}")
        nonnegative = ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr", "min_steps")
        for name in (*nonnegative, "max_batch_size"):
            if getattr(self, name) < 0:
                raise SmallmError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.learning_rate:
            raise SmallmError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.min_lr < self.learning_rate:
            raise SmallmError(
                f"min_lr ({self.min_lr}) must be below learning_rate ({self.learning_rate}): the cosine "
                "decays from the peak down to the floor"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise SmallmError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SmallmError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise SmallmError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self.model_config()  # n_embd % n_head, dropout range, ...

    def model_config(self, vocab_size: int = 50257) -> GPTConfig:
        names = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in names})

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias")  # fixed once a run has weights

# Presets are overrides of the dataclass defaults, which are the seed recipe.
PRESETS = {
    # The seed document: 32 x 32 x 128 = 131,072 tokens per step, 20,000 steps (2.6B tokens), AdamW 1e-4,
    # 1,000 warmup steps, cosine down to 1e-5.
    "seed": {},
    # The seed model with the recipe that learned most per token on stories it never saw (bench/recipe.py,
    # bench/RESULTS.md): Muon for the blocks' matrices, 512-token steps for small budgets, no dropout,
    # every window of the text once per epoch, and a moving average of the weights as the model it gives.
    # With a budget: warmup 37 steps (at most a tenth of the run), cosine to 0.3 of the peak at the end,
    # and the tokens per step doubling (batch to 8, then accumulation) while the run keeps >= 512 steps.
    "fast": dict(
        dropout=0.0,
        batch_size=4,  # 4 x 128 beat 8 x 128 at a quarter, half and one epoch; 2 x 128 did not beat 4 x 128
        gradient_accumulation_steps=1,
        max_iters=744,  # one epoch of the shared ~382K tokens; --tokens or --time sets it
        sampling="epoch",  # every window once an epoch; random ones miss 37% of it (0.07 worse at one epoch)
        min_steps=512,
        max_batch_size=8,  # a budget's larger steps: 8 x 128 in one micro-batch, then accumulation
        optimizer="muon",
        muon_lr=4.5e-3,  # both rates x 1.5 (with the average below): one epoch -0.016 on 3 seeds, half -0.015
        muon_momentum=0.9,  # torch's 0.95 remembers too long for runs of a few hundred steps
        learning_rate=3e-3,
        min_lr=9e-4,  # a floor of 0.3 x the peaks (Muon's too): decaying to a tenth did 0.012 worse
        weight_decay=0.1,
        # AdamW's part (embeddings, tied head, gains, biases), where most embedding rows get a gradient only
        # now and then: a long second-moment memory, a short first-moment one
        beta1=0.8,
        beta2=0.999,
        grad_clip=1.0,
        ema=0.036,  # evaluate and save a moving average of the weights, half-life 3.6% of the run's steps
        schedule="cosine",
        warmup_iters=37,
        eval_interval=200,
        eval_iters=10,
    ),
    # A smoke run for a laptop CPU: 0.8M parameters besides the 6.4M embedding; learns in 60 steps.
    "tiny": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        dropout=0.0,
        batch_size=16,
        gradient_accumulation_steps=1,
        max_iters=2_000,
        learning_rate=2e-3,
        min_lr=2e-4,
        warmup_iters=10,
        eval_interval=100,
        eval_iters=5,
        log_interval=10,
    ),
    # Fine-tuning (with --init-from, which sets the shape): a fresh AdamW at 1e-3 after a short warmup,
    # cosine down to 1e-5, no dropout, 1,024-token steps. The learning rate is the best of three measured
    # on TinyStories (bench/RESULTS.md, "Fine-tuning"); set max_iters to about one epoch of your text.
    "finetune": dict(
        dropout=0.0,
        batch_size=8,
        gradient_accumulation_steps=1,
        max_iters=500,
        learning_rate=1e-3,
        min_lr=1e-5,
        warmup_iters=10,
        eval_interval=50,
        eval_iters=20,
        log_interval=10,
    ),
}


def _coerce(name: str, value):
    """A config value from YAML or a flag (often a string) as the field's type, or a one-line error."""
    kind = FIELDS[name].type  # a string: "int", "float", "bool", "str", "int | None"
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
        elif kind.startswith("int"):
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            if not isinstance(value, bool) and float(value).is_integer():
                return int(value)
        elif kind.startswith("float"):
            if not isinstance(value, bool):
                return float(value)
        elif kind.startswith("str") and isinstance(value, str):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    what = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
    raise SmallmError(f"config field {name} must be {what[kind.split()[0]]}, got {value!r}")


# ---- budgets -----------------------------------------------------------------------------------------------

_TOKEN_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_tokens(text) -> int:
    """'380k' -> 380_000, '82M' -> 82_000_000, '1.5B' -> 1_500_000_000, '5000' -> 5000."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    unit = s[-1] if s and s[-1] in "kmb" else ""
    try:
        tokens = float(s[: len(s) - len(unit)]) * _TOKEN_UNITS[unit]
    except ValueError:
        tokens = -1
    if not tokens >= 1:
        raise SmallmError(f"--tokens takes a count like 380k, 82M or 1.5B, not {text!r}")
    return round(tokens)


def parse_duration(text) -> float:
    """Seconds from '90s', '20m', '2h', '1h30m' or a plain number of seconds."""
    s = str(text).strip().lower().replace(" ", "")
    seconds, number = 0.0, ""
    try:
        for c in s:
            if c in _TIME_UNITS:
                seconds, number = seconds + float(number) * _TIME_UNITS[c], ""
            else:
                number += c
        seconds += float(number) if number else 0.0
    except ValueError:
        seconds = -1
    if not (s and seconds > 0):
        raise SmallmError(f"--time takes a duration like 90s, 20m, 2h or 1h30m, not {text!r}")
    return seconds


# A time budget also doubles its steps, down to min_steps / 2 of them, where the doubled steps fit this many
# times the tokens (the optimizer's update, paid per step, is then a large share of a step). At equal tokens
# a doubling cost 0.04-0.08 in loss here, what 7-13% more tokens buy at these budgets (~0.45 per doubling of
# them); 15-minute runs that doubled their 512-token steps this way fitted 1.35x the tokens and ended 0.15
# lower, twice (bench/RESULTS.md, "Time budgets on a slow CPU").
GROW_FOR_TOKENS = 1.15


def grow_steps(config: TrainConfig, steps_at, world_size: int = 1) -> tuple[int, int]:
    """(batch_size, gradient_accumulation_steps) for a budget that gives `steps_at(batch, accum)` steps.

    Tokens per step start at the config's; with min_steps, they double while the run keeps at least
    min_steps steps (a small budget cannot afford big steps, a large one wants them), or at least half as
    many where the doubled steps fit GROW_FOR_TOKENS times the tokens (a time budget whose optimizer update
    is a large share of a step): batch_size first, up to max_batch_size, then gradient accumulation: the
    same arithmetic, but one micro-batch of 8 x 128 ran 1.2x as fast as two of 4 x 128 on a 2-core CPU
    (bench/RESULTS.md).
    """
    batch, accum = config.batch_size, config.gradient_accumulation_steps
    while config.min_steps:
        bigger = (batch * 2, accum) if batch * 2 <= config.max_batch_size else (batch, accum * 2)
        steps = steps_at(*bigger)
        if steps < config.min_steps:
            now = steps_at(batch, accum) * batch * accum  # tokens, in blocks: the same for a token budget
            more = steps * bigger[0] * bigger[1] / now if now > 0 else 0.0
            if steps < config.min_steps / 2 or more < GROW_FOR_TOKENS:
                break
        batch, accum = bigger
    return batch, -(-accum // world_size) * world_size  # divisible by the number of processes


def plan_steps(config: TrainConfig, tokens: float, world_size: int = 1) -> dict:
    """The run's length for a budget of `tokens`: max_iters, batch size and gradient accumulation as
    grow_steps says, warmup and decay. The warmup keeps its length in steps but is at most a tenth of the
    run; the decay ends with the run.
    """
    batch, accum = grow_steps(config, lambda b, a: tokens / (b * config.block_size * a), world_size)
    steps = max(1, round(tokens / (batch * config.block_size * accum)))
    return dict(
        max_iters=steps,
        batch_size=batch,
        gradient_accumulation_steps=accum,
        warmup_iters=min(config.warmup_iters, steps // 10),
        lr_decay_iters=steps,
    )


def build_config(preset: str = "seed", config_file=None, overrides: dict | None = None) -> TrainConfig:
    """The resolved config: a preset, then a YAML file, then `overrides` (e.g. flags), each on top.

    With `init_from` the model's shape is the checkpoint's (a preset's shape gives way; a shape in the file
    or the flags that differs is refused) and init_from becomes the checkpoint directory it resolves to.
    """
    if preset not in PRESETS:
        raise SmallmError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    given = dict(read_config_file(config_file)) if config_file is not None else {}
    given.update(overrides or {})
    values.update(given)
    if values.get("init_from") is not None:
        values.update(_init_from_shape(str(values["init_from"]), given))
    return TrainConfig(**values)


def _init_from_shape(init_from: str, given: dict) -> dict:
    """{init_from: the checkpoint directory, and the shape fields of its model}, or a SmallmError when a
    shape field in `given` differs from it."""
    from smallm.checkpoint import read_model_config
    from smallm.generate import resolve_checkpoint  # imports torch: only when fine-tuning

    checkpoint = resolve_checkpoint(init_from).resolve()
    model = read_model_config(checkpoint)
    for name in SHAPE_FIELDS:
        if name in given and _coerce(name, given[name]) != getattr(model, name):
            raise SmallmError(
                f"--{name.replace('_', '-')} {given[name]} differs from {getattr(model, name)} in "
                f"{checkpoint}: with --init-from the model's shape is the checkpoint's; drop the flag"
            )
    return {"init_from": str(checkpoint), **{name: getattr(model, name) for name in SHAPE_FIELDS}}


def read_config_file(path) -> dict:
    """Config fields from a YAML mapping. A run's config.yaml works too (its bookkeeping keys are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise SmallmError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SmallmError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SmallmError(f"{path} must hold a mapping of config fields, not {type(values).__name__}")
    values = {k: v for k, v in values.items() if k not in RUN_KEYS}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise SmallmError(f"{path}: unknown config field(s) {', '.join(map(str, unknown))}")
    return values


RUN_KEYS = ("preset", "data_dir")  # written into RUN/config.yaml next to the fields, for the record


def config_to_yaml(config: TrainConfig, **extra) -> str:
    return yaml.safe_dump({**config.to_dict(), **extra}, sort_keys=False)


def resume_config(out_dir, overrides: dict | None = None) -> tuple[TrainConfig, str]:
    """The config of the run in `out_dir` (its config.yaml) with `overrides` on top, and its data directory.

    Fields that fix the model's shape cannot change; anything else may (`max_iters` to extend a run).
    """
    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise SmallmError(f"nothing to resume in {out_dir}: {path} is missing")
    config = TrainConfig(**read_config_file(path))  # a broken file is a SmallmError here, not a traceback
    saved = yaml.safe_load(path.read_text())
    for name in SHAPE_FIELDS:
        if name in (overrides or {}) and _coerce(name, overrides[name]) != getattr(config, name):
            raise SmallmError(f"--{name.replace('_', '-')} cannot change when resuming: the weights fix it")
    config = TrainConfig(**{**config.to_dict(), **(overrides or {})})
    return config, saved.get("data_dir", "data/tinystories")
