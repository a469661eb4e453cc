"""smallm.device: device and dtype choices from injected hardware facts (CPU flags, compute capability,
torch version), the MFU peaks, the pinned batch copy, and inference in another dtype."""

import pytest
import torch

import smallm.device
from smallm import GPT
from smallm.cli import main
from smallm.device import cpu_bf16_flag, peak_flops_of, pick_device, pick_dtype, pick_ns_dtype
from smallm.errors import SmallmError
from smallm.generate import load_for_inference
from smallm.model import autocast_dtype

CPU, CUDA0, CUDA1, MPS = (torch.device(d) for d in ("cpu", "cuda:0", "cuda:1", "mps"))


def test_cpu_bf16_flag_is_read_from_the_flags_line(tmp_path):
    cpus = {
        "sapphire": "fpu avx512f avx512_bf16 amx_bf16 amx_tile",
        "epyc": "fpu avx512f avx512_bf16 avx512_vnni",
        "plain": "fpu avx2 avx512f",
    }
    for name, flags in cpus.items():
        (tmp_path / name).write_text(
            f"processor\t: 0\nmodel name\t: amx_bf16 in a name\nflags\t\t: {flags}\n"
        )
    assert cpu_bf16_flag(str(tmp_path / "sapphire")) == "amx_bf16"
    assert cpu_bf16_flag(str(tmp_path / "epyc")) == "avx512_bf16"
    assert cpu_bf16_flag(str(tmp_path / "plain")) is None  # "amx_bf16" in the model name does not count
    assert cpu_bf16_flag(str(tmp_path / "missing")) is None  # macOS, Windows: no /proc/cpuinfo


@pytest.mark.parametrize(
    "flag, dtype", [("amx_bf16", "bfloat16"), ("avx512_bf16", "bfloat16"), (None, "float32")]
)
def test_auto_on_cpu_is_bf16_with_either_bf16_flag_else_fp32(monkeypatch, flag, dtype):
    monkeypatch.setattr(smallm.device, "cpu_bf16_flag", lambda: flag)
    chosen, why = pick_dtype("auto", CPU)
    assert chosen == dtype and why.startswith("auto: the CPU has")
    assert (flag or "neither") in why
    assert pick_dtype("float32", CPU) == ("float32", "asked for")  # an explicit dtype wins
    assert pick_dtype("bfloat16", CPU) == ("bfloat16", "asked for")


def test_auto_on_cuda_reads_the_capability_of_the_gpu_in_use_not_is_bf16_supported(monkeypatch):
    capabilities = {0: (7, 5), 1: (8, 0)}  # a T4 as GPU 0, an A100 as GPU 1
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capabilities[device.index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # torch >= 2.3 on a T4
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", CUDA0) == ("float16", "auto: compute capability 7.5 < 8.0 has no bf16; "
                                         "fp16 + grad scaler")  # fmt: skip
    assert pick_dtype("auto", CUDA1)[0] == "bfloat16"
    capabilities[1] = (9, 0)  # H100
    assert pick_dtype("auto", CUDA1) == ("bfloat16", "auto: compute capability 9.0 has bf16 tensor cores")
    assert pick_dtype("bfloat16", CUDA0) == ("bfloat16", "asked for")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")  # ROCm: bf16 on the GPUs it supports
    assert pick_dtype("auto", CUDA0) == ("bfloat16", "auto: ROCm GPU")


def test_muon_newton_schulz_is_bf16_only_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(smallm.device, "cpu_bf16_flag", lambda: None)  # an AVX2-only CPU
    assert pick_ns_dtype("auto", CPU) == ("float32", "auto: the CPU has neither amx_bf16 nor avx512_bf16")
    assert pick_ns_dtype("bfloat16", CPU) == ("bfloat16", "asked for")
    monkeypatch.setattr(smallm.device, "cpu_bf16_flag", lambda: "avx512_bf16")
    assert pick_ns_dtype("auto", CPU) == ("bfloat16", "auto: the CPU has avx512_bf16")
    assert pick_ns_dtype("float32", CPU) == ("float32", "asked for")
    capabilities = {0: (7, 5), 1: (8, 6)}  # a T4: fp16 autocast, but fp32 Newton-Schulz; an A10
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capabilities[device.index])
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_ns_dtype("auto", CUDA0) == ("float32", "auto: compute capability 7.5 < 8.0 has no bf16")
    assert pick_ns_dtype("auto", CUDA1)[0] == "bfloat16"
    assert pick_ns_dtype("auto", MPS) == ("float32", "auto: mps")


def test_mps_dtypes_follow_the_torch_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1")  # no MPS autocast at all
    assert pick_dtype("auto", MPS)[0] == "float32"
    with pytest.raises(SmallmError, match=r"--dtype bfloat16 on MPS needs torch >= 2.6 \(this is 2.4.1\)"):
        pick_dtype("bfloat16", MPS)
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert pick_dtype("bfloat16", MPS) == ("bfloat16", "asked for")
    with pytest.raises(SmallmError, match="float16 on MPS needs torch >= 2.8"):  # its GradScaler
        pick_dtype("float16", MPS)
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # compared as numbers, not strings
    assert pick_dtype("float16", MPS)[0] == "float16"
    assert pick_dtype("auto", MPS)[0] == "float32"


def test_autocast_dtype_is_off_where_torch_has_no_autocast_for_the_device(monkeypatch):
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16

    def torch_2_4(device_type):
        if device_type == "mps":
            raise RuntimeError("unsupported autocast device_type 'mps'")
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", torch_2_4)
    assert autocast_dtype("mps") is None


def test_cuda_device_follows_local_rank_and_a_conflicting_index_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == CUDA0
    assert pick_device("cuda", local_rank=1, distributed=True) == CUDA1
    assert pick_device("cuda:1", local_rank=1, distributed=True) == CUDA1
    assert pick_device("cuda:1") == CUDA1  # one process: any GPU
    with pytest.raises(SmallmError, match="--device cuda:0 under torchrun would put every process on GPU 0"):
        pick_device("cuda:0", local_rank=1, distributed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == MPS
    with pytest.raises(SmallmError, match="CUDA is not available"):
        pick_device("cuda")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA L40S", 362e12),
        ("Tesla T4", 65e12),
        ("Some Future GPU", None),
    ],
)
def test_mfu_peak_tells_h100_pcie_from_sxm(name, peak):
    assert peak_flops_of(name) == peak


# ---- inference precision ----------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path, small_config):
    GPT(small_config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_load_for_inference_casts_weights_and_auto_keeps_fp32(checkpoint):
    model, _ = load_for_inference(checkpoint, "cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    half, _ = load_for_inference(checkpoint, "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters()) and not half.training
    idx = torch.randint(0, 50257, (2, 16))
    with torch.inference_mode():
        _, loss = model(idx, idx, return_logits=False)
        _, half_loss = half(idx, idx, return_logits=False)
        tokens = half.generate(idx[:1], 5, temperature=0)
    assert half_loss.dtype == torch.float32 and half_loss.item() == pytest.approx(loss.item(), rel=1e-2)
    assert tokens.shape == (1, 21)
    with pytest.raises(SmallmError, match="--dtype must be one of auto, float32, bfloat16, float16"):
        load_for_inference(checkpoint, "cpu", "int8")


def test_generate_eval_and_serve_take_dtype(checkpoint, capsys, one_thread):
    args = ["generate", str(checkpoint), "--prompt", "Once", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--temperature", "0", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    with pytest.raises(SystemExit):
        main([*args, "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    for verb in ("eval", "serve"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--dtype {auto,float32,bfloat16,float16}" in capsys.readouterr().out
