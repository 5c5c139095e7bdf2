"""The HTTP layer: an ASGI app (FastAPI) that speaks OpenAI's API over a Scheduler.

    app = create_app(scheduler, model_id="smollm2")   # its lifespan starts and closes the scheduler
    uvicorn.run(app, host="127.0.0.1", port=8000)     # or twophase.serve.server.ServerThread

Routes: POST /v1/completions and /v1/chat/completions (`"stream": true` answers with server-sent events),
GET /v1/models, GET /v1/models/{id}, GET /health.

Handlers never touch the Engine's sessions: they validate, tokenize (the tokenizer is read-only and
thread-safe), submit to the scheduler and read the request's events from an asyncio.Queue that the
scheduler thread fills through loop.call_soon_threadsafe. A client that disconnects cancels its
request, which frees its slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from twophase.compiler.errors import TwophaseError
from twophase.runtime.tokenizer import ChatTemplateError
from twophase.serve import protocol
from twophase.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from twophase.serve.scheduler import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    TextDelta,
    Ticket,
)

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "client closed the request": nobody reads it


class EventQueue:
    """A request's scheduler events, handed from the scheduler thread to this event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Called on the scheduler thread; raises RuntimeError once the loop is closed (the scheduler
        then treats the request as cancelled)."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[Event]:
        """The events until Finished or Failed. Text that piled up while the consumer was busy (a slow client,
        a busy loop) comes as one TextDelta, so a lagging stream catches up in one chunk."""
        pending: collections.deque[Event] = collections.deque()
        while True:
            if not pending:
                pending.append(await self._queue.get())
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            event = pending.popleft()
            if isinstance(event, TextDelta) and pending and isinstance(pending[0], TextDelta):
                parts = [event.text]
                while pending and isinstance(pending[0], TextDelta):
                    parts.append(pending.popleft().text)
                event = TextDelta("".join(parts))
            yield event
            if isinstance(event, (Finished, Failed)):
                return


def create_app(scheduler: Scheduler, model_id: str) -> FastAPI:
    """The OpenAI-compatible app serving `scheduler`'s engine under the name `model_id`."""
    engine = scheduler.engine
    tokenizer = engine.tokenizer
    assert tokenizer is not None  # the Scheduler refuses artifacts without one

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="twophase", lifespan=lifespan)
    app.state.scheduler = scheduler

    # --- errors: always OpenAI's shape ------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return api_error_response(validation_api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return api_error_response(APIError(e.status_code, str(e.detail), type=kind))

    # --- routes ---------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        body = {"status": "ok" if ok else "stopped", "model": model_id, "running": scheduler.running,
                "waiting": scheduler.waiting, "max_batch": scheduler.max_batch,
                **dataclasses.asdict(scheduler.stats)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [protocol.model_card(model_id, engine.max_len)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return protocol.model_card(model_id, engine.max_len)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        body.check_unsupported()
        prompt = body.single_prompt()
        ids = tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        gen = protocol.generation_request(body, ids, max_len=engine.max_len,
                                          default_max_tokens=protocol.COMPLETIONS_DEFAULT_MAX_TOKENS)
        events, ticket = submit(gen)
        rid = protocol.new_id("cmpl")
        if body.stream:
            return sse(completion_stream(rid, events, body.include_usage), ticket)
        result = await collect(request, events, ticket)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        text, end = result
        return JSONResponse(protocol.completion_body(
            rid, model_id, text, protocol.finish_reason(end.reason),
            protocol.usage(end.prompt_tokens, end.completion_tokens)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        body.check_unsupported()
        try:
            ids = tokenizer.encode_chat(body.conversation(), add_generation_prompt=True)
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from None
        gen = protocol.generation_request(body, ids, max_len=engine.max_len, default_max_tokens=None)
        events, ticket = submit(gen)
        rid = protocol.new_id("chatcmpl")
        if body.stream:
            return sse(chat_stream(rid, events, body.include_usage), ticket)
        result = await collect(request, events, ticket)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        text, end = result
        return JSONResponse(protocol.chat_body(rid, model_id, text, protocol.finish_reason(end.reason),
                                               protocol.usage(end.prompt_tokens, end.completion_tokens)))

    # --- helpers (closures over the scheduler and the model name) --------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    def submit(gen: GenerationRequest) -> tuple[EventQueue, Ticket]:
        events = EventQueue()
        try:
            return events, scheduler.submit(gen, events.put)
        except (QueueFullError, SchedulerClosedError) as e:
            raise APIError(503, str(e), type="server_error", code="server_busy") from None
        except TwophaseError as e:  # the scheduler's own checks (protocol.generation_request ran first)
            raise bad_request(str(e)) from None

    async def completion_stream(rid: str, events: EventQueue, include_usage: bool) -> AsyncIterator[str]:
        async for ev in events:
            if isinstance(ev, TextDelta):
                yield sse_data(protocol.completion_body(rid, model_id, ev.text, None, None))
            elif isinstance(ev, Finished):
                yield sse_data(protocol.completion_body(rid, model_id, "", protocol.finish_reason(ev.reason), None))
                if include_usage:
                    use = protocol.usage(ev.prompt_tokens, ev.completion_tokens)
                    body = protocol.completion_body(rid, model_id, "", None, use)
                    body["choices"] = []
                    yield sse_data(body)
            else:
                yield sse_data(APIError(500, ev.message, type="server_error").body())
        yield "data: [DONE]\n\n"

    async def chat_stream(rid: str, events: EventQueue, include_usage: bool) -> AsyncIterator[str]:
        yield sse_data(protocol.chat_chunk(rid, model_id, {"role": "assistant", "content": ""}))
        async for ev in events:
            if isinstance(ev, TextDelta):
                yield sse_data(protocol.chat_chunk(rid, model_id, {"content": ev.text}))
            elif isinstance(ev, Finished):
                yield sse_data(protocol.chat_chunk(rid, model_id, {}, protocol.finish_reason(ev.reason)))
                if include_usage:
                    use = protocol.usage(ev.prompt_tokens, ev.completion_tokens)
                    yield sse_data(protocol.chat_chunk(rid, model_id, None, use=use))
            else:
                yield sse_data(APIError(500, ev.message, type="server_error").body())
        yield "data: [DONE]\n\n"

    return app


def sse(stream: AsyncIterator[str], ticket: Ticket) -> StreamingResponse:
    """Server-sent events; the background task runs when the stream ends or the client disconnects."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(ticket.cancel))


def sse_data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def collect(request: Request, events: EventQueue, ticket: Ticket) -> tuple[str, Finished] | None:
    """The whole text and the Finished event, or None when the client disconnected first (the request
    is then cancelled)."""

    async def read() -> tuple[str, Finished]:
        parts = []
        async for ev in events:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, type="server_error")
            else:
                return "".join(parts), ev
        raise APIError(500, "the request ended without a result", type="server_error")

    async def disconnected() -> None:  # the body was read: receive() now returns only on disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reader = asyncio.ensure_future(read())
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled
        watcher.cancel()
        if not reader.done():
            reader.cancel()
            ticket.cancel()
    return reader.result() if reader in done else None


def validation_api_error(e: RequestValidationError) -> APIError:
    """pydantic's first complaint as a 400 naming the parameter (invalid JSON included)."""
    errors = e.errors()
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    if not loc:
        return bad_request("the request body must be a JSON object (and sent with Content-Type: application/json)")
    # a field of several types (prompt: str | list[int] | ...) fails once per type, each loc ending in the type
    prefix = tuple(err["loc"][:-1])
    kinds = list(dict.fromkeys(str(e["loc"][len(prefix)]) for e in errors
                               if len(e["loc"]) > len(prefix) and tuple(e["loc"][: len(prefix)]) == prefix))
    if len(kinds) > 1 and err.get("type") != "missing" and len(prefix) > 1:
        param = ".".join(loc[:-1])
        value = json.dumps(_field(e.body, loc[:-1])) if e.body is not None else "this value"
        return bad_request(f"{param}: {value} is not valid here; expected one of: {', '.join(kinds)}", param)
    param = ".".join(loc)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {err.get('msg', 'invalid value')}{more}", param)


def _field(body: object, path: list[str]) -> object:
    for key in path:
        if isinstance(body, dict):
            body = body.get(key)
        elif isinstance(body, list) and key.isdigit() and int(key) < len(body):
            body = body[int(key)]
        else:
            return None
    return body


def api_error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
