"""On a CUDA GPU: training in bf16 and in fp16 + GradScaler, the chunked loss and its gradients, resume
exactness, KV-cache generation, torch.compile and the pinned batch copy. Marked `cuda`: skipped, with the
reason, where there is no GPU (`pytest -m cuda -rs` lists them). bench/gpu_check.sh runs them."""

import contextlib
import json

import pytest
import test_train
import torch
from torch.nn import functional as F

from smallm import GPT, GPTConfig
from smallm.data import Batches
from smallm.model import linear_cross_entropy
from smallm.train import build_config, resume_config, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]

data_dir, SMALL = test_train.data_dir, test_train.SMALL
ON_GPU = {**SMALL, "device": "cuda"}


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_losses(run):
    return [r["val_loss"] for r in rows(run) if "val_loss" in r]


@pytest.fixture(scope="module")
def fp32_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fp32") / "run"
    train(build_config("seed", overrides={**ON_GPU, "dtype": "float32"}), data_dir, run, progress=False)
    return run


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_training_in_16_bits_learns_like_fp32(data_dir, tmp_path, fp32_run, dtype):
    run = tmp_path / "run"
    result = train(build_config("seed", overrides={**ON_GPU, "dtype": dtype}), data_dir, run, progress=False)
    first, *_, last = val_losses(run)
    assert last < first - 1.0  # it learned (10.8 -> 9.5 in fp32 on CPU)
    # fp16: the scaler may skip a first step or two (inf gradients at its initial scale of 65536)
    assert result["val_loss"] == pytest.approx(
        val_losses(fp32_run)[-1], abs=0.05 if dtype == "bfloat16" else 0.2
    )
    scaler = json.loads((run / "last" / "state.json").read_text())["scaler"]
    if dtype == "float16":  # the GradScaler ran and its state is saved for resuming
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    else:
        assert not scaler  # bf16 needs no scaler


def test_auto_dtype_on_this_gpu_follows_its_compute_capability():
    from smallm.device import pick_device, pick_dtype

    device = pick_device("cuda")
    major, _ = torch.cuda.get_device_capability(device)
    expected = "bfloat16" if major >= 8 or torch.version.hip else "float16"
    assert pick_dtype("auto", device)[0] == expected


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_chunked_loss_and_gradients_match_f_cross_entropy(autocast):
    N, C, V = 300, 64, 9000
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    w = torch.randn(V, C, device="cuda", requires_grad=True)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::7] = -1
    results = []
    for fast in (True, False):
        with torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext():
            if fast:
                loss = linear_cross_entropy(x, w, targets, chunk_rows=64)
            else:
                loss = F.cross_entropy((x @ w.t()).float(), targets, ignore_index=-1)
        (2.5 * loss).backward()
        results.append((loss.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    (loss, gx, gw), (ref, ref_gx, ref_gw) = results
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    tol = 1e-4 if autocast is None else 1e-2  # 16-bit matmul inputs: parts in 1000 of the largest entry
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=tol * ref_gx.abs().max().item())
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=tol * ref_gw.abs().max().item())


def test_resume_on_gpu_ends_with_the_same_losses(data_dir, tmp_path):
    schedule = {**ON_GPU, "dtype": "auto", "lr_decay_iters": SMALL["max_iters"]}
    whole = tmp_path / "whole"
    train(build_config("seed", overrides=schedule), data_dir, whole, progress=False)
    halves = tmp_path / "halves"
    train(build_config("seed", overrides={**schedule, "max_iters": 6}), data_dir, halves, progress=False)
    config, _ = resume_config(halves, {"max_iters": SMALL["max_iters"]})
    train(config, data_dir, halves, resume=True, progress=False)
    resumed = [(r["step"], r["loss"]) for r in rows(halves) if "loss" in r]
    expected = [(r["step"], pytest.approx(r["loss"], rel=1e-3)) for r in rows(whole) if "loss" in r]
    assert resumed == expected
    assert val_losses(halves)[-1] == pytest.approx(val_losses(whole)[-1], rel=1e-3)


def test_kv_cache_generation_equals_recomputation():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)).cuda().eval()
    idx = torch.randint(0, 50257, (3, 5), device="cuda")
    new = 3 * model.config.block_size  # past the context: the cache is refilled
    cached = model.generate(idx, new, temperature=0, use_kv_cache=True)
    recomputed = model.generate(idx, new, temperature=0, use_kv_cache=False)
    assert cached.shape == (3, 5 + new) and torch.equal(cached, recomputed)


def test_compiled_training_matches_eager(data_dir, tmp_path):
    runs = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        # no dropout: compiled kernels draw other random numbers than eager ones
        overrides = {**ON_GPU, "dtype": "auto", "compile": compiled, "max_iters": 6, "dropout": 0.0}
        train(build_config("seed", overrides=overrides), data_dir, run, progress=False)
        runs[compiled] = [r["loss"] for r in rows(run) if "loss" in r]
    assert runs[True] == pytest.approx(runs[False], rel=1e-2)


def test_batches_on_gpu_equal_the_cpu_ones(data_dir):
    on_gpu = Batches(data_dir, "train", batch_size=4, block_size=16, device="cuda").get(3)
    on_cpu = Batches(data_dir, "train", batch_size=4, block_size=16, device="cpu").get(3)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.is_cuda and gpu.is_contiguous() and torch.equal(gpu.cpu(), cpu)
