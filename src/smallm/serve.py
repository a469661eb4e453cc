"""`smallm serve`: an OpenAI-style completions endpoint and a small web page, on FastAPI + uvicorn.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    GET  /v1/models        the one model served
    GET  /health           {"status": "ok", ...}
    GET  /                 the web page (src/smallm/static/), which streams from /v1/completions

One model, one worker thread: requests queue up and are generated one at a time (KV-cached, batch 1), so
outputs never interleave and the event loop stays free to accept and stream. Every field is validated by
pydantic; bad input gets a 4xx with an OpenAI-shaped body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
from smallm.generate import stream
from smallm.tokenizer import EOT_TOKEN, get_tokenizer

STATIC = Path(__file__).parent / "static"
MAX_STOP = 4  # stop sequences per request, as OpenAI


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

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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
    """One request's generation, run on the worker thread; text chunks go back to the event loop."""

    def __init__(self, prompt_ids, req: CompletionRequest, max_new_tokens: int):
        self.prompt_ids = prompt_ids
        self.req = req
        self.max_new_tokens = max_new_tokens
        self.cancelled = threading.Event()
        self.completion_tokens = 0
        self.finish_reason = "length"


class Generator:
    """Owns the model; generates one request at a time on a single worker thread."""

    def __init__(self, model, max_queue: int = 64, tokenizer=None):
        self.model = model.eval()
        self.tokenizer = tokenizer or get_tokenizer()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smallm-generate")
        self.max_queue = max_queue
        self.pending = 0  # requests submitted and not finished (only touched on the event loop)

    def finished(self):
        self.pending -= 1

    def run(self, job: _Job, emit) -> str:
        """Generate job on the calling (worker) thread; emit(text) gets each new piece; returns the text.

        Text is decoded incrementally (a token may end inside a UTF-8 character) and held back while it
        could still be the start of a stop sequence, so a stop sequence never reaches the client.
        """
        if job.cancelled.is_set():
            return ""
        req = job.req
        stops = req.stop or []
        generator = None
        if req.seed is not None:  # on the model's device: multinomial refuses a CPU generator for CUDA probs
            generator = torch.Generator(device=self.model.lm_head.weight.device).manual_seed(req.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted = "", 0
        tokens = stream(
            self.model,
            job.prompt_ids,
            job.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p if req.top_p < 1.0 else None,
            eos_token_id=self.tokenizer.eot_token,
            generator=generator,
        )
        with torch.inference_mode():
            for token in tokens:
                if job.cancelled.is_set():
                    return text[:emitted]
                if token == self.tokenizer.eot_token:
                    job.finish_reason = "stop"
                    break
                job.completion_tokens += 1
                text += decoder.decode(self.tokenizer.decode_single_token_bytes(token))
                cut = min(
                    (i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0), default=-1
                )
                if cut >= 0:
                    text = text[:cut]
                    job.finish_reason = "stop"
                    break
                hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                if len(text) - hold > emitted:
                    emit(text[emitted : len(text) - hold])
                    emitted = len(text) - hold
            else:  # max_new_tokens reached: flush a character cut short by the last token
                text += decoder.decode(b"", final=True)
        if len(text) > emitted:
            emit(text[emitted:])
        return text


def create_app(
    model,
    model_name: str = "smallm",
    max_tokens_cap: int = 512,
    max_body_bytes: int = 64 * 1024,
    max_queue: int = 64,
    tokenizer=None,
) -> FastAPI:
    """The FastAPI app serving `model` (a smallm GPT) with its tokenizer (None: GPT-2). See the module
    docstring for the endpoints.

    max_tokens above max_tokens_cap and bodies above max_body_bytes are refused (400 / 413); more than
    max_queue requests waiting at once get 503.
    """
    if max_tokens_cap < 1:
        raise SmallmError(f"--max-tokens-cap must be at least 1, got {max_tokens_cap}")
    gen = Generator(model, max_queue, tokenizer)
    app = FastAPI(title="smallm", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.generator = gen

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e.status, e.message, e.param, e.code)

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
            "pending": gen.pending,
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
        if gen.pending >= gen.max_queue:
            raise ApiError(503, "server busy: too many requests waiting; retry shortly", None, "busy")
        prompt = (
            req.prompt
            if isinstance(req.prompt, list)
            else gen.tokenizer.encode(req.prompt, allowed_special="all")
        )
        if isinstance(req.prompt, list) and any(t >= gen.tokenizer.n_vocab for t in req.prompt):
            raise ApiError(400, f"token ids must be below {gen.tokenizer.n_vocab}", "prompt", "invalid_value")
        prompt_ids = prompt or [gen.tokenizer.eot_token]  # an empty prompt starts a new document
        job = _Job(prompt_ids, req, req.max_tokens)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        base["model"] = model_name
        loop = asyncio.get_running_loop()

        def usage():
            n = len(prompt)
            return {
                "prompt_tokens": n,
                "completion_tokens": job.completion_tokens,
                "total_tokens": n + job.completion_tokens,
            }

        if not req.stream:
            gen.pending += 1
            try:
                text = await loop.run_in_executor(gen.executor, gen.run, job, lambda piece: None)
            finally:
                gen.pending -= 1
            choice = {"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}
            return {**base, "choices": [choice], "usage": usage()}

        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(piece: str):
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work():
            try:
                gen.run(job, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)
                loop.call_soon_threadsafe(gen.finished)

        def chunk(text, finish_reason=None):
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        gen.pending += 1
        future = loop.run_in_executor(gen.executor, work)

        async def events():
            try:
                while (piece := await queue.get()) is not done:
                    yield chunk(piece)
                await future  # re-raises a failure of the worker
                yield chunk("", job.finish_reason)
                if (req.stream_options or {}).get("include_usage"):
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away: stop generating for it

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, max_tokens_cap: int = 512) -> None:
    """Load RUN/best (or a checkpoint directory) and serve it with uvicorn until interrupted."""
    import uvicorn

    from smallm.generate import load_for_inference

    if not 0 <= port <= 65535:
        raise SmallmError(f"--port {port} is not a TCP port (0-65535)")
    model, directory = load_for_inference(checkpoint)
    directory = Path(directory).resolve()
    name = directory.parent.name if directory.name == "best" else directory.name
    tokenizer = get_tokenizer(directory)
    app = create_app(model, model_name=name or "smallm", max_tokens_cap=max_tokens_cap, tokenizer=tokenizer)
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
