"""`twophase serve`'s HTTP API on a tiny model, through the official `openai` client and raw httpx: chat
and text completions (streamed and not), the chat template, stop sequences, 16 concurrent clients each
getting exactly its text alone, malformed requests, client disconnects, and a clean shutdown."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import CONTEXT, MODEL, running_server, slow_decode, wait_until

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name three colors"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(server):
    srv, _ = server
    models = client(srv).models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8
    assert httpx.get(f"{srv.url}/v1/models/{MODEL}").json()["max_model_len"] == CONTEXT
    assert httpx.get(f"{srv.url}/v1/models/nope").status_code == 404


def test_chat_completion_applies_the_template(server, reference):
    srv, _ = server
    r = client(srv).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    want = reference.generate(CHAT, chat=True, max_new_tokens=24, stream=False)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode_chat(CHAT))
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")


def test_chat_completion_streams(server, reference):
    srv, _ = server
    stream = client(srv).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.generate(CHAT, chat=True, max_new_tokens=24, stream=False)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_text_completion(server, reference, stream):
    srv, _ = server
    want = reference.generate("the quick brown fox", max_new_tokens=16, stream=False)
    r = client(srv).completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=16, temperature=0,
                                       stream=stream)
    text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    assert text == want
    ids = reference.tokenizer.encode("the quick brown fox")
    r = client(srv).completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)  # token ids
    assert r.choices[0].text == want


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(server, reference, stream):
    srv, _ = server
    full = reference.generate("hello world", max_new_tokens=40, stream=False)
    assert len(full) > 6, full
    stop = full[4:6]  # the text must end right before its first occurrence
    r = client(srv).completions.create(model=MODEL, prompt="hello world", max_tokens=40, temperature=0,
                                       stop=[stop, "never-there"], stream=stream)
    if stream:
        chunks = list(r)
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[: full.index(stop)] and reason == "stop"


def test_sampling_is_seeded(server, reference):
    srv, _ = server
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    a = client(srv).completions.create(**kwargs).choices[0].text
    assert a == client(srv).completions.create(**kwargs).choices[0].text
    assert a == reference.generate("abc", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, stream=False)


def test_sixteen_concurrent_clients_each_get_their_text_alone(server, reference):
    """Requests that arrive together share decode steps (max batch 8, so 8 queue), join and leave at different
    steps (different prompt lengths and max_tokens), and each gets exactly the greedy text it gets alone."""
    srv, scheduler = server
    jobs = []
    for i in range(16):
        prompt = "abcdefghijklmnopqrstuvwxyz"[i:] + " " + "xy" * i
        jobs.append((i, prompt, 6 + 3 * i, i % 2 == 0))
    alone = {i: reference.generate([{"role": "user", "content": p}], chat=True, max_new_tokens=n, stream=False)
             for i, p, n, _ in jobs}
    before = scheduler.stats.decode_steps
    barrier = threading.Barrier(16)
    c = client(srv)

    def run(job):
        i, prompt, n, stream = job
        barrier.wait()
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                      temperature=0, stream=stream)
        return "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(range(16), pool.map(run, jobs)))
    assert got == alone
    assert scheduler.stats.peak_batch == 8  # batched, never beyond max_batch
    assert scheduler.stats.decode_steps - before < sum(n for _, _, n, _ in jobs) / 2  # shared steps


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_malformed_requests_get_openai_errors(server):
    srv, _ = server
    url = srv.url + "/v1"
    post = httpx.post
    e = error_of(post(url + "/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert e["code"] == "invalid_json" and e["type"] == "invalid_request_error"
    e = error_of(post(url + "/completions", json={"model": "gpt-9", "prompt": "a"}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
    e = error_of(post(url + "/completions", json={"prompt": "a", "max_tokens": CONTEXT}), 400)
    assert e["code"] == "context_length_exceeded" and e["param"] == "max_tokens" and str(CONTEXT) in e["message"]
    e = error_of(post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "x" * CONTEXT}]}), 400)
    assert e["code"] == "context_length_exceeded"  # no max_tokens: the prompt alone fills the context
    for field, value in [("temperature", -1), ("temperature", 3), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
                         ("top_k", -2), ("repetition_penalty", 0), ("n", 2), ("stop", [""]), ("seed", "x")]:
        e = error_of(post(url + "/completions", json={"prompt": "a", field: value}), 400)
        assert e["param"] == field, (field, e)
    assert error_of(post(url + "/completions", json={"prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert error_of(post(url + "/completions", json={"prompt": [5000]}), 400)["message"].startswith("prompt token ids")
    assert error_of(post(url + "/completions", json={"prompt": 5}), 400)["param"] == "prompt"
    assert error_of(post(url + "/completions", json={}), 400)["param"] == "prompt"
    assert error_of(post(url + "/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    e = error_of(post(url + "/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}), 400)
    assert e["param"] == "messages.0.role"
    e = error_of(post(url + "/chat/completions", json={"messages": CHAT, "tools": [{"type": "function"}]}), 400)
    assert e["param"] == "tools"
    error_of(post(url + "/completions", content=b'{"prompt": "a"}'), 400)  # no JSON content type
    error_of(httpx.get(url + "/nowhere"), 404)
    error_of(httpx.get(url + "/completions"), 405)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(srv).completions.create(model=MODEL, prompt="a", temperature=-0.5)
    with pytest.raises(openai.NotFoundError):
        client(srv).chat.completions.create(model="other", messages=CHAT)
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"  # none of it hurt the server


def test_disconnected_clients_free_their_slots(server):
    srv, scheduler = server
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 400, "temperature": 0}
    with slow_decode(scheduler.engine, 0.01):  # 400 tokens take > 4 s: surely still running when we leave
        cancelled = scheduler.stats.cancelled
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        assert wait_until(lambda: scheduler.stats.cancelled == cancelled + 1 and scheduler.running == 0)
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        assert wait_until(lambda: scheduler.stats.cancelled == cancelled + 2 and scheduler.running == 0)


def test_stream_body_is_server_sent_events(server):
    srv, _ = server
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_clean_shutdown_finishes_requests_in_flight(serve_artifact):
    with running_server(serve_artifact("bound")) as (srv, scheduler):
        result = {}
        with slow_decode(scheduler.engine, 0.02):

            def request():
                result["r"] = httpx.post(srv.url + "/v1/completions", timeout=30,
                                         json={"prompt": "abc", "max_tokens": 40, "temperature": 0})

            t = threading.Thread(target=request)
            t.start()
            assert wait_until(lambda: scheduler.running == 1)
            assert srv.stop(timeout=20)  # uvicorn waits for the request, then the lifespan closes the scheduler
            t.join(5)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] >= 1
        assert not scheduler.alive and not srv.alive
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=2)
