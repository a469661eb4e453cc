"""Hand a smallm checkpoint to Hugging Face `transformers` as GPT-2, and read GPT-2-shaped checkpoints back.

smallm's GPT is GPT-2 with exact (erf) GELU, so the export is a renaming plus one transpose: GPT-2 stores
its projections as `Conv1D` with weights (in, out), where our `nn.Linear` holds (out, in). The tokenizer
files are GPT-2's own (`encoder.json` is `vocab.json`, `vocab.bpe` is `merges.txt`), so
`AutoTokenizer.from_pretrained(DIR)` gives exactly the ids that `smallm.get_tokenizer()` gives. A model
trained on a BPE of its own (`smallm prepare --tokenizer bpe:N`) takes its `tokenizer.json` along, which
transformers loads as a `PreTrainedTokenizerFast`.
Nothing here needs `transformers` installed; only loading the result does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smallm.checkpoint import WEIGHTS, atomic_directory, load_model, read_json, write_json
from smallm.config import GPTConfig
from smallm.errors import SmallmError
from smallm.generate import resolve_checkpoint
from smallm.tokenizer import EOT_TEXT, EOT_TOKEN, TOKENIZER_FILE, bpe_files, get_tokenizer

# Linear layers that GPT-2 stores as Conv1D, i.e. with the weight transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(config: GPTConfig, eot_token: int = EOT_TOKEN) -> dict:
    """The `config.json` of a GPT2LMHeadModel with the same shape as `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu",  # exact GELU, as nn.GELU(); GPT-2's own is "gelu_new" (tanh)
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """smallm GPT -> GPT2LMHeadModel tensors: Conv1D weights transposed, the tied head left out.

    A model built with bias=False gets zero biases, which computes the same function.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        tensor = tensor.detach().float().cpu()
        if name.endswith(CONV1D):
            tensor = tensor.t()  # (out, in) -> (in, out)
        state[name] = tensor.contiguous()
    if not model.config.bias:
        for name, tensor in list(state.items()):
            if name.endswith(".weight") and name != "transformer.wte.weight" and "wpe" not in name:
                bias = name.removesuffix(".weight") + ".bias"
                out_features = tensor.shape[1] if name.endswith(CONV1D) else tensor.shape[0]
                state[bias] = torch.zeros(out_features)
    return state


def to_transformers(model):
    """A transformers GPT2LMHeadModel holding this model's weights, in eval mode (needs `transformers`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config(model.config))).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    # transformers may keep non-persistent causal-mask buffers (".attn.bias") and re-ties the head itself
    if unexpected or any(not (k.endswith(".attn.bias") or k == "lm_head.weight") for k in missing):
        raise SmallmError(
            f"transformers' GPT-2 does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    hf.tie_weights()
    return hf.to(next(model.parameters()).device)


def _tokenizer_config(block_size: int, eot_token: int = EOT_TOKEN, tokenizer_class="GPT2Tokenizer") -> dict:
    return {
        "tokenizer_class": tokenizer_class,
        "model_max_length": block_size,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(eot_token): {
                "content": EOT_TEXT,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }


def _run_facts(checkpoint: Path) -> dict:
    """What the run directory around a checkpoint says: best validation loss, step, data directory."""
    facts = {}
    run = checkpoint.parent
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        best = None
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line of a killed run
            val = row.get("val_loss") if isinstance(row, dict) else None
            if isinstance(val, (int, float)) and math.isfinite(val) and (best is None or val < best[0]):
                best = (val, row.get("step"))
        if best is not None:
            facts["val_loss"], facts["step"] = best
    config_yaml = run / "config.yaml"
    if config_yaml.is_file():
        import yaml

        try:
            train_config = yaml.safe_load(config_yaml.read_text())
        except yaml.YAMLError:
            train_config = None
        if isinstance(train_config, dict):
            for key in ("data_dir", "dataset", "preset"):
                if key in train_config:
                    facts[key] = train_config[key]
    return facts


def model_card(model, checkpoint: Path, facts: dict, vocabulary: str = "GPT-2 BPE") -> str:
    """A short README.md for the exported directory."""
    c = model.config
    val = facts.get("val_loss")
    if val is not None:
        step = facts.get("step")
        at = f" (step {step})" if step is not None else ""
        loss_line = f"{val:.4f} nats/token{at}, perplexity {math.exp(val):.2f}"
    else:
        loss_line = "not recorded (no metrics.jsonl next to the checkpoint)"
    data = facts.get("data_dir") or facts.get("dataset") or "TinyStories (roneneldan/TinyStories), GPT-2 BPE"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, smallm, tinystories]
---
# smallm GPT (exported)

A small GPT trained from scratch with smallm, exported as a Hugging Face GPT-2.

- Shape: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, context {c.block_size} tokens,
  vocabulary {c.vocab_size} ({vocabulary}); {model.num_params() / 1e6:.1f}M parameters (head tied to the
  token embedding). Exact GELU, so `activation_function` is `"gelu"`.
- Data: {data}
- Validation loss: {loss_line}
- Exported from: `{checkpoint}`

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_p=0.95)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

Or back into smallm: `GPT.from_hf("path/to/this/dir")`. The model sees at most {c.block_size} tokens.
"""


def export_hf(checkpoint, out_dir, force: bool = False) -> Path:
    """Write the checkpoint at `checkpoint` (a run directory means its best/) to `out_dir` as GPT-2.

    out_dir gets config.json, model.safetensors, generation_config.json, vocab.json and merges.txt (GPT-2)
    or tokenizer.json (the checkpoint's own BPE), tokenizer_config.json, special_tokens_map.json and
    README.md, all at once (atomic directory swap).
    An existing non-empty out_dir is replaced only with force=True, or if it is an earlier export.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SmallmError(f"--out {out_dir} is a file; give a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force and not _is_export(out_dir):
        raise SmallmError(f"{out_dir} exists and is not a smallm export; choose another --out or use --force")
    if out_dir.resolve() in (checkpoint.resolve(), *checkpoint.resolve().parents):  # --force would delete it
        raise SmallmError(f"--out {out_dir} is or holds the checkpoint itself; choose another directory")
    model = load_model(checkpoint, "cpu")
    own = (checkpoint / TOKENIZER_FILE).is_file()  # a BPE trained for this model, else GPT-2's
    eot = get_tokenizer(checkpoint).eot_token
    with atomic_directory(out_dir) as tmp:
        save_file(hf_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(model.config, eot))
        write_json(
            tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        )
        if own:
            shutil.copyfile(checkpoint / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        else:
            vocab_bpe, encoder_json = bpe_files()
            shutil.copyfile(encoder_json, tmp / "vocab.json")
            shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        tokenizer_class = "PreTrainedTokenizerFast" if own else "GPT2Tokenizer"
        write_json(
            tmp / "tokenizer_config.json", _tokenizer_config(model.config.block_size, eot, tokenizer_class)
        )
        write_json(
            tmp / "special_tokens_map.json",
            {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT},
        )
        vocabulary = "a byte-level BPE trained on the data" if own else "GPT-2 BPE"
        (tmp / "README.md").write_text(model_card(model, checkpoint, _run_facts(checkpoint), vocabulary))
    return out_dir


def _is_export(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    is_gpt2 = isinstance(config, dict) and config.get("model_type") == "gpt2"
    return is_gpt2 and ((directory / "merges.txt").exists() or (directory / TOKENIZER_FILE).exists())


# ---- the way back: a GPT-2-shaped Hugging Face checkpoint -> smallm GPT ---------------------------------


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if (directory / WEIGHTS).is_file():
        files = [directory / WEIGHTS]
    elif index.is_file():
        files = [directory / name for name in sorted(set(read_json(index).get("weight_map", {}).values()))]
    elif any(directory.glob("*.bin")):
        raise SmallmError(
            f"{directory} holds only PyTorch pickle weights; smallm reads safetensors only. Convert them "
            "with transformers: AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)"
        )
    else:
        raise SmallmError(f"no {WEIGHTS} in {directory}")
    state = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise SmallmError(f"{path} cannot be read ({e}); the file is corrupt or missing") from e
    return state


def hf_gpt_config(directory) -> GPTConfig:
    """The smallm shape of a GPT-2-shaped Hugging Face checkpoint, from its config.json, or a SmallmError
    saying why it would compute something else."""
    hf = read_json(Path(directory) / "config.json")
    if hf.get("model_type") != "gpt2":
        model_type = hf.get("model_type")
        raise SmallmError(f"{directory}/config.json has model_type {model_type!r}; only 'gpt2' fits")
    act = hf.get("activation_function", "gelu_new")
    if act != "gelu":
        raise SmallmError(
            f"{directory} uses activation_function {act!r}; smallm's GPT uses exact GELU ('gelu') only, "
            "so this model would compute something different"
        )
    n_embd = hf.get("n_embd", 768)
    checks = {
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise SmallmError(f"{directory}/config.json has {key}={value!r}; smallm needs {allowed[-1]!r}")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True,
    )


def load_hf(directory, device="cpu"):
    """Read a GPT-2-shaped Hugging Face checkpoint (config.json + safetensors) into a smallm GPT."""
    from smallm.model import GPT

    directory = Path(directory)
    if not directory.is_dir():
        raise SmallmError(f"no Hugging Face model directory at {directory}")
    config = hf_gpt_config(directory)
    state = {}
    for name, tensor in _read_hf_tensors(directory).items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the original GPT-2 files name GPT2Model's tensors bare
        tensor = tensor.float()
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D) else tensor
    head = state.pop("lm_head.weight", None)
    if head is not None and "transformer.wte.weight" in state:
        if not torch.equal(head, state["transformer.wte.weight"]):
            raise SmallmError(f"{directory}: lm_head.weight is not the token embedding; smallm ties them")
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except SmallmError as e:
        raise SmallmError(f"{directory}: {e}") from e
    return model.to(device)
