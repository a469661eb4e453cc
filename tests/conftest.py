import contextlib
import threading

import pytest
import torch

from smallm import GPTConfig


@pytest.fixture
def small_config():
    """A model small enough for fast tests, with the real GPT-2 vocabulary."""
    return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and other test processes may share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_server(app):
    """A real uvicorn server for `app` on a free localhost port, in a background thread; yields its URL."""
    import httpx
    import uvicorn

    from smallm.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            threading.Event().wait(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
