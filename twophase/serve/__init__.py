"""Serving: an OpenAI-compatible HTTP server with continuous batching (`twophase serve`), and
configurations for serving an artifact with other engines when one machine is not enough.

    scheduler.py   waiting queue + running slots over one Engine, all model steps on one thread
    protocol.py    OpenAI request models (validation) and response / stream-chunk bodies
    app.py         the ASGI app (FastAPI): routes, server-sent events, errors in OpenAI's shape
    server.py      uvicorn in the foreground or on a background thread
    scaleout.py    `twophase serve-config`: a Triton Inference Server model repository for an artifact
    triton_model.py  the generation loop as a Triton Python-backend model (copied into that repository)

Needs the `serve` extra (fastapi, uvicorn); the runtime itself does not.
"""
