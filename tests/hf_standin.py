"""A local stand-in for the Hugging Face Hub's download API, for bootstrap's model download tests.

It serves one model repository from a folder, with the routes huggingface_hub's snapshot_download
uses: the revision's info (`/api/models/{repo}/revision/{rev}`), its file tree
(`/api/models/{repo}/tree/{rev}`), and each file's HEAD and GET (`/{repo}/resolve/{rev}/{file}`),
with the headers the client reads (X-Repo-Commit, ETag, Content-Length). Files go out as plain
HTTP (no Xet). `throttle` slows every file to a given rate, and `stall_after` stops sending
after that many bytes of the largest file for `stall_seconds`, so progress and stall lines can be
seen. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubStandIn:
    repo_id: str
    folder: Path
    throttle: float | None = None  # bytes per second for file bodies
    stall_after: int | None = None  # stop sending the largest file after this many bytes ...
    stall_seconds: float = 0.0  # ... for this long

    def files(self) -> dict[str, Path]:
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}

    def etag(self, path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def start(self) -> str:
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                standin.answer(self, body=False)

            def do_GET(self) -> None:
                standin.answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, request: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        info_prefix = f"/api/models/{self.repo_id}/revision/"
        tree_prefix = f"/api/models/{self.repo_id}/tree/"
        file_prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(info_prefix):
            siblings = [{"rfilename": name} for name in self.files()]
            self.send_json(request, {"id": self.repo_id, "sha": COMMIT, "siblings": siblings}, body)
        elif path.startswith(tree_prefix):
            entries = [
                {"type": "file", "path": name, "size": p.stat().st_size, "oid": self.etag(p)[:40]}
                for name, p in self.files().items()
            ]
            self.send_json(request, entries, body)
        elif path.startswith(file_prefix):
            name = path[len(file_prefix) :].partition("/")[2]
            file = self.files().get(name)
            if file is None:
                request.send_error(404)
                return
            self.send_file(request, file, body)
        else:
            request.send_error(404)

    def send_json(self, request, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if body:
            request.wfile.write(data)

    def send_file(self, request, file: Path, body: bool) -> None:
        data = file.read_bytes()
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{self.etag(file)}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if not body:
            return
        largest = max(self.files().values(), key=lambda p: p.stat().st_size)
        piece = 64 * 1024
        for start in range(0, len(data), piece):
            if file == largest and self.stall_after is not None and start >= self.stall_after > start - piece:
                time.sleep(self.stall_seconds)
            request.wfile.write(data[start : start + piece])
            if self.throttle:
                time.sleep(piece / self.throttle)
