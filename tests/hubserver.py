"""A small Hugging Face Hub-compatible endpoint for tests (point `HF_ENDPOINT` at it).

It serves what the installed `huggingface_hub` client asks for, and only that:

- `GET /api/models/{repo}/revision/{rev}` (`HfApi.model_info` / `repo_info` /
  `resolve_revision`): `sha` and `siblings`, with `size`, `blobId` and `lfs.sha256` when
  `?blobs=True` (what `files_metadata=True` sends);
- `GET /api/models/{repo}/tree/{rev}` (`HfApi.list_repo_tree`, used by `snapshot_download`);
- `HEAD|GET /{repo}/resolve/{rev}/{path}` (`get_hf_file_metadata`, `http_get`): `X-Repo-Commit`,
  `ETag` (the git blob id, or the sha256 for LFS files, as the Hub does), `X-Linked-Etag` and
  `X-Linked-Size` for LFS files, and `Range: bytes=N-` (206) for resumed transfers;
- errors with the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).

Test knobs: a required bearer token (401 without it), a throttle (bytes per second) so a test
can kill a transfer midway, a one-shot byte flip in the next GET of a file, and failing the
next N requests with a 5xx. Every request
is recorded (method, path, Range, whether it carried the right token), never the token itself.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub's default .gitattributes stores in LFS, plus anything over 10 MB.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".h5", ".onnx", ".model", ".msgpack")
LFS_MIN_BYTES = 10 * 1024 * 1024
CHUNK = 64 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str  # path inside the repo
    source: Path  # the bytes on disk
    size: int
    blob_id: str  # git object id (of the LFS pointer for LFS files, as on the Hub)
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


def _hub_file(path: str, source: Path) -> HubFile:
    size = source.stat().st_size
    if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES:
        sha = sha256_file(source)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        return HubFile(path, source, size, git_blob_id(pointer), sha)
    return HubFile(path, source, size, git_blob_id(source.read_bytes()), None)


@dataclass
class HubRepo:
    """A model repo: commits (sha -> files) and refs (branch or tag -> sha)."""

    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, Path], branch: str = "main") -> str:
        """Record a commit holding `files` (repo path -> file on disk); move `branch` to it."""
        entries = {p: _hub_file(p, Path(src)) for p, src in sorted(files.items())}
        parent = self.refs.get(branch, "")
        listing = parent + "".join(f"{e.path}\0{e.blob_id}\n" for e in entries.values())
        sha = hashlib.sha1(listing.encode()).hexdigest()
        self.commits[sha] = entries
        self.refs[branch] = sha
        return sha

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, branch: str = "main") -> "HubRepo":
        repo = cls(repo_id)
        files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
        files = {k: v for k, v in files.items() if not k.startswith(".")}
        repo.commit(files, branch)
        return repo

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    status: int = 0
    bytes_sent: int = 0


class HubServer:
    """Run with `with HubServer([repo], token=...) as hub:`; `hub.url` is the endpoint."""

    def __init__(
        self,
        repos: list[HubRepo],
        *,
        token: str | None = None,
        throttle_bytes_per_s: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.token = token
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.requests: list[Request] = []
        self._flip_next: set[str] = set()
        self._fail_next: list[int] = []  # statuses for the next requests (a Hub having a bad minute)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def flip_byte_in_next_get(self, path_in_repo: str) -> None:
        """The next GET of `path_in_repo` sends one flipped byte (in the middle of the file)."""
        with self._lock:
            self._flip_next.add(path_in_repo)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (and no body worth reading)."""
        with self._lock:
            self._fail_next += [status] * count

    def _take_failure(self) -> int | None:
        with self._lock:
            return self._fail_next.pop(0) if self._fail_next else None

    def _take_flip(self, path_in_repo: str) -> bool:
        with self._lock:
            if path_in_repo in self._flip_next:
                self._flip_next.discard(path_in_repo)
                return True
            return False

    def gets_of(self, path_in_repo: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + path_in_repo)]

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        # --- plumbing -------------------------------------------------------------

        def _record(self) -> Request:
            auth = self.headers.get("Authorization")
            req = Request(
                self.command,
                urlsplit(self.path).path,
                self.headers.get("Range"),
                authorized=hub.token is not None and auth == f"Bearer {hub.token}",
            )
            with hub._lock:
                hub.requests.append(req)
            return req

        def _send(self, req: Request, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            req.status = status
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
                req.bytes_sent += len(body)

        def _json(self, req: Request, payload: object, headers: dict[str, str] | None = None) -> None:
            self._send(req, 200, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, req: Request, status: int, code: str | None, message: str, sha: str | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if sha:
                headers["X-Repo-Commit"] = sha
            self._send(req, status, json.dumps({"error": message}).encode(), headers)

        def _split_repo(self, rest: str) -> tuple[HubRepo | None, str]:
            parts = rest.split("/", 2)
            if len(parts) < 2:
                return None, ""
            repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
            return repo, parts[2] if len(parts) > 2 else ""

        # --- routes ---------------------------------------------------------------

        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def _route(self) -> None:
            req = self._record()
            failure = hub._take_failure()
            if failure is not None:
                self._error(req, failure, None, "the Hub is having a bad minute")
                return
            if hub.token is not None and not req.authorized:
                self._error(req, 401, "RepoNotFound", "Invalid credentials in Authorization header")
                return
            url = urlsplit(self.path)
            path = url.path
            query = parse_qs(url.query)
            if path.startswith("/api/models/"):
                self._api(req, path[len("/api/models/") :], query)
            else:
                self._resolve(req, path.lstrip("/"))

        def _api(self, req: Request, rest: str, query: dict[str, list[str]]) -> None:
            repo, tail = self._split_repo(rest)
            if repo is None:
                self._error(req, 404, "RepoNotFound", "Repository not found")
                return
            kind, _, revision = tail.partition("/")
            revision = unquote(revision) or "main"
            if kind not in ("revision", "tree"):
                self._error(req, 404, None, f"unknown API route {tail!r}")
                return
            sha = repo.resolve(revision)
            if sha is None:
                self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            files = repo.commits[sha]
            if kind == "tree":
                self._json(
                    req,
                    [
                        {
                            "type": "file",
                            "oid": f.blob_id,
                            "size": f.size,
                            "path": f.path,
                            **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} if f.sha256 else {}),
                        }
                        for f in files.values()
                    ],
                )
                return
            with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in files.values():
                entry: dict[str, object] = {"rfilename": f.path}
                if with_blobs:
                    entry.update(size=f.size, blobId=f.blob_id)
                    if f.sha256:
                        entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
                siblings.append(entry)
            self._json(
                req,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": sha,
                    "private": hub.token is not None,
                    "siblings": siblings,
                },
            )

        def _resolve(self, req: Request, rest: str) -> None:
            repo, tail = self._split_repo(rest)
            if repo is None:
                self._error(req, 404, "RepoNotFound", "Repository not found")
                return
            marker, _, tail = tail.partition("/")
            revision, _, file_path = tail.partition("/")
            revision, file_path = unquote(revision), unquote(file_path)
            sha = repo.resolve(revision) if marker == "resolve" else None
            if sha is None:
                self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            entry = repo.commits[sha].get(file_path)
            if entry is None:
                self._error(req, 404, "EntryNotFound", f"{file_path} does not exist", sha=sha)
                return
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{entry.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if entry.sha256:
                headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
            start, end = 0, entry.size - 1
            if req.range and self.command == "GET":
                spec = req.range.removeprefix("bytes=")
                first, _, last = spec.partition("-")
                start = int(first or 0)
                if last:  # a closed range (bytes=N-M), as a GGUF header read asks
                    end = min(int(last), entry.size - 1)
                if start >= entry.size:
                    self._send(req, 416, b"", {**headers, "Content-Range": f"bytes */{entry.size}"})
                    return
            length = end - start + 1
            status = 206 if req.range and self.command == "GET" else 200
            req.status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command == "HEAD":
                return
            flip_at = entry.size // 2 if hub._take_flip(file_path) else -1
            try:
                self._stream(req, entry.source, start, flip_at, length)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a killed download): that is the point of some tests

        def _stream(self, req: Request, source: Path, start: int, flip_at: int, length: int) -> None:
            with open(source, "rb") as f:
                f.seek(start)
                offset = start
                stop = start + length
                while offset < stop and (block := f.read(min(CHUNK, stop - offset))):
                    if offset <= flip_at < offset + len(block):
                        b = bytearray(block)
                        b[flip_at - offset] ^= 0xFF
                        block = bytes(b)
                    self.wfile.write(block)
                    offset += len(block)
                    req.bytes_sent += len(block)
                    if hub.throttle_bytes_per_s:
                        time.sleep(len(block) / hub.throttle_bytes_per_s)

    return Handler


def main() -> None:
    """`python tests/hubserver.py REPO_ID FOLDER [--port N] [--token-env VAR] [--throttle BPS]`:
    serve one folder as a repo (for a person poking at the client by hand)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("repo_id")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-env", help="require the token held in this environment variable")
    parser.add_argument("--throttle", type=int, help="bytes per second per transfer")
    args = parser.parse_args()
    token = os.environ[args.token_env] if args.token_env else None
    hub = HubServer(
        [HubRepo.from_folder(args.repo_id, args.folder)],
        token=token,
        throttle_bytes_per_s=args.throttle,
        port=args.port,
    )
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    hub._httpd.serve_forever()


if __name__ == "__main__":
    main()
