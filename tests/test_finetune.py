"""`smallm train --init-from`: fine-tuning starts from the given weights, with the checkpoint's shape and
tokenizer, a fresh optimizer, and a record of where it started."""

import json

import pytest
import test_train
import torch
import yaml

from smallm.checkpoint import load_model
from smallm.cli import main
from smallm.data import Batches, prepare
from smallm.export import export_hf
from smallm.tokenizer import parse_tokenizer_spec
from smallm.train import build_config, train

SMALL = {**test_train.SMALL, "dropout": 0.0}
LEFT_OUT = ("n_layer", "n_head", "n_embd", "max_iters")  # the checkpoint sets the shape; tests set max_iters
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k not in LEFT_OUT]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained SMALL run on template stories, and other stories prepared with the same tokenizer."""
    root = tmp_path_factory.mktemp("finetune")
    test_train.write_stories(root / "a.txt", seed=0)
    test_train.write_stories(root / "b.txt", n=200, seed=1)
    prepare(root / "a", text_files=[root / "a.txt"], val_fraction=0.1, workers=1)
    prepare(root / "b", text_files=[root / "b.txt"], val_fraction=0.1, workers=1)
    train(build_config("seed", overrides=SMALL), root / "a", root / "run", progress=False)
    return root


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_step_0_loss_is_the_source_models_on_the_same_batch(source, tmp_path):
    out = tmp_path / "ft"
    assert main(["train", "--data", str(source / "b"), "--init-from", str(source / "run"), "--out", str(out),
                 "--max-iters", "2", "--n-layer", "2", *FLAGS]) == 0  # fmt: skip
    model = load_model(source / "run" / "best")
    seed, accum = build_config("seed", overrides=SMALL).seed, SMALL["gradient_accumulation_steps"]
    batches = Batches(
        source / "b", "train", SMALL["batch_size"], SMALL["block_size"], seed, accum_steps=accum
    )
    with torch.no_grad():  # the mean over step 0's micro-batches
        expected = sum(model(*batches.get(0, m))[1].item() for m in range(accum)) / accum
    first = next(r for r in rows(out) if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, abs=1e-5)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_from"] == str((source / "run" / "best").resolve())
    assert (config["n_embd"], config["n_head"]) == (32, 2)  # the checkpoint's, not the seed preset's 384/6
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["step"] == 2  # a new run: steps count from 0, with a fresh optimizer


def test_init_from_an_export_starts_from_the_same_weights(source, tmp_path):
    export_hf(source / "run", tmp_path / "hf")
    config = build_config("seed", overrides={**SMALL, "init_from": str(tmp_path / "hf"), "max_iters": 1})
    result = train(config, source / "b", tmp_path / "ft", progress=False)
    config = build_config("seed", overrides={**SMALL, "init_from": str(source / "run"), "max_iters": 1})
    reference = train(config, source / "b", tmp_path / "ft-ref", progress=False)
    assert rows(tmp_path / "ft")[0]["val_loss"] == pytest.approx(
        rows(tmp_path / "ft-ref")[0]["val_loss"], abs=1e-5
    )
    assert result["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-4)


@pytest.fixture(scope="module")
def bpe_data(source):
    prepare(source / "bpe", text_files=[source / "b.txt"], val_fraction=0.1, tokenizer="bpe:300")
    return source / "bpe"


@pytest.mark.parametrize(
    "data, init_from, extra, message",
    [
        ("b", "run", ["--n-embd", "64"], "--n-embd 64 differs from 32 in"),
        ("bpe", "run", [], "cannot fine-tune"),  # data of another tokenizer
        ("b", "nope", [], "no run or checkpoint directory at"),
    ],
)
def test_refusals_are_one_line(data, init_from, extra, message, source, bpe_data, tmp_path, capsys):
    args = [
        "--data",
        str(source / data),
        "--init-from",
        str(source / init_from),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(["train", *args, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_finetune_preset_takes_the_checkpoints_shape(source, capsys):
    assert main(["train", "--preset", "finetune", "--init-from", str(source / "run"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = build_config("finetune", overrides={"init_from": str(source / "run")})
    assert printed == expected.to_dict()
    assert (printed["n_layer"], printed["n_embd"], printed["block_size"]) == (2, 32, 32)  # not the seed's


def test_a_gpt2_checkpoint_as_tokenizer_means_gpt2(source):
    assert parse_tokenizer_spec(str(source / "run")) == ("gpt2", None)
    assert parse_tokenizer_spec(str(source / "run" / "best")) == ("gpt2", None)
