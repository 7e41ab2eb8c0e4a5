"""A stand-in for the Hugging Face Hub's file endpoints on 127.0.0.1, for download tests.

It answers what ``huggingface_hub.hf_hub_download`` asks (with ``HF_ENDPOINT`` pointing here):
``HEAD`` and ``GET /{org}/{name}/resolve/{revision}/{filename}``, with the headers the client reads
(``X-Repo-Commit``, ``ETag``, ``Content-Length``), and the Hub's 404 answers (``X-Error-Code``
``RepoNotFound`` / ``EntryNotFound``) for anything it does not hold. Each request is recorded.
"""
import hashlib
import http.server
import threading
from pathlib import Path
from typing import Dict, List


class HubStandIn:
    def __init__(self, repos: Dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.requests: List[str] = []
        handler = self._handler()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _commit(self, folder: Path) -> str:
        h = hashlib.sha1()
        for p in sorted(folder.iterdir()):
            h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    def _handler(self):
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, body: bool):
                standin.requests.append(f"{self.command} {self.path}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                folder = standin.repos.get(repo)
                if folder is None:
                    return self._error(404, "RepoNotFound")
                path = folder / filename
                if not path.is_file():
                    return self._error(404, "EntryNotFound")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", standin._commit(folder))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code: int, kind: str):
                self.send_response(code)
                self.send_header("X-Error-Code", kind)
                self.send_header("X-Error-Message", f"{kind}: {self.path}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

        return Handler
