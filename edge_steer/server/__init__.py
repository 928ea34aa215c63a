"""`edge-steer serve`: an OpenAI-compatible HTTP server that steers each request differently.

- `pool.py`      the vectors a request may name: stored ones that fit, presets, trainable
                 built-ins; never file paths
- `requests.py`  OpenAI request bodies -> checked jobs; `api_error.py` errors in OpenAI's shape
- `lanes.py`     the engine thread: every lane a sequence of one batched context
                 (`engine.batching`), each under its own steering; a bounded queue
- `app.py`       the Starlette app: routes, SSE streaming, auth, the playground page
- `guard.py`     what a request must satisfy first: Host/Origin, JSON content type, body
                 size and read time, header read time
- `startup.py`   options -> a listening server; loading behind /health; a clean shutdown

Needs the `server` extra (uvicorn, starlette); nothing here is imported by other commands.
"""
