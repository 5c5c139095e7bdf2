"""`twophase serve` as a command: it serves, answers the openai client, and shuts down cleanly on SIGTERM;
its errors exit 2 with the cause."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import httpx
import openai


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twophase.cli", "-v", "serve", *args],
                            stderr=subprocess.PIPE, text=True)


def test_serve_answers_and_stops_on_sigterm(serve_artifact):
    proc = serve(str(serve_artifact("bound")), "--port", "0", "--max-batch", "4", "--model-name", "m")
    try:
        banner = next(line for line in proc.stderr if line.startswith("serving"))
        url = re.search(r"at (http://\S+)/v1", banner).group(1)
        assert "bound KV cache, max batch 4" in banner
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    log = proc.stderr.read()
    # uvicorn shuts down gracefully (the lifespan closes the scheduler), then re-raises the signal
    assert rc == -signal.SIGTERM and "Application shutdown complete" in log, log


def test_serve_errors_exit_2(serve_artifact, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twophase.cli", "serve", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = subprocess.run([sys.executable, "-m", "twophase.cli", "serve", str(serve_artifact("bound")),
                               "--port", port, "--no-verify"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "twophase.cli", "serve", str(serve_artifact("bound")),
                           "--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "max_batch" in proc.stderr
