"""Model files from the Hugging Face Hub: pinned to a commit, only what is needed, resumable,
and verified against the Hub's own checksums.

The real `huggingface_hub` client does the talking (`HfApi.resolve_revision`, `model_info`,
`get_hf_file_metadata`, `http_get`, `snapshot_download`) and its cache layout
(`$HF_HUB_CACHE/models--owner--name/{blobs,snapshots,refs}`) is where files land, so vLLM and
any other HF tool find them. Cortex adds what the client does not do:

- **resume across processes.** huggingface_hub 1.x/2.x downloads each blob to a
  process-unique temporary file and throws it away when interrupted (huggingface_hub issue
  #4196), so a killed 40 GB transfer starts again from zero. Large (LFS) files are therefore
  fetched here into `blobs/<sha256>.cortex-partial`, continued with an HTTP Range request by
  the client's own `http_get`, and renamed to `blobs/<sha256>` only once the sha256 matches.
  `snapshot_download` then links them into the snapshot and fetches the small files itself.
- **verification.** Every LFS file is checked against the sha256 the Hub lists for it, every
  small file against its git blob id, after each download and whenever the file on disk has
  changed since it was last checked (a stamp records inode, size, mtime and ctime). A mismatch
  is deleted and fetched once more; a second mismatch is an error.
- **disk space** is checked before the first byte moves.
- **offline** (`HF_HUB_OFFLINE=1`): the commit and the file list come from the cache; what is
  missing is named in the error.

The token is a `HubToken`: its repr is masked, it is handed to the client only at the call,
and nothing here logs, records or passes it on a command line.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cortex.fileio import atomic_write_json
from cortex.progress import SILENT, Bar, Reporter
from cortex.settings import cache_root
from cortex.toolchain import install_lock

# Files an HF checkpoint needs to be served by vLLM or converted by convert_hf_to_gguf.py.
HF_CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
# Older checkpoints without safetensors: weights as PyTorch pickles.
HF_PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
# The small files of an HF checkpoint its facts come from: fetched before the weights, so the plan
# (and a converter that does not know the architecture) is settled before the big download.
SMALL_HF_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)

SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")

# --- errors ------------------------------------------------------------------------------


class HubError(RuntimeError):
    """Fetching from the Hub failed; the message says what and what to do."""


class HubUnreachable(HubError):
    """The Hub could not be reached or answered 429/5xx: worth retrying later."""


# What to do when the network, not the Hub, is the problem (a host without DNS or a route out).
OFFLINE_HINT = "if the model is already in the cache, set HF_HUB_OFFLINE=1 to use it without the Hub"


class NotEnoughSpace(HubError):
    """Not enough free disk space for what is about to be written."""


class ChecksumMismatch(HubError):
    """A file's bytes do not match the checksum the Hub lists for it."""


class OfflineCacheMiss(HubError):
    """Offline mode is on and the cache does not hold what is needed."""


# --- the token ---------------------------------------------------------------------------


class HubToken:
    """An HF access token. It prints as `HubToken(****)`; `reveal()` is for the client call only."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        if not value:
            raise ValueError("an empty token")
        self._value = value
        self.origin = origin  # where it came from, e.g. "HF_TOKEN" (safe to show)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"HubToken(****, from {self.origin})"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a result store or a subprocess by accident
        raise TypeError("a HubToken is not serialisable")


def token_from_env() -> HubToken | None:
    """`HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else None."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return HubToken(value, name)
    return None


def _client_token(token: HubToken | None) -> str | bool:
    # False: never let the client pick up some other token on its own.
    return token.reveal() if token is not None else False


# --- settings read at call time (the client reads them once, at import) -------------------


def hub_cache_dir() -> Path:
    """The huggingface_hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str | None:
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def is_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit, as the Hub lists it."""

    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git object id (of the LFS pointer, for LFS files)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class RepoSnapshot:
    """The selected files of `repo` at `commit`, on disk under `folder` and verified."""

    repo: str
    revision: str
    commit: str
    folder: Path
    files: tuple[RemoteFile, ...]
    downloaded_bytes: int = 0  # moved over the network by this call
    resumed_bytes: int = 0  # already on disk from an interrupted transfer
    refetched: tuple[str, ...] = ()  # files that failed verification and were fetched again

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# --- choosing files (pure) ----------------------------------------------------------------


def gguf_split_parts(name: str) -> list[str]:
    """`x-00001-of-00003.gguf` -> the three part names; any other name -> [name]."""
    m = SPLIT_GGUF.match(name)
    if not m:
        return [name]
    count = int(m["count"])
    if int(m["part"]) != 1:
        raise HubError(
            f"{name} is part {int(m['part'])} of a split GGUF; name the first part "
            f"({m['stem']}-00001-of-{m['count']}.gguf)"
        )
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def local_gguf_parts(first: Path) -> list[Path]:
    """A local GGUF file, or every part of the split set whose first part is `first`; each must exist."""
    parts = [first.with_name(n) for n in gguf_split_parts(first.name)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise HubError(f"GGUF file(s) not found: {', '.join(missing)}")
    return parts


def small_hf_files(repo: str, commit: str, files: Iterable[RemoteFile]) -> list[str]:
    """The files of SMALL_HF_FILES that `repo@commit` has; config.json must be one of them."""
    listed = {f.path for f in files}
    small = [n for n in SMALL_HF_FILES if n in listed]
    if "config.json" not in small:
        raise HubError(
            f"{repo}@{commit[:12]} has no config.json: not an HF checkpoint (for a GGUF repo, set source.gguf)"
        )
    return small


def needed_files(
    files: Iterable[RemoteFile],
    *,
    gguf: str | None = None,
    include: Iterable[str] | None = None,
) -> list[RemoteFile]:
    """The files to fetch: the GGUF file (or split set) `gguf`; else the files matching
    `include`; else an HF checkpoint's weights, config and tokenizer (safetensors preferred,
    PyTorch .bin only when a repo has no safetensors)."""
    files = list(files)
    by_path = {f.path: f for f in files}
    if gguf is not None:
        parts = gguf_split_parts(gguf)
        missing = [p for p in parts if p not in by_path]
        if missing:
            ggufs = sorted(p for p in by_path if p.endswith(".gguf"))
            raise HubError(f"the repo has no {', '.join(missing)}; GGUF files in it: {', '.join(ggufs) or 'none'}")
        return [by_path[p] for p in parts]
    if include is not None:
        patterns = list(include)
        chosen = [f for f in files if any(fnmatch.fnmatchcase(f.path, p) for p in patterns)]
        if not chosen:
            raise HubError(f"no file in the repo matches include={patterns}")
        return chosen
    patterns = list(HF_CHECKPOINT_PATTERNS)
    if not any(f.path.endswith(".safetensors") for f in files):
        patterns += HF_PICKLE_PATTERNS
    chosen = [
        f
        for f in files
        if any(fnmatch.fnmatchcase(f.path.rsplit("/", 1)[-1], p) for p in patterns) and "/" not in f.path
    ]
    if not any(f.path == "config.json" for f in chosen):
        raise HubError(
            "the repo has no config.json at its root, so it is not an HF checkpoint; "
            "for a GGUF repo set `source.gguf` to the file to use"
        )
    if not any(f.path.endswith((".safetensors", ".bin")) for f in chosen):
        raise HubError("the repo has no weights (*.safetensors or pytorch_model*.bin) at its root")
    return chosen


# --- disk space ---------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(needed_bytes: int, where: Path, *, what: str) -> None:
    """NotEnoughSpace unless `where` (or its nearest existing parent) has `needed_bytes` free."""
    if needed_bytes <= 0:
        return
    anchor = _existing_ancestor(where)
    free = shutil.disk_usage(anchor).free
    if free < needed_bytes:
        raise NotEnoughSpace(
            f"{what} needs {_gb(needed_bytes)} free in {where} but only {_gb(free)} is free there "
            f"(filesystem of {anchor}); free {_gb(needed_bytes - free)} or point "
            f"{'HF_HUB_CACHE' if 'download' in what else 'CORTEX_CACHE'} at a larger disk"
        )


def check_space_for(needs: Iterable[tuple[Path, int, str]]) -> None:
    """Check several writes at once: (where, bytes, what) summed per filesystem, so a download
    and the conversion after it that share a disk are checked together, before either starts."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for where, size, what in needs:
        if size > 0:
            by_device.setdefault(os.stat(_existing_ancestor(where)).st_dev, []).append((where, size, what))
    for items in by_device.values():
        total = sum(size for _, size, _ in items)
        what = " and ".join(f"{w} ({_gb(size)} in {where})" for where, size, w in items)
        check_disk_space(total, items[0][0], what=what)


def bytes_to_fetch(repo: str, commit: str, files: Iterable[RemoteFile]) -> int:
    """How many bytes fetching `files` would still write to the HF cache (a cheap presence check)."""
    storage = _storage_folder(repo)
    total = 0
    for f in files:
        if (storage / "snapshots" / commit / f.path).exists() or (f.sha256 and (storage / "blobs" / f.sha256).exists()):
            continue
        partial = storage / "blobs" / f"{f.sha256}.cortex-partial"
        total += f.size - (partial.stat().st_size if f.sha256 and partial.exists() else 0)
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n} bytes)" if n >= 1e7 else f"{n} bytes"


# --- checksums ----------------------------------------------------------------------------


def sha256_of(path: Path, *, block: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_id_of(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def verified_digest(path: Path, kind: str = "sha256") -> str:
    """The sha256 (or git blob id) of `path`, computed once and then remembered for as long as
    the file is unchanged (same inode, size, mtime and ctime; any write changes the ctime)."""
    real = path.resolve()
    key = hashlib.sha256(f"{kind}:{real}".encode()).hexdigest()
    stamp = cache_root() / "verified" / "by-path" / f"{key}.json"
    ident = _file_identity(real)
    try:
        record = json.loads(stamp.read_text())
    except FileNotFoundError:
        record = None  # never verified on this machine
    except (OSError, ValueError):
        record = None  # unreadable or torn: the file is hashed again and the stamp rewritten below
    if isinstance(record, dict) and record.get("identity") == ident and isinstance(record.get("digest"), str):
        return record["digest"]
    digest = sha256_of(real) if kind == "sha256" else git_blob_id_of(real)
    atomic_write_json(stamp, {"path": str(real), "identity": ident, "kind": kind, "digest": digest}, sort_keys=True)
    return digest


def record_digest(path: Path, digest: str, kind: str = "sha256") -> None:
    """Remember a digest just computed for `path` (e.g. before an atomic rename moved it here)."""
    real = path.resolve()
    key = hashlib.sha256(f"{kind}:{real}".encode()).hexdigest()
    stamp = cache_root() / "verified" / "by-path" / f"{key}.json"
    atomic_write_json(
        stamp, {"path": str(real), "identity": _file_identity(real), "kind": kind, "digest": digest}, sort_keys=True
    )


def _forget_digest(path: Path) -> None:
    real = path.resolve()
    for kind in ("sha256", "git"):
        key = hashlib.sha256(f"{kind}:{real}".encode()).hexdigest()
        (cache_root() / "verified" / "by-path" / f"{key}.json").unlink(missing_ok=True)


def _matches(path: Path, f: RemoteFile) -> bool:
    if not path.is_file() or path.stat().st_size != f.size:
        return False
    if f.sha256 is not None:
        return verified_digest(path, "sha256") == f.sha256
    if f.blob_id is not None:
        return verified_digest(path, "git") == f.blob_id
    return True


# --- talking to the Hub -------------------------------------------------------------------


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), library_name="cortex")


def _storage_folder(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def _translate(error: BaseException, repo: str, revision: str) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    where = hub_endpoint() or "https://huggingface.co"
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo} has no revision {revision!r} on {where}; check `source.revision`")
    if isinstance(error, GatedRepoError):
        return HubError(
            f"{repo} is gated: accept its terms on the Hub with the account whose token "
            "Cortex uses (HF_TOKEN or the Prefect Secret block)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubError(
            f"{repo} was not found on {where}, or it is private and no valid token was given; "
            "set HF_TOKEN or store the token in the Prefect Secret block"
        )
    if isinstance(error, RevisionResolutionError) and not is_offline() and error.__cause__ is not None:
        return _translate(error.__cause__, repo, revision)  # the Hub is down and nothing is cached
    if isinstance(error, (RevisionResolutionError, OfflineModeIsEnabled)):
        return OfflineCacheMiss(
            f"cannot resolve {repo}@{revision}: offline mode is on (HF_HUB_OFFLINE) and the cache "
            f"({hub_cache_dir()}) has never seen that revision; run once with network access, "
            "or pin `source.revision` to a commit sha that is cached"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        kind = HubUnreachable if status == 429 or status >= 500 else HubError
        return kind(f"the Hub answered {status} for {repo}@{revision}: {error}")
    if isinstance(error, OSError) and error.errno == 28:
        return NotEnoughSpace(
            f"the disk holding {hub_cache_dir()} filled up while fetching {repo}@{revision}; "
            "free space or point HF_HUB_CACHE at a larger disk"
        )
    if isinstance(error, OSError) and not isinstance(error, _transport_errors()):
        return HubError(f"{repo}@{revision}: {type(error).__name__}: {error}")
    return HubUnreachable(
        f"could not reach {where} for {repo}@{revision}: {type(error).__name__}: {error}; {OFFLINE_HINT}"
    )


def _transport_errors() -> type[Exception]:
    import httpx2  # huggingface_hub's HTTP client

    return httpx2.TransportError


def resolve_revision(repo: str, revision: str = "main", *, token: HubToken | None = None) -> str:
    """The commit sha `revision` (branch, tag or sha) of `repo` points at now (offline: the
    commit the cache last saw for it)."""
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    try:
        resolved = _api().resolve_revision(
            repo,
            revision=revision,
            cache_dir=hub_cache_dir(),
            local_files_only=is_offline(),
            token=_client_token(token),
        )
    except (HfHubHTTPError, RevisionResolutionError, OSError, _transport_errors()) as error:
        raise _translate(error, repo, revision) from error
    return str(resolved.resolved)


def remote_config(repo: str, revision: str, *, token: HubToken | None = None) -> tuple[Path, int | None, list[str]]:
    """What planning needs of an HF repo without its weights: config.json (downloaded into the
    cache; the caller reads and checks it), and the parameter count and weight files from the
    safetensors headers (ranged reads)."""
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline():
        raise OfflineCacheMiss(
            f"{repo}@{revision}: config.json is not in the Hub cache and offline mode is on "
            "(HF_HUB_OFFLINE); download it once with network access (cortex prepare) or turn offline mode off"
        )
    api = _api()
    try:
        path = Path(
            api.hf_hub_download(
                repo, "config.json", revision=revision, cache_dir=hub_cache_dir(), token=_client_token(token)
            )
        )
        meta = api.get_safetensors_metadata(repo, revision=revision, token=_client_token(token))
    except (HfHubHTTPError, OSError, _transport_errors()) as error:
        raise _translate(error, repo, revision) from error
    params = sum(meta.parameter_count.values()) if meta.parameter_count else None
    return path, params, sorted(meta.files_metadata)


def read_range(repo: str, filename: str, revision: str, size: int, *, token: HubToken | None = None) -> bytes:
    """The first `size` bytes of a file in a Hub repo (one HTTP range request), e.g. a GGUF's header."""
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if is_offline():
        raise OfflineCacheMiss(f"{repo}/{filename}@{revision}: not cached and offline mode is on (HF_HUB_OFFLINE)")
    url = hf_hub_url(repo, filename, revision=revision, endpoint=hub_endpoint())
    headers = build_hf_headers(token=_client_token(token), library_name="cortex")
    headers["Range"] = f"bytes=0-{size - 1}"
    try:
        with httpx.Client(follow_redirects=True, timeout=60) as client:
            r = client.get(url, headers=headers)
    except httpx.HTTPError as error:
        raise HubUnreachable(
            f"could not reach {hub_endpoint() or 'https://huggingface.co'} for "
            f"{repo}/{filename}@{revision}: {type(error).__name__}: {error}; {OFFLINE_HINT}"
        ) from None
    if r.status_code >= 400:
        kind = HubUnreachable if r.status_code == 429 or r.status_code >= 500 else HubError
        raise kind(f"the Hub answered {r.status_code} for {repo}/{filename}@{revision}")
    return r.content


def _manifest_path(repo: str, commit: str) -> Path:
    return cache_root() / "hub" / repo.replace("/", "--") / f"{commit}.json"


def list_files(repo: str, commit: str, *, token: HubToken | None = None) -> list[RemoteFile]:
    """Every file of `repo` at `commit` with size, sha256 (LFS) and git blob id. A commit never
    changes, so the listing is kept in Cortex's cache and read from there next time (and offline)."""
    manifest = _manifest_path(repo, commit)
    if manifest.is_file():
        return [RemoteFile(**f) for f in json.loads(manifest.read_text())["files"]]
    if is_offline():
        raise OfflineCacheMiss(
            f"offline mode is on (HF_HUB_OFFLINE) and Cortex has no file list for {repo}@{commit[:12]} "
            f"(looked for {manifest}); run `cortex prepare` once with network access"
        )
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = _api().model_info(repo, revision=commit, files_metadata=True, token=_client_token(token))
    except (HfHubHTTPError, OSError, _transport_errors()) as error:
        raise _translate(error, repo, commit) from error
    files = [
        RemoteFile(
            path=s.rfilename,
            size=int(s.lfs.size if s.lfs else (s.size or 0)),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or []
    ]
    atomic_write_json(
        manifest,
        {"repo": repo, "commit": commit, "listed_at": time.time(), "files": [asdict(f) for f in files]},
        sort_keys=True,
    )
    return files


def _tqdm_into(bar: Bar | None, *, only: str | None = None):
    """A tqdm class for the client that shows nothing itself and moves `bar` instead (the
    client's own bars are off: progress goes through Cortex's reporter). With `only`, just the
    client's bar of that name counts (snapshot_download also makes bars of files and of bytes
    received; its bar "huggingface_hub.snapshot_download" counts bytes written)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Into(hf_tqdm):
        def __init__(self, *args, **kwargs):
            # (`initial`, bytes already on disk, is the bar's own `initial`)
            self._counts = bar is not None and (only is None or kwargs.get("name") == only)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._counts and n:
                bar.advance(int(n))  # type: ignore[union-attr]
            return super().update(n)

    return Into


def _fetch_lfs_blob(
    repo: str, commit: str, f: RemoteFile, blob: Path, token: HubToken | None, progress: Reporter
) -> tuple[int, int]:
    """Fetch one LFS file into `blob` (= blobs/<sha256>), continuing a partial transfer left by
    an interrupted run. Returns (bytes downloaded now, bytes resumed from disk)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, f.path, revision=commit, endpoint=hub_endpoint())
    try:
        meta = get_hf_file_metadata(url, token=_client_token(token), endpoint=hub_endpoint(), retry_on_errors=True)
    except (HfHubHTTPError, OSError, _transport_errors()) as error:
        raise _translate(error, repo, commit) from error
    if meta.etag != f.sha256:
        raise ChecksumMismatch(
            f"{repo}@{commit[:12]}/{f.path}: the Hub lists sha256 {f.sha256} but serves "
            f"etag {meta.etag}; the listing is stale: remove {_manifest_path(repo, commit)}"
        )
    headers = build_hf_headers(token=_client_token(token), library_name="cortex")
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN link: the token stays with the Hub
    partial = blob.with_name(blob.name + ".cortex-partial")
    blob.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    try:
        with (
            open(partial, "ab") as out,
            progress.task(f"download {f.path}", total=f.size, unit="bytes", initial=have) as bar,
        ):
            http_get(
                location,
                out,
                resume_size=have,
                headers=headers,
                expected_size=f.size,
                displayed_filename=f.path,
                tqdm_class=_tqdm_into(bar),
            )
    except (HfHubHTTPError, _transport_errors()) as error:
        # The partial file stays: the next attempt continues from where this one stopped.
        raise _translate(error, repo, commit) from error
    got = sha256_of(partial)
    if got != f.sha256:
        partial.unlink()
        raise ChecksumMismatch(
            f"{repo}@{commit[:12]}/{f.path}: downloaded bytes have sha256 {got}, the Hub lists {f.sha256}"
        )
    os.chmod(partial, 0o644)
    os.replace(partial, blob)
    return f.size - have, have


def _snapshot_download(
    repo: str,
    commit: str,
    names: list[str],
    token: HubToken | None,
    *,
    small: Sequence[RemoteFile] = (),
    progress: Reporter = SILENT,
) -> Path:
    """The client's snapshot_download of `names` (the LFS blobs are already in place, so what
    moves is the `small` files)."""
    from contextlib import nullcontext

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    label = small[0].path if len(small) == 1 else f"{len(small)} small files of {repo}"
    try:
        with (
            progress.task(f"download {label}", total=sum(f.size for f in small), unit="bytes")
            if small
            else nullcontext()
        ) as bar:
            folder = snapshot_download(
                repo,
                revision=commit,
                cache_dir=hub_cache_dir(),
                endpoint=hub_endpoint(),
                allow_patterns=[glob.escape(n) for n in names],
                token=_client_token(token),
                local_files_only=is_offline(),
                max_workers=4,
                library_name="cortex",
                tqdm_class=_tqdm_into(bar, only="huggingface_hub.snapshot_download"),
            )
    except LocalEntryNotFoundError as error:
        raise OfflineCacheMiss(
            f"offline mode is on (HF_HUB_OFFLINE) and the cache ({hub_cache_dir()}) lacks files of "
            f"{repo}@{commit[:12]}; run `cortex prepare` once with network access"
        ) from error
    except (HfHubHTTPError, OSError, _transport_errors()) as error:
        raise _translate(error, repo, commit) from error
    return Path(folder)


def _drop(snapshot_file: Path) -> None:
    """Remove a bad file from the cache: the snapshot link and the blob it points at."""
    target = snapshot_file.resolve()
    _forget_digest(snapshot_file)
    snapshot_file.unlink(missing_ok=True)
    if target != snapshot_file.absolute():
        target.unlink(missing_ok=True)


def fetch(
    repo: str,
    revision: str = "main",
    *,
    gguf: str | None = None,
    include: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    token: HubToken | None = None,
    progress: Reporter | None = None,
) -> RepoSnapshot:
    """Fetch what is needed of `repo@revision` into the HF cache and verify it.

    What is needed: `only` (exact file names, e.g. ["config.json"]); else the GGUF file or split
    set `gguf`; else the files matching `include`; else the HF checkpoint files (weights,
    config, tokenizer). Files already in the cache and unchanged since they were verified are
    neither fetched nor hashed again. `progress` gets one bar per large file (bytes, rate, ETA)
    and one for the small files together.
    """
    progress = progress or SILENT
    commit = resolve_revision(repo, revision, token=token)
    remote = list_files(repo, commit, token=token)
    if only is not None:
        by_path = {f.path: f for f in remote}
        names = list(only)
        absent = [n for n in names if n not in by_path]
        if absent:
            raise HubError(f"{repo}@{commit[:12]} has no {', '.join(absent)}")
        wanted = [by_path[n] for n in names]
    else:
        wanted = needed_files(remote, gguf=gguf, include=include)

    storage = _storage_folder(repo)
    folder = storage / "snapshots" / commit
    downloaded = resumed = 0
    refetched: list[str] = []
    with install_lock(f"hub-{repo}"):  # two prepares of one repo never write the same partial file
        for attempt in (1, 2):
            present = [f for f in wanted if (folder / f.path).exists() and _matches(folder / f.path, f)]
            bad = [f for f in wanted if (folder / f.path).exists() and f not in present]
            for f in bad:
                _drop(folder / f.path)
                refetched.append(f.path)
            missing = [f for f in wanted if f not in present]
            if not missing:
                break
            if attempt == 2:
                raise ChecksumMismatch(
                    f"{repo}@{commit[:12]}: {', '.join(f.path for f in missing)} failed verification twice "
                    "(sha256 or git blob id differs from the Hub's listing); the mirror or the disk is "
                    "corrupting data"
                )
            if is_offline():
                raise OfflineCacheMiss(
                    f"offline mode is on (HF_HUB_OFFLINE) and the cache ({hub_cache_dir()}) lacks "
                    f"{', '.join(f.path for f in missing)} of {repo}@{commit[:12]}; "
                    "run `cortex prepare` once with network access"
                )
            need = 0
            for f in missing:
                partial = storage / "blobs" / f"{f.sha256}.cortex-partial"
                on_disk = (storage / "blobs" / f.sha256).exists() if f.sha256 else False
                if not on_disk:
                    need += f.size - (partial.stat().st_size if f.sha256 and partial.exists() else 0)
            check_disk_space(need, storage, what=f"downloading {len(missing)} file(s) of {repo}")
            for f in missing:
                if f.sha256 is None:
                    continue
                blob = storage / "blobs" / f.sha256
                if blob.exists() and not _matches(blob, f):
                    _drop(blob)
                if not blob.exists():
                    try:
                        got, had = _fetch_lfs_blob(repo, commit, f, blob, token, progress)
                    except ChecksumMismatch:
                        refetched.append(f.path)
                        got, had = _fetch_lfs_blob(repo, commit, f, blob, token, progress)
                    downloaded += got
                    resumed += had
            small = [f for f in missing if f.sha256 is None]
            _snapshot_download(repo, commit, [f.path for f in missing], token, small=small, progress=progress)
            downloaded += sum(f.size for f in small)
    return RepoSnapshot(
        repo=repo,
        revision=revision,
        commit=commit,
        folder=folder,
        files=tuple(wanted),
        downloaded_bytes=downloaded,
        resumed_bytes=resumed,
        refetched=tuple(refetched),
    )
