"""A local stand-in for the Hugging Face Hub: the part of its protocol that hf_hub_download uses.

Two HTTP servers on 127.0.0.1, like the Hub and its CDN:
- the Hub answers HEAD/GET `/{repo}/resolve/{revision}/{file}` with a 302 to the CDN and the
  headers huggingface_hub reads: X-Repo-Commit, X-Linked-Etag (the file's sha256, as for LFS
  files), X-Linked-Size; unknown repos/files/revisions get the Hub's X-Error-Code answers;
- the CDN serves `/blobs/{sha256}` with Content-Length and HTTP Range (206 + Content-Range).
The CDN is another origin (another port), so huggingface_hub treats it as the Hub's CDN: it
does not follow the redirect on HEAD and downloads from the Location it was given.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "5d1f0e2a8b3c4d5e6f708192a3b4c5d6e7f80912"


@dataclass
class HubFile:
    served: bytes  # what the CDN sends
    sha256: str  # what the Hub says it is
    size: int  # what the Hub says its size is
    revision: str  # the commit it is in
    cut_at: int | None = None  # the first GET closes the connection after this many bytes
    status: int | None = None  # the Hub answers this bare HTTP status instead (no error code)


class LocalHub:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], HubFile] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.hub_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.cdn_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        for server in (self.hub_server, self.cdn_server):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_server.server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self.cdn_server.server_port}"

    def add(
        self,
        repo: str,
        file: str,
        data: bytes,
        *,
        corrupt: bool = False,
        size: int | None = None,
        revision: str = COMMIT,
        cut_at: int | None = None,
        status: int | None = None,
    ) -> HubFile:
        """Serve `data` as repo/file; `corrupt` flips one byte in what is sent (same size)."""
        served = data
        if corrupt:
            served = bytearray(data)
            served[-100] ^= 0xFF
            served = bytes(served)
        sha = hashlib.sha256(data).hexdigest()
        entry = HubFile(served, sha, size or len(data), revision, cut_at, status)
        self.files[(repo, file)] = entry
        return entry

    def gets(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET"]

    def close(self) -> None:
        for server in (self.hub_server, self.cdn_server):
            server.shutdown()
            server.server_close()


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if self.server is hub.cdn_server:
                self._blob(body)
            else:
                self._resolve()

        def _reply(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": "0", **headers}.items():
                self.send_header(key, value)
            self.end_headers()

        def _resolve(self) -> None:
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
            repos = {repo for repo, _ in hub.files}
            if not match or match[1] not in repos:
                return self._reply(401, {"X-Error-Code": "RepoNotFound"})
            repo, revision, file = match.groups()
            found = hub.files.get((repo, file))
            if found is None:
                return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            if found.status:
                return self._reply(found.status, {})
            if revision not in ("main", found.revision):
                return self._reply(404, {"X-Error-Code": "RevisionNotFound"})
            self._reply(
                302,
                {
                    "Location": f"{hub.cdn}/blobs/{found.sha256}",
                    "X-Repo-Commit": found.revision,
                    "X-Linked-Etag": f'"{found.sha256}"',
                    "X-Linked-Size": str(found.size),
                    "ETag": '"git-pointer-etag"',
                },
            )

        def _blob(self, body: bool) -> None:
            sha = self.path.rsplit("/", 1)[-1]
            found = next((f for f in hub.files.values() if f.sha256 == sha), None)
            if found is None:
                return self._reply(404, {})
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if ranged:
                start = int(ranged[1])
            data = found.served[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{found.sha256}"')
            if ranged:
                total = len(found.served)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            self.end_headers()
            if not body:
                return
            if found.cut_at is not None:  # drop the connection mid-body, once
                self.wfile.write(data[: found.cut_at])
                self.wfile.flush()
                found.cut_at = None
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

    return Handler
