"""Shared fixtures: tiny bound / grow artifacts (gqa16, 512-token context) and a server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import time

import pytest

from twophase.compiler.driver import compile_model
from twophase.compiler.options import CompileOptions, KVBinding
from twophase.runtime.engine import Engine

MODEL = "tiny"
CONTEXT = 512


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory):
    """Factory: "bound" or "grow" -> artifact directory of the tiny gqa16 model, compiled once."""
    from tiny import save_tiny_hf_dir

    root = tmp_path_factory.mktemp("serve")
    cache = {}

    def make(binding: str = "bound"):
        if not cache:
            save_tiny_hf_dir(root / "hf", "gqa16", max_positions=CONTEXT)
        if binding not in cache:
            options = CompileOptions(kv_binding=KVBinding(binding))
            cache[binding] = compile_model(str(root / "hf"), root / binding, options)
        return cache[binding]

    return make


@pytest.fixture(scope="session")
def reference(serve_artifact):
    """An Engine of its own: what each prompt gives alone."""
    return Engine.load(serve_artifact("bound"))


@contextlib.contextmanager
def running_server(artifact, *, max_batch: int = 8, max_queue: int = 256):
    from twophase.serve.app import create_app
    from twophase.serve.scheduler import Scheduler
    from twophase.serve.server import ServerThread

    scheduler = Scheduler(Engine.load(artifact), max_batch=max_batch, max_queue=max_queue)
    server = ServerThread(create_app(scheduler, MODEL))
    server.start()
    try:
        yield server, scheduler
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(serve_artifact):
    """(ServerThread, Scheduler) of a server on a free port of 127.0.0.1, max batch 8."""
    with running_server(serve_artifact("bound")) as s:
        yield s


@contextlib.contextmanager
def slow_decode(engine: Engine, seconds: float):
    """Make every decode step of `engine` take at least `seconds` (so a request is surely still running)."""
    fast = engine.decode_one_token

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fast(*args, **kwargs)

    engine.decode_one_token = slow
    try:
        yield
    finally:
        del engine.decode_one_token


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
