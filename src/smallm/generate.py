"""Sampling text from a trained model: find its checkpoint, stream tokens, decode them as they come.

`smallm generate RUN --prompt TEXT` is `resolve_checkpoint` + `load_model` + `generate_text` (its
--num-samples decode as one batch, see smallm.model.Decoder).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from smallm.checkpoint import CONFIG, load_model
from smallm.device import inference_dtype, pick_device
from smallm.errors import SmallmError
from smallm.model import Decoder
from smallm.tokenizer import EOT_TEXT, EOT_TOKEN, get_tokenizer


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory meant by `path`: a run directory means its `best/` checkpoint (so
    `runs/latest` works too); a directory holding config.json is a checkpoint itself."""
    path = Path(path)
    if not path.is_dir():
        raise SmallmError(f"no run or checkpoint directory at {path}")
    if (path / CONFIG).is_file():
        return path
    if (path / "best" / CONFIG).is_file():
        return path / "best"
    hint = f"; {path / 'last'} holds the latest training state" if (path / "last" / CONFIG).is_file() else ""
    raise SmallmError(
        f"{path} is neither a checkpoint (no {CONFIG}) nor a run with a best/ checkpoint{hint}; "
        "pass a run directory written by `smallm train` or a checkpoint directory"
    )


def load_for_inference(path, device=None, dtype="auto"):
    """resolve_checkpoint + load_model, in eval mode, on `device` (default: cuda > mps > cpu), its weights
    cast to `dtype` (see smallm.device.inference_dtype; "auto" keeps fp32). Returns (model, checkpoint
    directory)."""
    device = pick_device(device or "auto")
    dtype = inference_dtype(dtype)
    directory = resolve_checkpoint(path)
    return load_model(directory, device).to(getattr(torch, dtype)).eval(), directory


def stream(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids continuing prompt_ids, one at a time (batch 1, KV cached).

    If eos_token_id is given and sampled, it is yielded as the last id. An empty prompt starts from
    <|endoftext|>. Call model.eval() first (the CLI and the server load models in eval mode).
    """
    device = model.lm_head.weight.device
    idx = torch.tensor([list(prompt_ids) or [EOT_TOKEN]], dtype=torch.long, device=device)  # (1, T)
    steps = model.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, generator=generator)
    for next_id in steps:
        token = int(next_id)
        yield token
        if token == eos_token_id:
            return


def encode_prompt(prompt: str, tokenizer=None) -> list[int]:
    """Ids of prompt (tokenizer None: GPT-2); `<|endoftext|>` in the text is the special token."""
    return (tokenizer or get_tokenizer()).encode(prompt, allowed_special={EOT_TEXT})


def generate_text(
    model,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eot: bool = True,
    write=None,
    tokenizer=None,
) -> list[str]:
    """Sample num_samples continuations of prompt, as one batch; returns each sample's text (prompt +
    continuation).

    write(text), when given, receives the samples in order, piece by piece: the prompt, then every new
    token's text (decoded incrementally so a character split across tokens is never broken), with a
    separator line between samples. The first unfinished sample is written as it is produced; the later
    ones are held until it ends. Sample i draws from its own generator seeded seed + i, so the same seed
    gives the same texts, and sample i alone is `seed + i`'s first sample. With stop_at_eot a sample ends
    at <|endoftext|> (not shown); without, generation runs on and the marker appears as text. tokenizer:
    the model's (`get_tokenizer(checkpoint)`); None is GPT-2.
    """
    tokenizer = tokenizer or get_tokenizer()
    prompt_ids = encode_prompt(prompt, tokenizer) or [tokenizer.eot_token]
    device = model.lm_head.weight.device
    generators = [torch.Generator(device=device) for _ in range(num_samples)]
    for i, generator in enumerate(generators):
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + i)
    write = write or (lambda text: None)
    eos = tokenizer.eot_token if stop_at_eot else None
    decoder = Decoder(model, num_samples)
    rows = [decoder.add(prompt_ids, temperature, top_k, top_p, g) for g in generators]
    pieces = [[prompt] for _ in rows]  # each sample's text so far
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in rows]
    done = [max_new_tokens == 0] * num_samples
    shown = [0] * num_samples  # pieces of each sample already written
    current = 0  # the sample being written

    def show():  # write what can be written now, in order
        nonlocal current
        while current < num_samples:
            if current > 0 and shown[current] == 0:
                write("\n---------------\n")
            for piece in pieces[current][shown[current] :]:
                if piece:
                    write(piece)
            shown[current] = len(pieces[current])
            if not done[current]:
                return
            current += 1

    def end(i):  # sample i is finished: flush a character cut short by its last token
        pieces[i].append(decoders[i].decode(b"", final=True))
        done[i] = True

    show()
    for _ in range(max_new_tokens):
        decoder.step()
        for i, row in enumerate(rows):
            if done[i]:
                continue
            if row.tokens[-1] == eos:
                decoder.remove(row)
                end(i)
            else:
                pieces[i].append(decoders[i].decode(tokenizer.decode_single_token_bytes(row.tokens[-1])))
        show()
        if all(done):
            break
    for i in range(num_samples):
        if not done[i]:
            end(i)
    show()
    return ["".join(p) for p in pieces]


def detokenize(tokens: Iterable[int], tokenizer=None) -> Iterator[str]:
    """Yield the text of tokens as they come. A token can end inside a UTF-8 character (emoji, CJK are
    often split across tokens); those bytes are held back until the character is complete, so the pieces
    never contain a broken character and join to exactly tokenizer.decode(tokens) (None: GPT-2)."""
    enc = tokenizer or get_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(enc.decode_single_token_bytes(token))
        if piece:
            yield piece
    piece = decoder.decode(b"", final=True)  # bytes left at the end of an unfinished character
    if piece:
        yield piece
