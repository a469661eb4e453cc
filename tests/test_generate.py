import math
import os
import subprocess
import sys

import pytest
import torch

from smallm import GPT, SmallmError, get_tokenizer
from smallm.cli import main
from smallm.generate import detokenize, generate_text, resolve_checkpoint, stream
from smallm.model import sample_next_token, top_k_filter, top_p_filter
from smallm.tokenizer import EOT_TOKEN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(small_config):
    torch.manual_seed(0)
    return GPT(small_config).eval()


@pytest.fixture
def run_dir(tmp_path, model):
    """A run directory as `smallm train` leaves it: the checkpoint in RUN/best."""
    model.save_pretrained(tmp_path / "run" / "best")
    return tmp_path / "run"


def prompts(batch_size, length, seed=1):
    return torch.randint(0, 50257, (batch_size, length), generator=torch.Generator().manual_seed(seed))


# ---- the KV cache ---------------------------------------------------------------------------------------


def test_kv_cache_equals_recomputation_token_for_token_past_block_size(model):
    idx = prompts(3, 5)
    new = 3 * model.config.block_size  # far past the 32-token context: the cache is refilled every step
    cached = model.generate(idx, new, temperature=0, use_kv_cache=True)
    recomputed = model.generate(idx, new, temperature=0, use_kv_cache=False)
    assert cached.shape == (3, 5 + new)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, recomputed)


def test_kv_cache_logits_equal_full_forward(model):
    from smallm.model import KVCache

    idx = prompts(2, 20)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    with torch.no_grad():
        model(idx[:, :12], kv_cache=cache)
        for t in range(12, 20):  # one position per step
            step_logits, _ = model(idx[:, t : t + 1], kv_cache=cache)
            full_logits, _ = model(idx[:, : t + 1])
            torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [20, 20]


def test_greedy_equals_transformers_greedy_on_the_same_weights(model):
    from smallm.export import to_transformers

    hf = to_transformers(model)
    idx = prompts(2, 6)
    new = model.config.block_size - 6  # transformers cannot go past n_positions
    expected = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=EOT_TOKEN,
    )
    assert torch.equal(model.generate(idx, new, temperature=0), expected)
    assert torch.equal(model.generate(idx, new, temperature=1.0, top_k=1), expected)  # top_k 1 is greedy


def test_prompt_longer_than_context_uses_its_last_block_size_tokens(model):
    block_size = model.config.block_size
    idx = prompts(2, block_size + 18)
    out = model.generate(idx, 10, temperature=0)
    assert torch.equal(out[:, : idx.size(1)], idx)  # the whole prompt is returned
    from_tail = model.generate(idx[:, -block_size:], 10, temperature=0)
    assert torch.equal(out[:, idx.size(1) :], from_tail[:, block_size:])
    assert torch.equal(out, model.generate(idx, 10, temperature=0, use_kv_cache=False))


def test_batched_prompts_equal_one_at_a_time(model):
    idx = prompts(4, 7)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    batched = model.generate(idx, 40, temperature=0)
    for row in range(4):
        assert torch.equal(batched[row : row + 1], model.generate(idx[row : row + 1], 40, temperature=0))
    # sampling in a batch is reproducible as well
    a = model.generate(idx, 40, temperature=1.0, top_k=50, generator=gen(5))
    b = model.generate(idx, 40, temperature=1.0, top_k=50, generator=gen(5))
    assert torch.equal(a, b)


def ragged_prompts(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


# prompts of different lengths: 1 token, near block_size (32), exactly it, and past it
RAGGED = [7, 1, 30, 31, 32, 45, 12]


def test_batched_ragged_prompts_equal_one_by_one_greedy(model):
    prompts_ = ragged_prompts(RAGGED)
    new = 40  # every row crosses block_size: the cache rows are refilled / recomputed per row
    batched = model.generate(prompts_, new, temperature=0)
    assert [len(out) for out in batched] == [n + new for n in RAGGED]
    for prompt, out in zip(prompts_, batched, strict=True):
        alone = model.generate(torch.tensor([prompt]), new, temperature=0)[0]
        assert torch.equal(out, alone)
        assert out[: len(prompt)].tolist() == prompt
    reference = model.generate(prompts_, new, temperature=0, use_kv_cache=False)  # no cache, no batch
    assert all(torch.equal(a, b) for a, b in zip(batched, reference, strict=True))


def test_batched_ragged_prompts_equal_one_by_one_seeded_sampling(model):
    prompts_ = ragged_prompts(RAGGED, seed=3)

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(prompts_))]

    batched = model.generate(prompts_, 40, temperature=1.0, top_p=0.9, top_k=100, generator=gens())
    for prompt, g, out in zip(prompts_, gens(), batched, strict=True):
        alone = model.generate(torch.tensor([prompt]), 40, temperature=1.0, top_p=0.9, top_k=100, generator=g)
        assert torch.equal(out, alone[0])
    assert len({tuple(out[-40:].tolist()) for out in batched}) == len(prompts_)  # really sampled


def test_decoder_rows_join_and_leave_mid_batch(model):
    """Sequences join a running batch at different steps and leave early; each gets exactly what it
    gets alone, and a finished one frees its cache row for the next."""
    from smallm.model import Decoder

    prompts_ = ragged_prompts([5, 29, 1, 12, 33, 8], seed=4)
    plan = [  # (joins before step, leaves after this many tokens, seeded or greedy)
        (0, 40, None),
        (0, 3, 11),
        (2, 25, None),
        (3, 6, 12),
        (5, 10, 13),
        (9, 20, None),  # joins once the 4th row has left: takes its row in the cache
    ]
    decoder = Decoder(model, max_batch=4)
    rows, done = {}, {}
    for step in range(60):
        for i, (joins, _, seed) in enumerate(plan):
            if joins == step:
                g = torch.Generator().manual_seed(seed) if seed is not None else None
                rows[i] = decoder.add(prompts_[i], 0 if seed is None else 1.0, None, None, g)
        assert len(decoder.sequences) <= 4 and len(decoder.slots) <= 4
        if not decoder.sequences:
            break
        tokens = decoder.step()
        assert tokens == [r.tokens[-1] for r in decoder.sequences]
        for i, row in list(rows.items()):
            if len(row.tokens) - len(prompts_[i]) == plan[i][1]:
                decoder.remove(row)
                done[i] = rows.pop(i).tokens
    assert sorted(done) == list(range(len(plan))) and not decoder.slots
    for i, (_, n, seed) in enumerate(plan):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        temperature = 0 if seed is None else 1.0
        alone = model.generate(torch.tensor([prompts_[i]]), n, temperature=temperature, generator=g)[0]
        assert done[i] == alone.tolist(), f"sequence {i}"
    with pytest.raises(SmallmError, match="full"):
        for _ in range(5):
            decoder.add([1, 2, 3])


# ---- sampling -----------------------------------------------------------------------------------------


def kept(filtered):
    return set(torch.nonzero(torch.isfinite(filtered[0])).flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5, -4.0, 1.0]])
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 3)) == {1, 4, 3}
    assert kept(top_k_filter(logits, 100)) == set(range(7))
    filtered = top_k_filter(logits, 3)
    assert torch.equal(filtered[0, [1, 4, 3]], logits[0, [1, 4, 3]])  # kept logits are unchanged


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 2, 0
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.3)) == {1}  # the most likely token alone already reaches 0.3
    assert kept(top_p_filter(logits, 0.5)) == {1, 3}  # 0.4 < 0.5 <= 0.7
    assert kept(top_p_filter(logits, 0.8)) == {1, 3, 4}  # 0.7 < 0.8 <= 0.85
    assert kept(top_p_filter(logits, 0.9)) == {1, 3, 4, 2}
    assert kept(top_p_filter(logits, 1.0)) == set(range(5))
    assert kept(top_p_filter(logits, 1e-9)) == {1}  # never empty


def test_sampling_draws_only_from_the_kept_tokens():
    logits = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = set(sample_next_token(logits, 1.0, top_p=0.5, generator=g).flatten().tolist())
    assert drawn == {1, 3}
    drawn = set(sample_next_token(logits, 1.0, top_k=3, generator=g).flatten().tolist())
    assert drawn == {1, 3, 4}
    assert set(sample_next_token(logits, 0.0).flatten().tolist()) == {1}  # temperature 0 is greedy


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    idx = prompts(1, 4)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(idx, 30, temperature=1.0, top_p=0.9, generator=g)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1.0), dict(temperature=math.nan), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)],
)
def test_meaningless_sampling_settings_are_clear_errors(model, kwargs):
    with pytest.raises(SmallmError):
        model.generate(prompts(1, 3), 5, **kwargs)


def test_negative_length_or_empty_prompt_are_clear_errors(model):
    with pytest.raises(SmallmError, match="max_new_tokens"):
        model.generate(prompts(1, 3), -1)
    with pytest.raises(SmallmError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    assert torch.equal(model.generate(prompts(1, 3), 0), prompts(1, 3))


# ---- stopping at <|endoftext|> ----------------------------------------------------------------------------


def test_generate_stops_at_endoftext_per_row_and_pads(model):
    idx = prompts(3, 4)
    free = model.generate(idx, 40, temperature=0)  # (3, 44), nothing stops it
    eos = int(free[0, 4 + 5])  # row 0 produces this token 6th: use it as the end-of-text token
    out = model.generate(idx, 40, temperature=0, eos_token_id=eos)
    ends = []
    for row in range(3):
        new = free[row, 4:].tolist()
        end = new.index(eos) + 1 if eos in new else len(new)  # up to and including the first eos
        ends.append(end)
        assert out[row, 4 : 4 + end].tolist() == new[:end]
        assert (out[row, 4 + end :] == eos).all()  # padded after it
    assert ends[0] <= 6
    assert out.size(1) == 4 + max(ends)  # stops once every row is done


def test_stream_yields_generate_tokens_and_stops_after_eos(model):
    prompt = prompts(1, 5)
    free = model.generate(prompt, 20, temperature=0)[0, 5:].tolist()
    assert list(stream(model, prompt[0].tolist(), 20, temperature=0)) == free
    eos = free[3]
    first = free.index(eos)
    assert list(stream(model, prompt[0].tolist(), 20, temperature=0, eos_token_id=eos)) == free[: first + 1]
    sampled = lambda seed: list(  # noqa: E731
        stream(model, [1, 2, 3], 15, top_k=20, generator=torch.Generator().manual_seed(seed))
    )
    g = torch.Generator().manual_seed(3)
    assert sampled(3) == model.generate(torch.tensor([[1, 2, 3]]), 15, top_k=20, generator=g)[0, 3:].tolist()


def test_empty_prompt_starts_from_endoftext(model):
    assert list(stream(model, [], 10, temperature=0)) == list(stream(model, [EOT_TOKEN], 10, temperature=0))
    text = generate_text(model, "", max_new_tokens=10, temperature=0, stop_at_eot=False)[0]
    expected = get_tokenizer().decode(list(stream(model, [EOT_TOKEN], 10, temperature=0)))
    assert text == expected


def test_detokenize_never_breaks_a_character():
    text = "Café 東京 🐶⛄ résumé"
    ids = get_tokenizer().encode(text)
    pieces = list(detokenize(ids))
    assert "".join(pieces) == text
    assert len(pieces) < len(ids)  # some characters really are split across tokens
    assert not any("\ufffd" in p for p in pieces)


def test_generate_text_writes_prompt_then_continuation(model):
    written = []
    texts = generate_text(
        model, "Once upon a time", 12, top_k=50, seed=4, num_samples=3, write=written.append
    )
    assert len(texts) == 3 and all(t.startswith("Once upon a time") for t in texts)
    assert "".join(written) == "\n---------------\n".join(texts)
    assert texts == generate_text(model, "Once upon a time", 12, top_k=50, seed=4, num_samples=3)
    # the samples are one batch, and sample i is what seed + i gives alone
    assert texts[1:] == [generate_text(model, "Once upon a time", 12, top_k=50, seed=s)[0] for s in (5, 6)]
    assert len(set(texts)) == 3


# ---- checkpoints and the CLI ------------------------------------------------------------------------------


def test_resolve_checkpoint_run_means_best(run_dir, tmp_path):
    assert resolve_checkpoint(run_dir) == run_dir / "best"
    assert resolve_checkpoint(run_dir / "best") == run_dir / "best"
    (tmp_path / "latest").symlink_to(run_dir)  # runs/latest
    assert resolve_checkpoint(tmp_path / "latest") == tmp_path / "latest" / "best"
    with pytest.raises(SmallmError, match="no run or checkpoint"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(SmallmError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


def smallm(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "smallm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_cli_generate_same_seed_same_text_end_to_end(run_dir):
    args = ("generate", run_dir, "--prompt", "Once upon a time", "--max-new-tokens", 15, "--seed", 3)
    first, second = smallm(*args), smallm(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Once upon a time")
    assert len(first.stdout) > len("Once upon a time\n")
    assert first.stdout == second.stdout


def test_cli_generate_bad_path_is_one_line_and_exit_1(tmp_path):
    result = smallm("generate", tmp_path / "nope", "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_generate_in_process_options(run_dir, capsys):
    base = ["generate", str(run_dir), "--max-new-tokens", "8", "--seed", "1"]
    assert main([*base, "--prompt", "", "--temperature", "0", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("---------------") == 1
    first, second = out.rstrip("\n").split("\n---------------\n")
    assert first == second  # greedy samples agree
    assert main([*base, "--prompt", "Hi", "--top-p", "0.9", "--no-stop-at-eot"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
    assert main([*base, "--prompt", "Hi", "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err
    (run_dir / "best" / "model.safetensors").write_bytes(b"not safetensors")
    assert main([*base, "--prompt", "Hi"]) == 1
    assert "corrupt" in capsys.readouterr().err
