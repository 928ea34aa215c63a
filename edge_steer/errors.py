"""Errors by meaning, so each front end can answer in its own terms: the CLI with an exit
code (`exit_code`), the server with an HTTP status (`http_status`). Every message names the
problem and the fix in one line.

| class         | meaning                                            | exit | HTTP |
|---------------|----------------------------------------------------|------|------|
| BadInput      | an option, spec, name or request field is wrong    | 2    | 400  |
| NotFound      | a model, vector or file that does not exist        | 2    | 404  |
| DamagedFile   | a file that exists but is truncated or corrupt     | 2    | 422  |
| DoesNotFit    | this machine lacks the RAM, VRAM or disk for it    | 3    | 507  |
| NetworkError  | the Hugging Face Hub or an RPC worker: no answer   | 1    | 502  |
| EngineError   | llama.cpp failed (decode, context, load)           | 1    | 500  |
"""

from __future__ import annotations


class EdgeSteerError(Exception):
    """Base of every error edge-steer reports to a person instead of a traceback."""

    exit_code = 1
    http_status = 500


class BadInput(EdgeSteerError, ValueError):
    """The user asked for something malformed or impossible: fix the input."""

    exit_code = 2
    http_status = 400


class NotFound(EdgeSteerError, LookupError):
    """A model, vector, concept or file that does not exist (here, or in the catalog)."""

    exit_code = 2
    http_status = 404


class DamagedFile(EdgeSteerError):
    """A file that exists but cannot be used as it is: truncated, corrupt, the wrong kind."""

    exit_code = 2
    http_status = 422


class DoesNotFit(EdgeSteerError):
    """This machine has too little RAM, GPU memory or disk for what was asked."""

    exit_code = 3
    http_status = 507


class NetworkError(EdgeSteerError, ConnectionError):
    """A download failed on the way (no connection, a timeout, an HTTP error from the Hub), or
    an RPC worker (`--rpc`) could not be reached or did not answer."""

    exit_code = 1
    http_status = 502


class EngineError(EdgeSteerError, RuntimeError):
    """llama.cpp itself failed: loading, making a context, decoding."""

    exit_code = 1
    http_status = 500
