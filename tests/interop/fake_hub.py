"""A local stand-in for the Hugging Face Hub's upload API, for `bastion publish` tests.

The Hub itself cannot be reached from the test machines, so the real `huggingface_hub`
client is pointed (`endpoint=`) at this server, which implements what `HfApi.create_repo`
and `HfApi.create_commit` send in huggingface_hub 2.4 and records what it receives:

    POST /api/repos/create                      {"name", "organization", "visibility", "type"}
    GET  /api/models/{ns}/{name}                the repo's info (private flag)
    POST /api/validate-yaml                     the card's content
    POST /api/models/{ns}/{name}/preupload/{rev}  answers "regular" for every file, so file
                                                bytes travel base64 in the commit (the Hub
                                                would ask for LFS / Xet for large files)
    POST /api/models/{ns}/{name}/commit/{rev}   NDJSON: header line, one line per file

Every request must carry `Authorization: Bearer <token>` (401 otherwise). Runs in a thread
on 127.0.0.1 with an ephemeral port.
"""
from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class HubRecord:
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    auth_headers: list[str] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)  # create_repo payloads
    repos: dict[str, bool] = field(default_factory=dict)  # repo id -> private
    preuploaded: list[dict] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)  # {"repo", "header", "files": {path: bytes}}
    validated_yaml: list[str] = field(default_factory=list)


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.record = HubRecord()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                with hub._lock:
                    hub.record.requests.append((self.command, self.path))
                    hub.record.auth_headers.append(auth)
                if auth != f"Bearer {hub.token}":
                    self._send(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self):
                body = self._body()
                del body
                if not self._authorized():
                    return
                match = re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", self.path.split("?")[0])
                if match and match["repo"] in hub.record.repos:
                    return self._send(200, {"id": match["repo"], "private": hub.record.repos[match["repo"]],
                                            "sha": "0" * 40, "siblings": []})
                self._send(404, {"error": "Repository not found"})

            def do_POST(self):
                body = self._body()
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    hub.record.validated_yaml.append(json.loads(body)["content"])
                    return self._send(200, {"errors": [], "warnings": []})
                match = re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path)
                if match:
                    files = json.loads(body)["files"]
                    hub.record.preuploaded.extend(files)
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                match = re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path)
                if match:
                    return self._commit(match["repo"], body)
                self._send(404, {"error": f"not implemented: {path}"})

            def _create(self, payload: dict) -> None:
                repo = f"{payload['organization']}/{payload['name']}"
                hub.record.created.append(payload)
                if repo in hub.record.repos:
                    return self._send(409, {"error": "You already created this model repo"})
                hub.record.repos[repo] = payload.get("visibility") == "private"
                self._send(200, {"url": f"{hub.url}/{repo}"})

            def _commit(self, repo: str, body: bytes) -> None:
                if repo not in hub.record.repos:
                    return self._send(404, {"error": "Repository not found"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {}
                for line in lines[1:]:
                    if line["key"] != "file" or line["value"].get("encoding") != "base64":
                        return self._send(400, {"error": f"unexpected operation {line['key']}"})
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                hub.record.commits.append({"repo": repo, "header": lines[0]["value"], "files": files})
                self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})

        return Handler
