"""`smallm serve`: OpenAI-compatible completions that the `openai` client uses unchanged, strict validation
with JSON errors, concurrent clients batched together that each get exactly their own output, and
back-pressure (503 + Retry-After) when the batch and the queue are full."""

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import running_server
from fastapi.testclient import TestClient

from smallm import GPTConfig, get_tokenizer
from smallm.cli import build_parser, main
from smallm.model import GPT
from smallm.serve import create_app

CAP = 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(4321)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, model_name="tiny", max_tokens_cap=CAP, max_body_bytes=4096))


@pytest.fixture(scope="module")
def server(model):
    """A real uvicorn server on a free localhost port, in a background thread; yields its base URL."""
    with running_server(create_app(model, model_name="tiny", max_tokens_cap=CAP)) as base:
        yield base


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai", reason="openai is in the [test] extras")
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=30)


def greedy_text(model, prompt: str, n: int) -> str:
    """What the model itself continues `prompt` with, greedily, stopping at <|endoftext|>."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(prompt)])
    out = model.generate(idx, max_new_tokens=n, temperature=0, eos_token_id=50256)[0, idx.size(1) :].tolist()
    return enc.decode([t for t in out if t != 50256])


def test_openai_client_plain_completion(openai_client, model):
    completion = openai_client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.model == "tiny" and completion.id.startswith("cmpl-")
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert choice.text == greedy_text(model, "Once upon a time", 8)
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == 12


def test_openai_client_streams_only_the_new_text(openai_client):
    kwargs = dict(model="tiny", prompt="The dog ran to the", max_tokens=10, temperature=0.9, seed=7)
    plain = openai_client.completions.create(**kwargs).choices[0].text
    chunks = list(openai_client.completions.create(stream=True, **kwargs))
    texts = [c.choices[0].text for c in chunks]
    assert len(chunks) >= 2
    assert "".join(texts) == plain  # each chunk carries only new text, together the whole completion
    assert not plain.startswith("The dog")
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_same_seed_same_completion(client):
    body = {"prompt": "Lily went", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 123}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    again = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    other = client.post("/v1/completions", json={**body, "seed": 124}).json()["choices"][0]["text"]
    assert first == again
    assert first != other


def test_stop_sequence_ends_the_completion_and_is_never_sent(client, model):
    full = greedy_text(model, "Once upon a time", 12)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stop": [stop]}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["text"] == expected and plain["finish_reason"] == "stop"
    streamed = client.post("/v1/completions", json={**body, "stream": True}).text
    events = [json.loads(x[6:]) for x in streamed.split("\n\n") if x.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_empty_prompt_starts_a_new_story(client):
    response = client.post("/v1/completions", json={"prompt": "", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_prompt_longer_than_context_is_accepted(client):
    response = client.post("/v1/completions", json={"prompt": "word" + " word" * 199, "max_tokens": 5})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 200


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"max_tokens": 5}, 400, "prompt"),  # missing prompt
        ({"prompt": 5}, 400, "prompt"),  # wrong type
        ({"prompt": ["a", "b"]}, 400, "prompt"),  # several prompts
        ({"prompt": [1, 99999]}, 400, "prompt"),  # token id out of the vocabulary
        ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),  # a string is not a number
        ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "a", "max_tokens": CAP + 1}, 400, "max_tokens"),  # above the server's cap
        ({"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, 400, "temperature"),
        ({"prompt": "a", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "a", "seed": -1}, 400, "seed"),
        ({"prompt": "a", "stop": ""}, 400, "stop"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "a", "stop": 3}, 400, "stop"),
        ({"prompt": "a", "stream": "yes"}, 400, "stream"),
        ({"prompt": "a", "n": 2}, 400, "n"),
        ({"prompt": "a", "max_token": 5}, 400, "max_token"),  # a typo is not silently ignored
        ([1, 2, 3], 400, None),  # not an object
    ],
)
def test_bad_input_gets_4xx_with_json_error(client, body, status, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize(
    "content, status",
    [
        (b"{not json", 400),
        (b"", 400),
        (b'{"prompt": "' + b"x" * 5000 + b'"}', 413),  # over max_body_bytes=4096
        (b"\xff\xfe", 400),
    ],
)
def test_unparseable_or_oversized_body_gets_4xx_with_json_error(client, content, status):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["message"]


def test_oversized_chunked_body_is_refused_without_reading_it_all(client):
    def body():
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/v1/completions", content=body())
    assert response.status_code == 413
    assert "4096" in response.json()["error"]["message"]


def test_unknown_routes_answer_json_errors(client):
    assert client.get("/v1/nope").json()["error"]["message"] == "Not Found"
    assert client.get("/v1/completions").status_code == 405


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_tokens_cap"] == CAP and health["block_size"] == 32
    assert health["max_batch"] == 8 and health["max_queue"] == 32
    assert {"active", "queued", "tokens_per_s"} <= set(health)
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0})
    health = client.get("/health").json()
    assert health["active"] == 0 and health["queued"] == 0 and health["tokens_per_s"] > 0
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_sixteen_requests_from_eight_threads_each_get_their_own_output(server, model):
    prompts = [f"Story number {i}: once upon a time" for i in range(16)]
    expected = [greedy_text(model, p, 6) for p in prompts]

    def ask(i):
        stream = i % 2 == 1
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 6, "temperature": 0, "stream": stream}
        response = httpx.post(server + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200
        if not stream:
            data = response.json()
            assert data["object"] == "text_completion" and len(data["choices"]) == 1
            assert set(data["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
            return data["choices"][0]["text"]
        events = [x[6:] for x in response.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == expected


def sampled_text(model, prompt: str, n: int, temperature: float, top_p: float, seed: int) -> str:
    """What the model continues `prompt` with alone, sampling from a generator seeded `seed`."""
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(prompt)])
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, n, temperature=temperature, top_p=top_p, eos_token_id=50256, generator=g)
    return enc.decode([t for t in out[0, idx.size(1) :].tolist() if t != 50256])


def test_requests_joining_and_leaving_the_batch_each_get_their_alone_text(server, model):
    """Seeded and greedy requests of different prompt lengths and max_tokens (so they join and leave the
    batch at different steps, some past the 32-token context) each get exactly what they get alone."""
    requests = []
    for i in range(12):
        prompt = "Tom" + " and the dog" * (i % 5) * 2  # 1 to 25 tokens
        body = {"prompt": prompt, "max_tokens": [3, 40, 9, 17][i % 4], "stream": i % 3 == 0}
        body.update({"temperature": 0} if i % 2 else {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i})
        requests.append(body)

    def alone(body):
        if body["temperature"] == 0:
            return greedy_text(model, body["prompt"], body["max_tokens"])
        return sampled_text(model, body["prompt"], body["max_tokens"], 0.9, 0.95, body["seed"])

    def ask(body):
        response = httpx.post(server + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200
        if not body["stream"]:
            return response.json()["choices"][0]["text"]
        events = [x[6:] for x in response.text.split("\n\n") if x.startswith("data: ")]
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, requests))
    assert answers == [alone(body) for body in requests]


@contextlib.contextmanager
def gated_server(model, max_batch, max_queue, delay=0.0):
    """A server whose decode steps wait for `gate` (and then sleep `delay`): requests stay in the batch
    or the queue as long as the test needs. Yields its URL, the gate, and the list of steps taken."""
    app = create_app(model, model_name="tiny", max_tokens_cap=CAP, max_batch=max_batch, max_queue=max_queue)
    decoder = app.state.generator.decoder
    gate, real_step, steps = threading.Event(), decoder.step, []

    def step():
        gate.wait(timeout=30)
        time.sleep(delay)
        steps.append(len(decoder.sequences))
        return real_step()

    decoder.step = step
    with running_server(app) as base:
        yield base, gate, steps
    gate.set()


def wait_for_health(base, **expected):
    for _ in range(200):
        health = httpx.get(base + "/health", timeout=5).json()
        if all(health[k] == v for k, v in expected.items()):
            return health
        time.sleep(0.05)
    raise AssertionError(f"/health never showed {expected}: {health}")


def test_full_queue_answers_503_with_retry_after_at_once(model):
    with gated_server(model, max_batch=1, max_queue=1) as (base, gate, _), ThreadPoolExecutor(2) as pool:
        body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        first = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=60)
        wait_for_health(base, active=1, queued=0)  # in the batch, stuck at its first step
        second = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=60)
        wait_for_health(base, active=1, queued=1)
        start = time.perf_counter()
        refused = httpx.post(base + "/v1/completions", json={**body, "stream": True}, timeout=60)
        assert time.perf_counter() - start < 2.0  # at once, not after the others
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy" and error["message"]
        gate.set()
        expected = greedy_text(model, "Once upon a time", 5)
        assert [f.result().json()["choices"][0]["text"] for f in (first, second)] == [expected] * 2
        wait_for_health(base, active=0, queued=0)
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200


def test_disconnected_stream_frees_its_slot(model):
    """A client that drops its stream leaves the batch within a few steps, long before its max_tokens,
    and the next request (batch of one) gets the row."""
    with gated_server(model, max_batch=1, max_queue=4, delay=0.1) as (base, gate, steps):
        gate.set()
        body = {"prompt": "Once upon a time", "max_tokens": CAP, "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first token arrived; now hang up
        wait_for_health(base, active=0, queued=0)
        assert len(steps) < CAP / 2  # it left the batch, it did not run its 48 steps
        short = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
        assert httpx.post(base + "/v1/completions", json=short, timeout=60).status_code == 200
        assert steps[-2:] == [1, 1]  # the next request ran alone in the freed row


def test_disconnected_plain_request_leaves_the_batch(model):
    with gated_server(model, max_batch=1, max_queue=4, delay=0.1) as (base, gate, steps):
        gate.set()
        body = {"prompt": "Once upon a time", "max_tokens": CAP, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, timeout=0.5)  # gives up, closes the socket
        wait_for_health(base, active=0, queued=0)
        assert len(steps) < CAP / 2  # it left the batch, it did not run its 48 steps


def test_a_failing_step_answers_500_and_the_worker_goes_on(model):
    app = create_app(model, model_name="tiny", max_tokens_cap=CAP)
    decoder = app.state.generator.decoder
    real_step = decoder.step

    def failing_once():
        decoder.step = real_step
        raise RuntimeError("simulated out of memory")

    decoder.step = failing_once
    client = TestClient(app)
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    failed = client.post("/v1/completions", json=body)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert "simulated out of memory" in failed.json()["error"]["message"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == greedy_text(
        model, "Hi", 3
    )


def test_serve_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert (args.max_batch, args.max_queue) == (8, 32)


def test_serve_of_a_missing_run_is_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
