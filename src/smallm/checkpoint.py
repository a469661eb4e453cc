"""Checkpoint folders: `model.safetensors` + `config.json`, written atomically, read without pickle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smallm.config import GPTConfig
from smallm.errors import SmallmError

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
    try:
        yield tmp
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj) -> None:
    """Write JSON to path atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SmallmError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallmError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def save_model(model, directory, extra_config: dict | None = None) -> None:
    """Write the model's weights (tied head stored once) and config into `directory`, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = {**model.config.to_dict(), "tokenizer": "gpt2", **(extra_config or {})}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)


def load_model(directory, device="cpu"):
    """Build the GPT described by `directory/config.json` and load `directory/model.safetensors`."""
    from smallm.model import GPT

    directory = Path(directory)
    if not directory.is_dir():
        raise SmallmError(f"no checkpoint directory at {directory}")
    config_dict = read_json(directory / CONFIG)
    if config_dict.get("tokenizer", "gpt2") != "gpt2":
        raise SmallmError(
            f"{directory} uses tokenizer {config_dict['tokenizer']!r}; smallm knows only 'gpt2'"
        )
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SmallmError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise SmallmError(f"{weights} cannot be read ({e}); the checkpoint is corrupt") from e
    model = GPT(GPTConfig.from_dict(config_dict))
    try:
        model.load_state_dict(state)
    except SmallmError as e:
        raise SmallmError(f"{weights}: {e}") from e
    return model.to(device)
