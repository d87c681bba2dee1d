"""A small in-process fake of the Hugging Face Hub HTTP API, for testing uploads with the real client.

Why: the real client (huggingface_hub 2.x on httpx2) cannot be mocked at the transport level, and
there is no dry-run. So we serve the few endpoints it actually calls on 127.0.0.1 and point it there
with ``HF_ENDPOINT`` (read at import time, so the client usually runs in a subprocess).

Implemented (model repos only, branch ``main`` only):
- ``POST /api/repos/create`` (409 + url when it exists), ``GET /api/whoami-v2``
- ``POST /api/validate-yaml`` (README front matter must be a YAML mapping; ``base_model`` must be Hub ids)
- ``GET /api/models/{repo}`` and ``/revision/{rev}`` (sha, private, siblings, cardData)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``; files with ``lfs`` info, directories)
- ``POST /api/models/{repo}/preupload/{rev}``: decides regular vs LFS like the Hub (LFS patterns of
  the default .gitattributes, > 10 MiB, or a NUL byte in the sample), returns remote oids for no-op detection
- ``POST /{repo}.git/info/lfs/objects/batch``: "basic" single PUT, or "multipart" (parts + completion)
  above ``multipart_threshold``; upload URLs carry a one-time ticket like signed URLs; ``verify`` action
- ``POST /api/models/{repo}/commit/{rev}``: NDJSON with header / file (base64) / lfsFile / deletedFile /
  deletedFolder lines; LFS objects must have been uploaded with matching size
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with X-Repo-Commit, ETag / X-Linked-Etag / X-Linked-Size

Downloads (for ``snapshot_download``): every commit keeps its file snapshot, so ``/revision/{sha}`` and
``/resolve/{sha}/…`` serve old commits (unknown revisions: 404 RevisionNotFound); ``Range: bytes=N-`` answers
206 (resumed downloads); ``gated`` repos answer 401 GatedRepo without a token and 403 to users not in
``access``; ``faults[path]`` is a list consumed one GET at a time: an int n sends only n bytes of that file and
drops the connection (an interrupted download), a status code (e.g. 503) answers that error. ``add_files`` commits files directly, without the upload protocol.

Not implemented: the Xet storage protocol (the client must run with ``HF_HUB_DISABLE_XET=1`` when
files go to LFS, or use ``lfs=False`` so every file is committed as a regular base64 blob), branches,
pull requests, pagination. Unknown routes answer 404 and are recorded in ``FakeHub.unhandled``.
Auth: ``Authorization: Bearer <token>`` must be one of ``tokens`` (token -> user name); writes need
the namespace to be that user (or one of ``orgs``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*", "*.gguf",
)
LFS_SIZE_LIMIT = 10 * 1024 * 1024
_HUB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """The Hub's timestamp format (the client parses exactly this)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What the Hub reports as the file's remote oid: sha256 for LFS, git blob sha1 otherwise."""
        return self.sha256 if self.lfs else git_sha1(self.data)


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    gated: bool = False
    access: set[str] = field(default_factory=set)  # users allowed into a gated repo
    files: dict[str, Blob] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    created_at: str = field(default_factory=_now)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"]


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: Any = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class FakeHub:
    """Threaded HTTP server with in-memory repos; use as a context manager (stops on exit)."""

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, list[str]] | None = None,
        *,
        lfs: bool = True,
        multipart_threshold: int = 8 * 1024 * 1024,
        multipart_chunk: int = 4 * 1024 * 1024,
    ) -> None:
        self.tokens = dict(tokens or {})
        self.orgs = dict(orgs or {})
        self.lfs = lfs
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, list[int]] = {}  # path -> per GET: bytes sent before dropping, or an HTTP status
        self.unhandled: list[tuple[str, str]] = []
        self.stats = {"lfs_basic": 0, "lfs_multipart": 0, "lfs_verify": 0, "regular": 0}
        self._tickets: dict[str, str] = {}  # ticket -> oid
        self._parts: dict[str, dict[int, bytes]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- state helpers (also for tests)

    def create_repo(self, repo_id: str, private: bool = False) -> FakeRepo:
        """A new repo with the Hub's initial commit (a .gitattributes with the LFS patterns)."""
        with self._lock:
            repo = FakeRepo(repo_id=repo_id, private=private)
            attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
            repo.files[".gitattributes"] = Blob(attrs, lfs=False)
            self._add_commit(repo, "initial commit")
            self.repos[repo_id] = repo
            return repo

    def _add_commit(self, repo: FakeRepo, summary: str) -> str:
        h = hashlib.sha1()
        h.update((repo.commits[-1]["oid"] if repo.commits else "").encode())
        h.update(summary.encode())
        h.update(secrets.token_bytes(8))
        for path in sorted(repo.files):
            h.update(f"{path}\0{repo.files[path].oid}\0".encode())
        oid = h.hexdigest()
        repo.commits.append({"oid": oid, "summary": summary, "files": sorted(repo.files), "snapshot": dict(repo.files)})
        return oid

    def add_files(self, repo_id: str, files: dict[str, bytes], summary: str = "add files") -> str:
        """Commit `files` to `repo_id` (created if missing) without the upload protocol; returns the commit sha."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            for path, data in files.items():
                name = path.rsplit("/", 1)[-1]
                lfs = any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or len(data) > LFS_SIZE_LIMIT
                repo.files[path] = Blob(data, lfs=lfs)
            return self._add_commit(repo, summary)

    def count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def upload_mode(self, path: str, size: int, sample: bytes) -> str:
        if not self.lfs or size == 0:
            return "regular"
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size > LFS_SIZE_LIMIT or b"\0" in sample:
            return "lfs"
        return "regular"


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections must not outlive the test

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ---------------------------------------------------------------- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            payload = json.dumps(body).encode()
            ctype = "application/json"
        else:
            payload = body or b""
            ctype = "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = self._read_body() if method in ("POST", "PUT") else b""
        with hub._lock:
            hub.requests.append((method, split.path))
        try:
            self._route(method, segs, query, body)
        except _HttpError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, e.body if e.body is not None else {"error": e.message}, headers, head=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---------------------------------------------------------------- auth

    def _user(self, required: bool) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            user = self.hub.tokens.get(auth[7:].strip())
            if user is None:
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return user
        if required:
            raise _HttpError(401, "You must be authenticated to access this resource")
        return None

    def _can_write(self, user: str, repo_id: str) -> None:
        ns = repo_id.split("/")[0]
        if ns != user and ns not in self.hub.orgs.get(user, []):
            raise _HttpError(403, f"You don't have the rights to create a model under the namespace {ns!r}")

    def _repo(self, repo_id: str, *, write: bool) -> FakeRepo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        ns = repo_id.split("/")[0]
        member = user is not None and (user == ns or ns in self.hub.orgs.get(user, []))
        if repo is None or (repo.private and not member):
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        if repo.gated and not write:
            if user is None:
                raise _HttpError(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                 "authenticated to access it. Please log in.", code="GatedRepo")
            if user not in repo.access and user != ns:
                raise _HttpError(403, f"Access to model {repo_id} is restricted and you are not in the authorized "
                                 "list. Visit the repo page to ask for access.", code="GatedRepo")
        if write:
            assert user is not None
            self._can_write(user, repo_id)
        return repo

    @staticmethod
    def _check_rev(repo: FakeRepo, rev: str) -> None:
        if rev not in ("main", repo.sha):
            raise _HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    @staticmethod
    def _snapshot(repo: FakeRepo, rev: str) -> tuple[str, dict[str, Blob]]:
        """(commit sha, files) of a revision: main or any commit of the history."""
        if rev == "main":
            return repo.sha, repo.files
        for c in repo.commits:
            if c["oid"] == rev:
                return c["oid"], c["snapshot"]
        raise _HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    # ---------------------------------------------------------------- routes

    def _route(self, method: str, segs: list[str], query: dict[str, str], body: bytes) -> None:
        hub = self.hub
        if method == "POST" and segs == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "GET" and segs == ["api", "whoami-v2"]:
            user = self._user(required=True)
            orgs = [{"name": o} for o in hub.orgs.get(user or "", [])]
            return self._send(200, {"type": "user", "name": user, "orgs": orgs})
        if method == "POST" and segs == ["api", "validate-yaml"]:
            self._user(required=False)
            return self._validate_yaml(json.loads(body or b"{}"))
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                return self._model_info(repo_id, rest[1] if rest else "main")
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body or b"{}"), query)
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], body, query)
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", json.loads(body or b"{}"))
        if segs and segs[0] == "_fake_lfs":
            return self._lfs_transfer(method, segs[1:], query, body)
        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), head=method == "HEAD")
        with hub._lock:
            hub.unhandled.append((method, self.path))
        raise _HttpError(404, f"fake hub does not implement {method} {urlsplit(self.path).path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        user = self._user(required=True)
        assert user is not None
        if payload.get("type", "model") != "model":
            raise _HttpError(400, "fake hub only hosts model repos")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org or user}/{name}"
        self._can_write(user, repo_id)
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise _HttpError(409, "You already created this model repo", body={"error": "exists", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = str(payload.get("content", ""))
        errors: list[dict[str, str]] = []
        meta: Any = {}
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "unterminated YAML front matter"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end]) or {}
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        if not errors and not isinstance(meta, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        elif not errors:
            bases = meta.get("base_model")
            for b in [bases] if isinstance(bases, str) else (bases or []):
                parts = str(b).split("/")
                if len(parts) != 2 or not all(p and set(p) <= _HUB_ID_CHARS for p in parts):
                    errors.append({"message": f'"base_model" must be a Hub model id, got {b!r}'})
            for entry in meta.get("model-index") or []:
                if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), list):
                    errors.append({"message": '"model-index" entries need "name" and "results"'})
        if errors:
            raise _HttpError(400, "Invalid metadata", body={"errors": errors, "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=False)
        sha, files = self._snapshot(repo, rev)
        card: Any = None
        readme = files.get("README.md")
        if readme is not None:
            text = readme.data.decode("utf-8", "replace")
            end = text.find("\n---", 3)
            if text.startswith("---") and end > 0:
                card = yaml.safe_load(text[3:end])
        siblings = [{"rfilename": p, "size": len(files[p].data)} for p in sorted(files)]
        self._send(200, {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": sha, "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "lastModified": _now(),
            "createdAt": repo.created_at, "siblings": siblings, "cardData": card,
        })

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict[str, str]) -> None:
        repo = self._repo(repo_id, write=False)
        _, files = self._snapshot(repo, rev)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            dirs = rel[:-1] if recursive else rel[:1] if len(rel) > 1 else []
            for i in range(len(dirs)):
                d = base + "/".join(rel[: i + 1])
                entries.setdefault(d, {"type": "directory", "oid": git_sha1(d.encode()), "size": 0, "path": d})
            if len(rel) == 1 or recursive:
                item: dict[str, Any] = {"type": "file", "path": path, "size": len(blob.data)}
                if blob.lfs:
                    pointer = lfs_pointer(blob.sha256, len(blob.data))
                    item["oid"] = git_sha1(pointer)
                    item["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(pointer)}
                else:
                    item["oid"] = git_sha1(blob.data)
                entries[path] = item
        if base and not entries:
            raise _HttpError(404, f"{prefix} does not exist", code="EntryNotFound")
        self._send(200, list(entries.values()))

    def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any], query: dict[str, str]) -> None:
        repo = self._repo(repo_id, write=True)
        if query.get("create_pr"):
            raise _HttpError(400, "fake hub does not support pull requests")
        self._check_rev(repo, rev)
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = self.hub.upload_mode(f["path"], int(f.get("size", 0)), sample)
            existing = repo.files.get(f["path"])
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                          "oid": existing.oid if existing is not None else None})
        self._send(200, {"files": files, "commitOid": repo.sha})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        hub = self.hub
        self._repo(repo_id, write=payload.get("operation") == "upload")
        if payload.get("operation") != "upload":
            raise _HttpError(400, "fake hub only supports LFS uploads")
        transfers = payload.get("transfers") or ["basic"]
        chosen = "basic"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if len(oid) != 64 or not isinstance(size, int):
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if oid in hub.lfs_store:
                objects.append({"oid": oid, "size": size})  # already stored: no actions
                continue
            ticket = secrets.token_hex(8)
            with hub._lock:
                hub._tickets[ticket] = oid
            href = f"{hub.url}/_fake_lfs/{oid}?ticket={ticket}"
            upload: dict[str, Any] = {"href": href}
            if size > hub.multipart_threshold and "multipart" in transfers:
                chosen = "multipart"
                n_parts = -(-size // hub.multipart_chunk)
                header = {"chunk_size": str(hub.multipart_chunk)}
                for i in range(1, n_parts + 1):
                    header[f"{i:05d}"] = f"{hub.url}/_fake_lfs/{oid}/part/{i}?ticket={ticket}"
                upload["header"] = header
            verify = {"href": f"{hub.url}/_fake_lfs/verify?ticket={ticket}"}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": verify}})
        self._send(200, {"transfer": chosen, "objects": objects})

    def _lfs_transfer(self, method: str, segs: list[str], query: dict[str, str], body: bytes) -> None:
        """Signed-URL style storage: the ticket from the batch response is the only credential."""
        hub = self.hub
        oid = hub._tickets.get(query.get("ticket", ""))
        if oid is None:
            raise _HttpError(403, "invalid or missing upload ticket")
        if method == "POST" and segs == ["verify"]:
            req = json.loads(body or b"{}")
            stored = hub.lfs_store.get(req.get("oid", ""))
            if req.get("oid") != oid or stored is None or len(stored) != req.get("size"):
                raise _HttpError(404, "object not found")
            hub.count("lfs_verify")
            return self._send(200, {})
        if not segs or segs[0] != oid:
            raise _HttpError(403, "ticket does not match object")
        if method == "PUT" and len(segs) == 1:
            self._store_lfs(oid, body)
            hub.count("lfs_basic")
            return self._send(200, b"")
        if method == "PUT" and len(segs) == 3 and segs[1] == "part":
            with hub._lock:
                hub._parts.setdefault(oid, {})[int(segs[2])] = body
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if method == "POST" and len(segs) == 1:
            req = json.loads(body or b"{}")
            parts = hub._parts.get(oid, {})
            listed = req.get("parts", [])
            if req.get("oid") != oid or [p["partNumber"] for p in listed] != sorted(parts):
                raise _HttpError(400, "multipart completion does not list the uploaded parts")
            for p in listed:
                if p["etag"].strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                    raise _HttpError(400, f"etag mismatch for part {p['partNumber']}")
            self._store_lfs(oid, b"".join(parts[n] for n in sorted(parts)))
            with hub._lock:
                hub._parts.pop(oid, None)
            hub.count("lfs_multipart")
            return self._send(200, {})
        raise _HttpError(404, "unknown LFS transfer request")

    def _store_lfs(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, "uploaded content does not match its sha256 oid")
        with self.hub._lock:
            self.hub.lfs_store[oid] = data

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict[str, str]) -> None:
        hub = self.hub
        repo = self._repo(repo_id, write=True)
        if query.get("create_pr"):
            raise _HttpError(400, "fake hub does not support pull requests")
        self._check_rev(repo, rev)
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.sha:
            raise _HttpError(412, "parent commit is not the head of the branch")
        staged = dict(repo.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, "fake hub expects base64 file content")
                staged[path] = Blob(base64.b64decode(value["content"]), lfs=False)
                hub.count("regular")
            elif key == "lfsFile":
                data = hub.lfs_store.get(value.get("oid", ""))
                if data is None or ("size" in value and value["size"] != len(data)):
                    raise _HttpError(422, f"LFS object for {path} was not uploaded")
                staged[path] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if staged.pop(path, None) is None:
                    raise _HttpError(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for p in [p for p in staged if p.startswith(prefix)]:
                    del staged[p]
            else:
                raise _HttpError(400, f"unknown commit line {key!r}")
        with hub._lock:
            repo.files = staged
            oid = self.hub._add_commit(repo, header.get("summary", ""))
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                         "pullRequestUrl": None})

    def _resolve(self, repo_id: str, rev: str, path: str, *, head: bool) -> None:
        repo = self._repo(repo_id, write=False)
        sha, files = self._snapshot(repo, rev)
        blob = files.get(path)
        if blob is None:
            err = _HttpError(404, "Entry not found", code="EntryNotFound")
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": err.message, "X-Repo-Commit": sha}
            return self._send(404, {"error": err.message}, headers, head=head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(blob.data)}"'}
        if blob.lfs:
            headers["ETag"] = headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        data, status = blob.data, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if not head else None
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        queue = [] if head else self.hub.faults.get(path, [])
        cut = queue.pop(0) if queue else None
        if cut is not None and cut >= 400:
            raise _HttpError(cut, "fake hub: injected failure")
        if cut is not None:  # promise the whole body, send part of it, drop the connection
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        self._send(status, data, headers, head=head)
