"""`smallm serve`: an OpenAI-style completions endpoint and a small web page, on FastAPI + uvicorn.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    GET  /v1/models        the one model served
    GET  /health           {"status": "ok", ...}
    GET  /                 the web page (src/smallm/static/), which streams from /v1/completions

One model, one worker thread running a continuous batch (smallm.model.Decoder): every decode step runs all
active requests as one batch; requests join at any step and leave when they finish or their client goes
away. Up to --max-batch requests run at once and --max-queue more wait; beyond that a request gets 503 with
Retry-After at once. Each request samples from its own generator, so a seeded request gets the same text
alone or batched. The event loop stays free to accept and stream. Every field is validated by
pydantic; bad input gets a 4xx with an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallm.errors import SmallmError
from smallm.model import Decoder
from smallm.tokenizer import EOT_TOKEN, get_tokenizer

STATIC = Path(__file__).parent / "static"
MAX_STOP = 4  # stop sequences per request, as OpenAI
DONE = object()  # the end of a request's text


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions. Strict: "5" is not a number and typos are not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str | list[str] | list[int]
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true} adds a final chunk with usage
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one completion per request
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request (send a string)")
            return v[0]
        if isinstance(v, list) and any(not 0 <= t <= EOT_TOKEN for t in v):
            raise ValueError(f"token ids must be in [0, {EOT_TOKEN}]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param=None, code=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def _error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# What a field must be, for type errors in fields that accept several types.
EXPECTED = {
    "prompt": "a string, a list of one string, or a list of token ids",
    "stop": f"a string or a list of up to {MAX_STOP} strings",
}


def _validation_message(error: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as ("field: what is wrong", field)."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    if param in EXPECTED and first["type"].endswith("_type"):
        return f"{param} must be {EXPECTED[param]}", param
    where = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    return (f"{where}: {message}" if where else message), param


class _Job:
    """One request in the batch: its sampling settings, and the text of its tokens so far.

    The worker thread feeds it tokens; its text is decoded incrementally (a token may end inside a UTF-8
    character) and held back while it could still be the start of a stop sequence, so a stop sequence
    never reaches the client. on_text(piece) and on_done() are called on the worker thread.
    """

    def __init__(self, prompt_ids, req: CompletionRequest, on_text, on_done):
        self.prompt_ids = prompt_ids
        self.req = req
        self.on_text, self.on_done = on_text, on_done
        self.cancelled = threading.Event()  # set when the client is gone
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.text = ""  # the completion so far; final once on_done was called
        self.error: Exception | None = None
        self.row = None  # its Sequence in the decoder, while it is in the batch
        self._emitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int, tokenizer) -> bool:
        """Take the next token; True when the request is complete."""
        stops = self.req.stop or []
        if token == tokenizer.eot_token:
            self.finish_reason = "stop"
            return self._finish()
        self.completion_tokens += 1
        text = self.text + self._decoder.decode(tokenizer.decode_single_token_bytes(token))
        emitted = self._emitted
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.finish_reason = "stop"
            return self._finish()
        self.text = text
        if self.completion_tokens >= self.req.max_tokens:
            self.text += self._decoder.decode(b"", final=True)  # a character cut short by the last token
            return self._finish()
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if len(text) - hold > emitted:
            self.on_text(text[emitted : len(text) - hold])
            self._emitted = len(text) - hold
        return False

    def _finish(self) -> bool:
        if len(self.text) > self._emitted:
            self.on_text(self.text[self._emitted :])
            self._emitted = len(self.text)
        return True


class Batcher:
    """Owns the model; one worker thread runs every request through a continuous batch (Decoder).

    Requests wait in a queue until the batch has room (max_batch rows), join it at the next step, and
    leave it when they finish or their client is gone. At most max_batch + max_queue requests are taken
    at once; submit() refuses the rest, so the server can answer 503 at once instead of queueing forever.
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 32, tokenizer=None):
        if max_batch < 1 or max_queue < 0:
            raise SmallmError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch}, {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer or get_tokenizer()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = Decoder(self.model, max_batch)
        self.waiting: collections.deque[_Job] = collections.deque()
        self.active: list[_Job] = []  # in the batch; only the worker changes it
        self.lock = threading.Condition()
        self.closed = False
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.worker = threading.Thread(target=self._work, name="smallm-batch", daemon=True)
        self.worker.start()

    def submit(self, job: _Job) -> bool:
        """Queue job for the batch; False (and nothing queued) when max_batch + max_queue are taken."""
        with self.lock:
            if len(self.waiting) + len(self.active) >= self.max_batch + self.max_queue:
                return False
            self.waiting.append(job)
            self.lock.notify()
        return True

    def close(self) -> None:
        """Stop the worker thread (after its current step)."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.worker.join(timeout=30)

    def stats(self) -> dict:
        """Requests in the batch and waiting, and the tokens/s of the last 10 s."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= 10.0]
        tokens_per_s = 0.0
        if recent:
            tokens_per_s = sum(n for _, n in recent) / max(now - recent[0][0], 1.0)
        return {
            "active": len(self.active),
            "queued": len(self.waiting),
            "tokens_per_s": round(tokens_per_s, 1),
        }

    def _work(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.active or self.closed):
                    self.lock.wait()
                if self.closed:
                    return
                joining = []
                while self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            for job in joining:
                self._join(job)
            for job in [j for j in self.active if j.cancelled.is_set()]:
                self._leave(job)  # the client is gone: free its row now
            if not self.active:
                continue
            try:
                self.decoder.step()
                self.recent.append((time.monotonic(), len(self.active)))  # one token per row
                for job in list(self.active):
                    if job.feed(job.row.tokens[-1], self.tokenizer):
                        self._leave(job)
            except Exception as e:  # answered to every request in the batch; the worker goes on
                for job in list(self.active):
                    job.error = e
                    self._leave(job)
            while self.recent and time.monotonic() - self.recent[0][0] > 10.0:
                self.recent.popleft()

    def _join(self, job: _Job) -> None:
        req = job.req
        if job.cancelled.is_set():
            job.on_done()
            return
        generator = None
        if req.seed is not None:  # on the model's device: multinomial refuses a CPU generator for CUDA probs
            generator = torch.Generator(device=self.model.lm_head.weight.device).manual_seed(req.seed)
        top_p = req.top_p if req.top_p < 1.0 else None
        job.row = self.decoder.add(job.prompt_ids, req.temperature, None, top_p, generator)
        self.active.append(job)

    def _leave(self, job: _Job) -> None:
        self.decoder.remove(job.row)
        self.active.remove(job)
        job.row = None
        job.on_done()


def create_app(
    model,
    model_name: str = "smallm",
    max_tokens_cap: int = 512,
    max_body_bytes: int = 64 * 1024,
    max_batch: int = 8,
    max_queue: int = 32,
    tokenizer=None,
) -> FastAPI:
    """The FastAPI app serving `model` (a smallm GPT) with its tokenizer (None: GPT-2). See the module
    docstring for the endpoints.

    max_tokens above max_tokens_cap and bodies above max_body_bytes are refused (400 / 413). Up to
    max_batch requests are generated together; max_queue more wait; beyond that requests get 503 with
    Retry-After at once.
    """
    if max_tokens_cap < 1:
        raise SmallmError(f"--max-tokens-cap must be at least 1, got {max_tokens_cap}")
    gen = Batcher(model, max_batch, max_queue, tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        gen.close()

    app = FastAPI(title="smallm", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.generator = gen

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), None, None)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "block_size": model.config.block_size,
            "max_tokens_cap": max_tokens_cap,
            "max_batch": gen.max_batch,
            "max_queue": gen.max_queue,
            **gen.stats(),
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "smallm"}]}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def read_request(request: Request) -> CompletionRequest:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            raise ApiError(413, f"request body over {max_body_bytes} bytes", None, "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body over {max_body_bytes} bytes", None, "body_too_large")
        try:
            req = CompletionRequest.model_validate_json(bytes(body))
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ApiError(400, message, param, "invalid_value") from None
        if req.max_tokens > max_tokens_cap:
            raise ApiError(
                400, f"max_tokens: at most {max_tokens_cap} on this server", "max_tokens", "too_large"
            )
        return req

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request)
        prompt = (
            req.prompt
            if isinstance(req.prompt, list)
            else gen.tokenizer.encode(req.prompt, allowed_special="all")
        )
        if isinstance(req.prompt, list) and any(t >= gen.tokenizer.n_vocab for t in req.prompt):
            raise ApiError(400, f"token ids must be below {gen.tokenizer.n_vocab}", "prompt", "invalid_value")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        base["model"] = model_name
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()  # text from the worker thread, then DONE

        def send(item):  # called on the worker thread
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody listens
                loop.call_soon_threadsafe(pieces.put_nowait, item)

        def on_text(piece):  # a plain response takes job.text at the end
            if req.stream:
                send(piece)

        prompt = prompt or [gen.tokenizer.eot_token]  # an empty prompt starts a new story
        job = _Job(prompt, req, on_text, lambda: send(DONE))
        if not gen.submit(job):
            message = "server busy: the batch and the queue are full; retry shortly"
            raise ApiError(503, message, None, "server_busy", headers={"Retry-After": "1"})

        def usage():
            n = len(prompt)
            return {
                "prompt_tokens": n,
                "completion_tokens": job.completion_tokens,
                "total_tokens": n + job.completion_tokens,
            }

        if not req.stream:
            while True:
                try:
                    await asyncio.wait_for(pieces.get(), timeout=0.5)  # DONE
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()  # the client went away: its row leaves the batch
                        raise ApiError(499, "client closed the request", None, "client_closed") from None
            if job.error is not None:
                raise ApiError(500, f"generation failed: {job.error}", None, "generation_failed")
            choice = {"index": 0, "text": job.text, "finish_reason": job.finish_reason, "logprobs": None}
            return {**base, "choices": [choice], "usage": usage()}

        def chunk(text, finish_reason=None):
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        async def events():
            try:
                while (piece := await pieces.get()) is not DONE:
                    yield chunk(piece)
                if job.error is not None:
                    error = {"message": f"generation failed: {job.error}", "type": "server_error"}
                    yield f"data: {json.dumps({'error': {**error, 'param': None, 'code': None}})}\n\n"
                    return
                yield chunk("", job.finish_reason)
                if (req.stream_options or {}).get("include_usage"):
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away: its row leaves the batch at the next step

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


def serve(
    checkpoint,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens_cap: int = 512,
    max_batch: int = 8,
    max_queue: int = 32,
    dtype: str = "auto",
) -> None:
    """Load RUN/best (or a checkpoint directory), weights in `dtype`, and serve it with uvicorn until
    interrupted."""
    import uvicorn

    from smallm.generate import load_for_inference

    if not 0 <= port <= 65535:
        raise SmallmError(f"--port {port} is not a TCP port (0-65535)")
    model, directory = load_for_inference(checkpoint, dtype=dtype)
    directory = Path(directory).resolve()
    name = directory.parent.name if directory.name == "best" else directory.name
    app = create_app(model, name or "smallm", max_tokens_cap, max_batch=max_batch, max_queue=max_queue,
                     tokenizer=get_tokenizer(directory))  # fmt: skip
    sock = bind_socket(host, port)
    print(f"smallm serve: http://{host}:{sock.getsockname()[1]}/  (Ctrl-C to stop)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port), or a SmallmError saying why not."""
    sock = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        if sock is not None:
            sock.close()  # a port in use must not leave an open socket behind
        raise SmallmError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host/--port"
        ) from e
    return sock
