"""How often batching changes a token: greedy (and seeded) generation of prompts as one ragged batch vs
each prompt alone, on a trained checkpoint.

A batched decode step runs the same math as batch 1, but matmuls over several rows and attention over a
masked, longer key range may round differently in the last bits; where the top two logits are that close,
argmax (or a sampled draw) can flip, and the two continuations part from there. This counts, per
sequence, the tokens that agree before the first difference, and how many sequences differ at all.

Prompts are the first 1 .. block_size + 8 tokens of stories from --text (TinyStories format), in batches
of --batch-size prompts of different lengths, each continued by --new-tokens tokens (past block_size).

    python bench/batch_flips.py RUN --text /path/to/tinystories-valid.txt
"""

from __future__ import annotations

import argparse
import random

import torch

from smallm.generate import encode_prompt, load_for_inference


def compare(batched, alone, prompt_len) -> tuple[int, bool]:
    """(new tokens that agree before the first difference, whether they differ at all)."""
    a, b = batched[prompt_len:], alone[prompt_len:]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i, True
    return len(a), False


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run")
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()

    model, directory = load_for_inference(args.run, "cpu")
    block_size = model.config.block_size
    stories = [s.strip() for s in open(args.text, encoding="utf-8").read().split("<|endoftext|>")]
    stories = [s for s in stories if s]
    rng = random.Random(0)
    prompts = []
    for story in rng.sample(stories, args.prompts):
        ids = encode_prompt(story)
        prompts.append(ids[: rng.randint(1, block_size + 8)] or ids[:1])

    print(
        f"{directory}: block_size {block_size}; {len(prompts)} prompts of 1-{block_size + 8} tokens, "
        f"batches of {args.batch_size}, {args.new_tokens} new tokens each, torch threads "
        f"{torch.get_num_threads()}"
    )
    for mode in ("greedy", "seeded sampling (T=0.8, top_k 200)"):
        sampled = mode != "greedy"
        kwargs = dict(temperature=0.8, top_k=200) if sampled else dict(temperature=0)
        agree, differ = 0, 0
        for start in range(0, len(prompts), args.batch_size):
            group = prompts[start : start + args.batch_size]
            seeds = list(range(start, start + len(group)))
            gens = [torch.Generator().manual_seed(s) for s in seeds] if sampled else None
            batched = model.generate(group, args.new_tokens, generator=gens, **kwargs)
            for prompt, out, seed in zip(group, batched, seeds, strict=True):
                g = torch.Generator().manual_seed(seed) if sampled else None
                alone = model.generate(torch.tensor([prompt]), args.new_tokens, generator=g, **kwargs)[0]
                n, flipped = compare(out.tolist(), alone.tolist(), len(prompt))
                agree += n
                differ += flipped
        print(
            f"{mode}: {differ}/{len(prompts)} sequences differ from their batch-1 run; "
            f"{agree} tokens compared up to the first difference; "
            f"{differ / max(agree, 1):.2e} flips per token"
        )


if __name__ == "__main__":
    main()
