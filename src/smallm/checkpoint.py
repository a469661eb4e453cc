"""Checkpoint folders: `model.safetensors` + `config.json`, written atomically, read without pickle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from smallm.config import GPTConfig
from smallm.errors import SmallmError, WriteFailed
from smallm.tokenizer import TOKENIZER_FILE

# torch (and safetensors.torch) are imported inside the functions that need them, so that `smallm prepare`,
# which only needs atomic_directory, starts without paying for the torch import.

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@contextlib.contextmanager
def atomic_directory(directory):
    """Yield a fresh temporary directory next to `directory`; on success it replaces `directory`.

    On an exception the temporary directory is removed and `directory` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary directory
    old = None
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        if old is not None and not directory.exists():
            os.replace(old, directory)  # the swap failed half way: put the previous directory back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(path, then: str = ""):
    """Report a failed write under `path` (any OSError, or safetensors' error for one: a full disk, a quota,
    a read-only filesystem) as WriteFailed: one line with the path, the space left there and `then`, what
    to do. Wrap the writes only, not reads, so that a missing input is not reported as a full disk."""
    try:
        yield
    except (OSError, SafetensorError, WriteFailed) as e:
        cause = e.__cause__ if isinstance(e, WriteFailed) else e  # a file inside `path`: name `path`
        reason = getattr(cause, "strerror", None) or str(cause)
        then = f"; {then}" if then else ""
        raise WriteFailed(f"cannot write {path} ({reason}; {free_space(path)} free there){then}") from cause


def free_space(path) -> str:
    """The space left on the filesystem holding `path` (or its nearest existing parent), e.g. "1.2 GB"."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path next to `path` to write; on success it replaces `path`, so a reader never sees
    half a file. A failed write raises WriteFailed, removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    with writing(path):
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    """Write text to path atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    """Write JSON to path atomically (temp file, then rename)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SmallmError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallmError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def save_model(model, directory, extra_config: dict | None = None, tokenizer_file=None) -> None:
    """Write the model's weights (tied head stored once) and config into `directory`, atomically, with a
    copy of `tokenizer_file` (a trained tokenizer.json) if given; without one the model's is GPT-2's."""
    with writing(directory), atomic_directory(directory) as tmp:
        _write_model(tmp, model, extra_config, tokenizer_file)


def _write_model(directory: Path, model, extra_config: dict | None, tokenizer_file=None) -> None:
    from safetensors.torch import save_file

    save_file(_weights(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    tokenizer = "gpt2"
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
        tokenizer = TOKENIZER_FILE
    write_json(directory / CONFIG, {**model.config.to_dict(), "tokenizer": tokenizer, **(extra_config or {})})


def _weights(model) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def read_model_config(directory) -> GPTConfig:
    """The shape of the model in a checkpoint directory (smallm's, or a GPT-2-shaped Hugging Face one such
    as `smallm export` writes), from its config.json alone."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SmallmError(f"no checkpoint directory at {directory}")
    config_dict = read_json(directory / CONFIG)
    if "model_type" in config_dict:  # a Hugging Face directory, e.g. one `smallm export` wrote
        from smallm.export import hf_gpt_config

        return hf_gpt_config(directory)
    tokenizer = config_dict.get("tokenizer", "gpt2")
    if tokenizer != "gpt2" and not (tokenizer == TOKENIZER_FILE and (directory / TOKENIZER_FILE).is_file()):
        raise SmallmError(
            f"{directory} uses tokenizer {tokenizer!r}, which is not GPT-2 nor a {TOKENIZER_FILE} beside it"
        )
    return GPTConfig.from_dict(config_dict)


def load_model(directory, device="cpu"):
    """Build the GPT described by `directory/config.json` and load `directory/model.safetensors`.

    A GPT-2-shaped Hugging Face directory (config.json with a model_type) is read with export.load_hf."""
    from safetensors.torch import load_file

    from smallm.model import GPT

    directory = Path(directory)
    config = read_model_config(directory)
    if "model_type" in read_json(directory / CONFIG):
        from smallm.export import load_hf

        return load_hf(directory, device)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SmallmError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise SmallmError(f"{weights} cannot be read ({e}); the checkpoint is corrupt") from e
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except SmallmError as e:
        raise SmallmError(f"{weights}: {e}") from e
    return model.to(device)


# ---- training state: what `smallm train --resume` needs, beside the model --------------------------------

OPTIMIZER = "optimizer.safetensors"  # per-parameter optimizer tensors, "<param index>.<name>" (the first
# optimizer, AdamW) and "<k>:<param index>.<name>" (optimizer k > 0, e.g. Muon)
RNG = "rng.safetensors"  # torch generator states as uint8 tensors
TRAINING_STATE = "state.json"  # step, tokens, best val loss, grad scaler, optimizer hyperparameters, ...
TRAINED = "trained.safetensors"  # with a weight average (--ema): the optimizer's own weights, while
# model.safetensors holds the average, the model the run gives (eval, generate and export read it)
DEVICE_KEYS = ("fused", "foreach", "capturable", "differentiable")  # how the optimizer runs, not state


def save_training_state(
    directory, model, optimizers, state: dict, extra_config=None, tokenizer_file=None, averaged=None
) -> None:
    """Write the model (as save_model does), the optimizers, torch's RNG states and `state` (JSON-able
    scalars) into `directory`, atomically: a reader sees the old checkpoint or the new one, never a mix.
    With `averaged` (a moving average of the weights) the average is the directory's model and `model`'s
    own weights go to trained.safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors, saved = {}, []
    for number, optimizer in enumerate(_as_list(optimizers)):
        optimizer_state, prefix, scalars = optimizer.state_dict(), f"{number}:" if number else "", {}
        for index, param_state in optimizer_state["state"].items():
            for name, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"{prefix}{index}.{name}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"{index}.{name}"] = value
        groups = [
            {k: v for k, v in g.items() if k not in DEVICE_KEYS} for g in optimizer_state["param_groups"]
        ]
        saved.append({"param_groups": groups, "scalars": scalars})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (devices, state bytes)
    with writing(directory), atomic_directory(directory) as tmp:
        _write_model(tmp, model if averaged is None else averaged, extra_config, tokenizer_file)
        if averaged is not None:
            save_file(_weights(model), str(tmp / TRAINED))
        save_file(tensors, str(tmp / OPTIMIZER))
        save_file(rng, str(tmp / RNG))
        write_json(tmp / TRAINING_STATE, {**state, "optimizers": saved})


def load_training_state(directory, model, optimizers, device="cpu", averaged=None) -> dict:
    """Load what save_training_state wrote into `model`, `optimizers` and `averaged` (the weight average, if
    the run keeps one), restore torch's RNG states, and return the `state` dict. Raises SmallmError if a
    file is missing or does not fit."""
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, OPTIMIZER, RNG, TRAINING_STATE):
        if not (directory / name).is_file():
            raise SmallmError(f"{directory / name} is missing; {directory} is not a complete training state")
    state = read_json(directory / TRAINING_STATE)
    if (averaged is not None) != (directory / TRAINED).is_file():
        has = "keeps" if (directory / TRAINED).is_file() else "does not keep"
        raise SmallmError(
            f"{directory} {has} a moving average of the weights; resume with the run's own --ema"
        )
    try:
        if averaged is not None:
            averaged.load_state_dict(load_file(str(directory / WEIGHTS), device=str(device)))
        weights = load_file(str(directory / (WEIGHTS if averaged is None else TRAINED)), device=str(device))
        tensors = load_file(str(directory / OPTIMIZER), device=str(device))
        rng = load_file(str(directory / RNG))
    except (SafetensorError, OSError, ValueError) as e:
        raise SmallmError(f"{directory} cannot be read ({e}); the checkpoint is corrupt") from e
    model.load_state_dict(weights)  # raises SmallmError when the shapes differ

    optimizers = _as_list(optimizers)
    saved_all = state.pop("optimizers", None) or [state.pop("optimizer")]  # "optimizer": before Muon
    if len(saved_all) != len(optimizers):
        raise SmallmError(
            f"{directory} holds {len(saved_all)} optimizer state(s) but this config uses {len(optimizers)}; "
            "resume with the run's own --optimizer"
        )
    for number, (optimizer, saved) in enumerate(zip(optimizers, saved_all, strict=True)):
        prefix = f"{number}:" if number else ""
        if prefix:
            mine = [(key[len(prefix) :], v) for key, v in tensors.items() if key.startswith(prefix)]
        else:
            mine = [(key, v) for key, v in tensors.items() if ":" not in key]
        per_param = {}
        for key, value in [*mine, *saved["scalars"].items()]:
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        current = optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in current] != [len(g["params"]) for g in saved["param_groups"]]:
            raise SmallmError(f"{directory / OPTIMIZER} does not fit this model's parameters")
        groups = []
        for now, then in zip(current, saved["param_groups"], strict=True):
            group = {**then, **{k: now[k] for k in DEVICE_KEYS if k in now}, "params": now["params"]}
            for key in ("betas", "ns_coefficients"):  # JSON made the tuple a list
                if key in group:
                    group[key] = tuple(group[key])
            groups.append(group)
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})

    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return state


def _as_list(optimizers) -> list:
    return list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
