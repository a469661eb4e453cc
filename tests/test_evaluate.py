import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from smallm import GPT, SmallmError
from smallm.cli import main
from smallm.evaluate import evaluate
from smallm.tokenizer import EOT_TOKEN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(small_config):
    torch.manual_seed(0)
    return GPT(small_config).eval()


def write_prepared(directory, splits: dict) -> None:
    """A prepared data directory as the interface describes it: uint16 bins + meta.json."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": EOT_TOKEN}
    meta |= {"source": "test", "splits": {}}
    for name, (tokens, n_bytes) in splits.items():
        np.asarray(tokens, dtype=np.uint16).tofile(directory / f"{name}.bin")
        meta["splits"][name] = {"documents": 1, "tokens": len(tokens), "bytes": n_bytes}
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    validation = rng.integers(0, 50257, 3 * 32 + 11)  # three full windows of the 32-token context + a rest
    write_prepared(
        tmp_path / "data", {"train": (rng.integers(0, 50257, 50), 200), "validation": (validation, 400)}
    )
    return tmp_path / "data"


def direct_loss(model, tokens, block_size):
    """Mean loss of predicting tokens[i] from the tokens before it in its window, one position at a time."""
    losses = []
    with torch.no_grad():
        for i in range(1, len(tokens)):
            start = (i - 1) // block_size * block_size  # the window that holds input position i - 1
            context = torch.tensor([tokens[start:i]], dtype=torch.long)
            logits, _ = model(context)  # (1, 1, V): the prediction for position i
            losses.append(F.cross_entropy(logits[0], torch.tensor([tokens[i]])).item())
    return sum(losses) / len(losses), len(losses)


def test_eval_loss_equals_a_direct_computation_and_metrics_agree(model, data_dir):
    tokens = np.fromfile(data_dir / "validation.bin", dtype=np.uint16).astype(np.int64).tolist()
    expected, n = direct_loss(model, tokens, model.config.block_size)
    result = evaluate(model, data_dir, "validation", batch_size=2)
    assert result["tokens"] == n == len(tokens) - 1  # every token but the first is predicted once
    assert result["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(expected * n / (math.log(2) * 400), rel=1e-5)


def test_eval_is_deterministic_and_independent_of_batch_size(model, data_dir):
    model.train()  # evaluate switches dropout off and restores the mode
    first = evaluate(model, data_dir, batch_size=1)
    assert model.training
    assert evaluate(model, data_dir, batch_size=1) == first
    assert evaluate(model, data_dir, batch_size=8)["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)


def test_eval_of_a_missing_split_or_directory_is_a_clear_error(model, data_dir, tmp_path):
    with pytest.raises(SmallmError, match="test"):
        evaluate(model, data_dir, split="test")
    with pytest.raises(SmallmError, match="prepare"):
        evaluate(model, tmp_path / "nothing-here")
    with open(data_dir / "validation.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(SmallmError, match="truncated"):
        evaluate(model, data_dir)


def test_cli_eval_prints_one_json_line_end_to_end(model, data_dir, tmp_path):
    model.save_pretrained(tmp_path / "run" / "best")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smallm", "eval", str(tmp_path / "run"), "--data", str(data_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert set(metrics) == {"val_loss", "perplexity", "bits_per_byte", "tokens"}
    assert metrics == pytest.approx(evaluate(model, data_dir), rel=1e-6)
    assert "perplexity" in result.stderr and "bits per byte" in result.stderr


def test_cli_eval_bad_paths_are_one_line_and_exit_1(model, data_dir, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data_dir)]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data_dir), "--split", "test"]) == 1
    assert "'test'" in capsys.readouterr().err
