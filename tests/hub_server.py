"""A fake Hugging Face Hub on 127.0.0.1, for testing pushes with the real huggingface_hub client.

It speaks the part of the Hub API that `HfApi.create_repo` + `HfApi.upload_folder` use when xet is off
(read from huggingface_hub 2.4's hf_api.py, _commit_api.py and lfs.py):

    POST /api/repos/create                               create_repo (409 + url when it exists)
    GET  /api/models/{repo}[/revision/{rev}]             repo_info / model_info
    GET  /api/models/{repo}/tree/{rev}[/{path}]          list_repo_tree / list_repo_files
    POST /api/models/{repo}/branch/{branch}              create_branch (409 when it exists)
    POST /api/validate-yaml                              README.md metadata check before upload
    POST /api/models/{repo}/preupload/{rev}              "regular" or "lfs" for each file
    POST /{repo}.git/info/lfs/objects/batch              LFS batch: pre-signed upload URLs (basic or multipart)
    PUT  /__lfs__/{oid}[/{part}]?sig=...                 the upload itself (no Authorization, like S3)
    POST /__lfs__/{oid}?sig=...                          multipart completion
    POST /{repo}.git/info/lfs/objects/verify             LFS verify
    POST /api/models/{repo}/commit/{rev}                 NDJSON commit: header / file (base64) / lfsFile lines
    GET  /api/whoami-v2                                  whoami

Every request is recorded (method, path, query, headers, body) and every committed file is stored with
its bytes, so tests can assert what was pushed and grep it all for a token. API endpoints require
`Authorization: Bearer <token>` with one of `tokens`; upload URLs do not, as on the real Hub. `fail()`
makes an endpoint answer an error status at once (no delay, so the client's own retries stay fast).
A request to anything else is answered 404 and listed in `unhandled`.

Usage, in a test (the `fake_hub` fixture below, imported by conftest.py):

    def test_push(fake_hub):
        HfApi(token=fake_hub.token).create_repo("me/x")  # HfApi() now talks to the fake Hub
        fake_hub.files("me/x")  # path -> bytes

The client must upload over plain HTTP + LFS (xet off), must not be in offline mode, and must be pointed at
the fake Hub (HfApi(endpoint=...) or HF_ENDPOINT); `fake_hub` sets those three for the test's process and,
as environment variables, for the subprocesses it starts. `FakeHub.environment()` gives the variables for
a subprocess started with an environment of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

# Endpoint names, as used by FakeHub.fail() and RecordedRequest.endpoint.
ENDPOINTS = (
    "create_repo",
    "repo_info",
    "tree",
    "branch",
    "validate_yaml",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "lfs_complete",
    "lfs_verify",
    "commit",
    "whoami",
)
# Files the Hub stores with LFS by default (.gitattributes of a new repo), besides binary and large files.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".model", ".msgpack", ".onnx", ".pkl")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_REPO_ACTIONS = {"preupload", "commit", "branch", "revision", "tree"}
# The token the `fake_hub` fixture accepts (long enough to look like a real one to hf_dpo's scans).
FAKE_HUB_TOKEN = "hf_FakeHubTokenDoNotLeak" + "x" * 16


@dataclass
class RecordedRequest:
    method: str
    path: str  # URL path, still percent-encoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    endpoint: str | None  # one of ENDPOINTS, or None for an unknown URL
    status: int = 0


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    lfs_paths: dict[str, set[str]] = field(default_factory=lambda: {"main": set()})
    commits: list[dict] = field(default_factory=list)


@dataclass
class _Failure:
    endpoint: str
    status: int
    message: str
    times: int | None


class _Reply(Exception):
    """Raised by a handler to answer at once with a status and a JSON body."""

    def __init__(self, status: int, body: dict | None = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body or {}, headers or {}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (random port) pretending to be the Hub; see the module docstring."""

    def __init__(
        self,
        *,
        tokens: list[str] | tuple[str, ...] = (),
        user: str = "test-user",
        multipart_chunk_size: int | None = None,
    ):
        self.tokens = set(tokens)
        self.token = next(iter(tokens), None)  # one token it accepts, for tests to authenticate with
        self.user = user
        # When set, LFS objects larger than this are uploaded with the multipart protocol in parts of this size.
        self.multipart_chunk_size = multipart_chunk_size
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content
        self._signatures: dict[str, tuple[str, int]] = {}  # signature -> (oid, size)
        self._parts: dict[str, dict[int, bytes]] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ control

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def environment(self) -> dict[str, str]:
        """The variables a huggingface_hub client process needs to talk to this fake Hub."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}

    def fail(self, endpoint: str, status: int, message: str | None = None, times: int | None = None) -> None:
        """Answer `status` on `endpoint` (a name of ENDPOINTS, or "*" for every API endpoint), `times` times
        (None: until clear_failures)."""
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS} or '*'")
        message = message or f"Injected failure: {status} {HTTPStatus(status).phrase}"
        with self._lock:
            self._failures.append(_Failure(endpoint, status, message, times))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # ------------------------------------------------------------------------------------------ inspection

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """path -> bytes of the files in `repo_id` at `revision`."""
        with self._lock:
            return dict(self.repos[repo_id].branches[revision])

    def lfs_files(self, repo_id: str, revision: str = "main") -> set[str]:
        """The paths committed as LFS pointers (uploaded through the LFS batch + PUT protocol)."""
        with self._lock:
            return set(self.repos[repo_id].lfs_paths[revision])

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def all_received_bytes(self) -> bytes:
        """Every request's headers and body, concatenated: grep it for things that must never be sent."""
        with self._lock:
            return b"\n".join(
                json.dumps(r.headers).encode() + r.path.encode() + r.body for r in self.requests
            )

    # ------------------------------------------------------------------------------------------ internals

    def _failure_for(self, endpoint: str, wildcard: bool = True) -> _Failure | None:
        names = (endpoint, "*") if wildcard else (endpoint,)
        with self._lock:
            for failure in self._failures:
                if failure.endpoint in names and failure.times != 0:
                    if failure.times is not None:
                        failure.times -= 1
                    return failure
        return None

    def _repo(self, repo_id: str) -> FakeRepo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _Reply(
                404,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )
        return repo

    def _branch(self, repo: FakeRepo, revision: str) -> str:
        revision = unquote(revision)
        if revision not in repo.branches:
            raise _Reply(
                404,
                {"error": f"Invalid rev id: {revision}"},
                {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {revision}"},
            )
        return revision


@pytest.fixture
def fake_hub(monkeypatch) -> Iterator[FakeHub]:
    """A running FakeHub accepting FAKE_HUB_TOKEN (`fake_hub.token`), and for the test's duration only: xet
    off, offline mode off and the endpoint pointing at it, in huggingface_hub's constants (read when a call
    is made) and in the environment (read by the subprocesses the test starts). Nothing else is set: the
    token is the test's to give."""
    from huggingface_hub import constants

    with FakeHub(tokens=[FAKE_HUB_TOKEN]) as hub:
        for name, value in hub.environment().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield hub


def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    """(endpoint name, url params) for a request, or (None, {}) when this server does not know it."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if method == "POST" and path == "/api/repos/create":
        return "create_repo", {}
    if method == "POST" and path == "/api/validate-yaml":
        return "validate_yaml", {}
    if method == "GET" and path == "/api/whoami-v2":
        return "whoami", {}
    if parts[0] == "__lfs__" and len(parts) in (2, 3):
        params = {"oid": parts[1], "part": parts[2] if len(parts) == 3 else ""}
        if method == "PUT":
            return "lfs_upload", params
        if method == "POST" and len(parts) == 2:
            return "lfs_complete", params
    if path.endswith(".git/info/lfs/objects/batch") and method == "POST":
        return "lfs_batch", {"repo_id": path.strip("/")[: -len(".git/info/lfs/objects/batch")]}
    if path.endswith(".git/info/lfs/objects/verify") and method == "POST":
        return "lfs_verify", {"repo_id": path.strip("/")[: -len(".git/info/lfs/objects/verify")]}
    if parts[:2] == ["api", "models"] and len(parts) >= 3:
        rest = parts[2:]
        if len(rest) >= 3 and rest[1] in _REPO_ACTIONS:
            repo_id, action, tail = rest[0], rest[1], rest[2:]
        elif len(rest) >= 4 and rest[2] in _REPO_ACTIONS:
            repo_id, action, tail = "/".join(rest[:2]), rest[2], rest[3:]
        elif len(rest) <= 2:
            repo_id, action, tail = "/".join(rest), "", []
        else:
            return None, {}
        params = {"repo_id": repo_id, "rev": tail[0] if tail else "main", "sub": "/".join(tail[1:])}
        if action in ("", "revision") and method == "GET":
            return "repo_info", params
        if action == "tree" and method == "GET":
            return "tree", params
        if action in ("preupload", "commit", "branch") and method == "POST":
            return action, params
    return None, {}


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub  # set on the subclass made by FakeHub.start
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    disable_nagle_algorithm = True  # else each small answer waits ~40 ms for a delayed ACK

    def log_message(self, format, *args):  # noqa: A002 - quiet test output
        pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    # ------------------------------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: dict | list | None = None, headers: dict[str, str] | None = None):
        data = json.dumps(body if body is not None else {}).encode()
        headers = {"Content-Type": "application/json", **(headers or {}), "Content-Length": str(len(data))}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        hub = self.fake_hub
        url = urlsplit(self.path)
        body = self._read_body()
        endpoint, params = _route(self.command, url.path)
        record = RecordedRequest(
            method=self.command,
            path=url.path,
            query=parse_qs(url.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            endpoint=endpoint,
        )
        with hub._lock:
            hub.requests.append(record)
            if endpoint is None:
                hub.unhandled.append(record)
        try:
            if endpoint is None:
                raise _Reply(404, {"error": f"FakeHub does not know {self.command} {url.path}"})
            is_storage = endpoint in ("lfs_upload", "lfs_complete")  # pre-signed URLs: no token, like S3
            if not is_storage:
                self._check_auth()
            failure = hub._failure_for(endpoint, wildcard=not is_storage)
            if failure is not None:
                raise _Reply(failure.status, {"error": failure.message}, {"X-Error-Message": failure.message})
            status, answer, headers = getattr(self, "_ep_" + endpoint)(params, record)
        except _Reply as reply:
            status, answer, headers = reply.status, reply.body, reply.headers
        record.status = status
        self._send(status, answer, headers)

    def _check_auth(self):
        authorization = self.headers.get("Authorization")
        if not authorization:
            raise _Reply(401, {"error": "Invalid username or password."})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token not in self.fake_hub.tokens:
            message = "Invalid credentials in Authorization header"
            raise _Reply(401, {"error": message}, {"X-Error-Message": message})

    def _json(self, record: RecordedRequest) -> dict:
        try:
            return json.loads(record.body or b"{}")
        except json.JSONDecodeError as err:
            raise _Reply(400, {"error": f"Invalid JSON body: {err}"}) from err

    # ------------------------------------------------------------------------------------------ endpoints
    # Each returns (status, JSON body, extra headers).

    def _ep_whoami(self, params, record):
        return 200, {"type": "user", "name": self.fake_hub.user, "auth": {"type": "access_token"}}, {}

    def _ep_create_repo(self, params, record):
        hub = self.fake_hub
        payload = self._json(record)
        if payload.get("type", "model") != "model":
            raise _Reply(400, {"error": "FakeHub only hosts model repos"})
        repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
        url = f"{hub.endpoint}/{repo_id}"
        with hub._lock:
            if repo_id in hub.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            hub.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)}, {}

    def _ep_repo_info(self, params, record):
        hub = self.fake_hub
        with hub._lock:
            repo = hub._repo(params["repo_id"])
            rev = hub._branch(repo, params["rev"])
            files = repo.branches[rev]
            info = {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": repo.heads[rev],
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "library_name": "peft",
                "siblings": [{"rfilename": path} for path in sorted(files)],
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            }
        return 200, info, {}

    def _ep_tree(self, params, record):
        hub = self.fake_hub
        with hub._lock:
            repo = hub._repo(params["repo_id"])
            rev = hub._branch(repo, params["rev"])
            prefix = params["sub"].strip("/")
            entries = []
            for path, data in sorted(repo.branches[rev].items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                if path in repo.lfs_paths[rev]:
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(entry)
        return 200, entries, {}

    def _ep_branch(self, params, record):
        hub = self.fake_hub
        branch = params["rev"]
        with hub._lock:
            repo = hub._repo(params["repo_id"])
            if branch in repo.branches:
                raise _Reply(409, {"error": "Reference already exists"})
            start = hub._branch(repo, self._json(record).get("startingPoint") or "main")
            repo.branches[branch] = dict(repo.branches[start])
            repo.heads[branch] = repo.heads[start]
            repo.lfs_paths[branch] = set(repo.lfs_paths[start])
        return 200, {}, {}

    def _ep_validate_yaml(self, params, record):
        payload = self._json(record)
        content = payload.get("content", "")
        errors = []
        if not isinstance(content, str):
            errors.append({"message": "content must be a string"})
        elif content.startswith("---") and content.find("\n---", 3) < 0:
            errors.append({"message": "YAML front matter is not closed by ---"})
        if errors:
            return 400, {"errors": errors, "warnings": []}, {}
        warnings = (
            [] if content.startswith("---") else [{"message": "empty or missing yaml metadata in repo card"}]
        )
        return 200, {"errors": [], "warnings": warnings}, {}

    def _ep_preupload(self, params, record):
        hub = self.fake_hub
        payload = self._json(record)
        with hub._lock:
            repo = hub._repo(params["repo_id"])
            rev = hub._branch(repo, params["rev"])
            answers = []
            for item in payload.get("files", []):
                path, size = item["path"], int(item["size"])
                sample = base64.b64decode(item.get("sample", ""))
                is_lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or _looks_binary(sample)
                existing = repo.branches[rev].get(path)
                oid = None
                if existing is not None:
                    in_lfs = path in repo.lfs_paths[rev]
                    oid = hashlib.sha256(existing).hexdigest() if in_lfs else git_blob_sha1(existing)
                answers.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if is_lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            head = repo.heads[rev]
        return 200, {"files": answers, "commitOid": head}, {}

    def _ep_lfs_batch(self, params, record):
        hub = self.fake_hub
        payload = self._json(record)
        if payload.get("operation") != "upload":
            raise _Reply(422, {"message": "FakeHub only supports LFS uploads"})
        transfers = payload.get("transfers") or ["basic"]
        with hub._lock:
            hub._repo(params["repo_id"])
            objects, chosen = [], "basic"
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                if oid in hub.lfs_objects:
                    objects.append(
                        {"oid": oid, "size": size}
                    )  # already stored: no actions, nothing to upload
                    continue
                signature = secrets.token_urlsafe(16)
                hub._signatures[signature] = (oid, size)
                upload_url = f"{hub.endpoint}/__lfs__/{oid}?sig={quote(signature)}"
                chunk = hub.multipart_chunk_size
                if chunk and size > chunk and "multipart" in transfers:
                    chosen = "multipart"
                    n_parts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    for n in range(1, n_parts + 1):
                        header[f"{n:05d}"] = f"{hub.endpoint}/__lfs__/{oid}/{n}?sig={quote(signature)}"
                    upload = {"href": upload_url, "header": header}
                else:
                    upload = {"href": upload_url}
                verify = {"href": f"{hub.endpoint}/{params['repo_id']}.git/info/lfs/objects/verify"}
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {"upload": upload, "verify": verify},
                    }
                )
        return 200, {"transfer": chosen, "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _signed(self, record: RecordedRequest, oid: str) -> int:
        signature = (record.query.get("sig") or [""])[0]
        signed = self.fake_hub._signatures.get(signature)
        if signed is None or signed[0] != oid:
            raise _Reply(403, {"error": "SignatureDoesNotMatch"})
        return signed[1]

    def _store_lfs_object(self, oid: str, size: int, data: bytes):
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise _Reply(400, {"error": f"Uploaded content does not match oid {oid} / size {size}"})
        self.fake_hub.lfs_objects[oid] = data

    def _ep_lfs_upload(self, params, record):
        hub = self.fake_hub
        with hub._lock:
            size = self._signed(record, params["oid"])
            if params["part"]:
                hub._parts.setdefault(params["oid"], {})[int(params["part"])] = record.body
            else:
                self._store_lfs_object(params["oid"], size, record.body)
        return 200, {}, {"ETag": '"' + hashlib.md5(record.body).hexdigest() + '"'}

    def _ep_lfs_complete(self, params, record):
        hub = self.fake_hub
        payload = self._json(record)
        with hub._lock:
            size = self._signed(record, params["oid"])
            parts = hub._parts.pop(params["oid"], {})
            numbers = [p["partNumber"] for p in payload.get("parts", [])]
            if numbers != sorted(parts) or not numbers:
                raise _Reply(
                    400, {"error": f"Parts {numbers} do not match the uploaded parts {sorted(parts)}"}
                )
            for p in payload["parts"]:
                if p["etag"] != '"' + hashlib.md5(parts[p["partNumber"]]).hexdigest() + '"':
                    raise _Reply(400, {"error": f"Wrong etag for part {p['partNumber']}"})
            self._store_lfs_object(params["oid"], size, b"".join(parts[n] for n in numbers))
        return 200, {}, {}

    def _ep_lfs_verify(self, params, record):
        payload = self._json(record)
        data = self.fake_hub.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise _Reply(404, {"error": "Object not found"})
        return 200, {}, {}

    def _ep_commit(self, params, record):
        hub = self.fake_hub
        if record.headers.get("content-type") != "application/x-ndjson":
            raise _Reply(400, {"error": "Expected an application/x-ndjson body"})
        lines = [json.loads(line) for line in record.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, {"error": "The first line of a commit must be its header"})
        header = lines[0]["value"]
        with hub._lock:
            repo = hub._repo(params["repo_id"])
            rev = hub._branch(repo, params["rev"])
            parent = header.get("parentCommit")
            if parent and not repo.heads[rev].startswith(parent):
                raise _Reply(412, {"error": "A commit has happened since. Please refresh and try again."})
            files, lfs_paths = dict(repo.branches[rev]), set(repo.lfs_paths[rev])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Reply(400, {"error": "Only base64 file content is supported"})
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif key == "lfsFile":
                    data = hub.lfs_objects.get(value["oid"])
                    if (
                        value.get("algo") != "sha256"
                        or data is None
                        or len(data) != value.get("size", len(data))
                    ):
                        raise _Reply(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                    files[value["path"]] = data
                    lfs_paths.add(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    lfs_paths.discard(value["path"])
                else:
                    raise _Reply(400, {"error": f"FakeHub does not support {key!r} commit lines"})
            digest = hashlib.sha1(repo.heads[rev].encode())
            for path in sorted(files):
                digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
            oid = digest.hexdigest()
            repo.branches[rev], repo.lfs_paths[rev], repo.heads[rev] = files, lfs_paths, oid
            repo.commits.append({"oid": oid, "revision": rev, **header, "files": sorted(files)})
        answer = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}",
        }
        if record.query.get("create_pr") == ["1"]:
            answer["pullRequestUrl"] = f"{hub.endpoint}/{repo.repo_id}/discussions/1"
        return 200, answer, {}


def _looks_binary(sample: bytes) -> bool:
    """Binary if it has a NUL byte or is not UTF-8 (a multi-byte character cut at the sample's end is fine)."""
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start < len(sample) - 3
    return False
