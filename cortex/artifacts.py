"""GGUF artifacts: converted with llama.cpp's own `convert_hf_to_gguf.py`, quantized with its
`llama-quantize`, checked with the `gguf` reader, and kept in a content-addressed cache.

An artifact is identified by what it is made from and how: (source id, quantization type,
toolchain version). The source id is the Hub commit sha for a repo, or the sha256 of the
weights for a local folder or file. Preparing the same spec again finds the artifact and
builds nothing.

Layout under `$CORTEX_CACHE/artifacts/`:

    <key>/manifest.json          what, from what, with which toolchain; files with sha256
    <key>/<model>-<QUANT>.gguf   the file(s) an engine loads
    .build-<key>-<pid>/          a build in progress (renamed to <key>/ only when complete
                                 and verified; a crashed build leaves only this, which
                                 `cortex cache prune` removes)

The converter's supported architectures are data (`cortex/data/converter-architectures.json`,
keyed by toolchain version), read from the converter's own `@ModelBase.register(...)` lines, so
an unknown architecture is refused before any download.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.hub import NotEnoughSpace, check_disk_space, record_digest, sha256_of, verified_digest
from cortex.progress import SILENT, Bar, Reporter, step_of
from cortex.settings import cache_root

if TYPE_CHECKING:
    from cortex.facts import ModelFacts
    from cortex.plan import Plan

CONVERTER_TABLE = Path(__file__).parent / "data" / "converter-architectures.json"
CONVERTER_OUTTYPES = ("F32", "F16", "BF16")  # what Cortex asks the converter for; the rest is llama-quantize's job
MANIFEST = "manifest.json"

Log = Callable[[str], None]


class ArtifactError(RuntimeError):
    """Building or checking an artifact failed; the message says what and what to do."""


class UnsupportedArchitecture(ArtifactError):
    """convert_hf_to_gguf.py of this toolchain has no converter for the model's architecture."""


class ToolFailed(ArtifactError):
    """convert_hf_to_gguf.py or llama-quantize exited with an error."""


class VerificationFailed(ArtifactError):
    """A produced GGUF is not what was asked for (architecture, tensors or file type)."""


# --- which architectures the converter knows ------------------------------------------------


def read_converter_architectures(toolchain_root: Path) -> dict[str, str]:
    """HF architecture name -> GGUF architecture, read (without running anything) from the
    converter's `@ModelBase.register(...)` decorators and `model_arch = gguf.MODEL_ARCH.X` lines
    in `convert_hf_to_gguf.py` and its `conversion/` package, and gguf-py's MODEL_ARCH_NAMES.
    Vision projector (mmproj) classes are left out: they do not make a text model."""
    sources = [toolchain_root / "convert_hf_to_gguf.py", *sorted((toolchain_root / "conversion").glob("*.py"))]
    classes: dict[str, tuple[list[str], str | None, list[str]]] = {}
    for src in sources:
        if not src.is_file():
            continue
        for node in ast.walk(ast.parse(src.read_text(), filename=str(src))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            arch = None
            for stmt in node.body:
                if not isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                    continue
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == "model_arch" for t in targets):
                    value = stmt.value
                    if isinstance(value, ast.Attribute):
                        arch = value.attr
            registered = []
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register":
                    registered += [
                        a.value for a in deco.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                    ]
            classes[node.name] = (bases, arch, registered)

    def arch_of(name: str, seen: frozenset[str] = frozenset()) -> str | None:
        if name not in classes or name in seen:
            return None
        bases, arch, _ = classes[name]
        if arch:
            return arch
        for b in bases:
            found = arch_of(b, seen | {name})
            if found:
                return found
        return None

    names = _model_arch_names(toolchain_root / "gguf-py" / "gguf" / "constants.py")
    table: dict[str, str] = {}
    for cls, (_, _, registered) in classes.items():
        arch = arch_of(cls)
        if not registered or arch is None or arch == "MMPROJ":
            continue
        for hf_name in registered:
            table.setdefault(hf_name, names.get(arch, arch.lower()))
    if not table:
        raise ArtifactError(f"found no @ModelBase.register(...) in {toolchain_root}; is this a llama.cpp tree?")
    return dict(sorted(table.items()))


def _model_arch_names(constants: Path) -> dict[str, str]:
    tree = ast.parse(constants.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, (ast.AnnAssign, ast.Assign)):
            continue
        target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
        if isinstance(target, ast.Name) and target.id == "MODEL_ARCH_NAMES" and isinstance(node.value, ast.Dict):
            return {
                k.attr: v.value
                for k, v in zip(node.value.keys, node.value.values)
                if isinstance(k, ast.Attribute) and isinstance(v, ast.Constant) and isinstance(v.value, str)
            }
    return {}


def converter_architectures(toolchain_version: str) -> dict[str, str]:
    """The committed table for `toolchain_version` (HF architecture -> GGUF architecture)."""
    tables = json.loads(CONVERTER_TABLE.read_text()) if CONVERTER_TABLE.is_file() else {}
    if toolchain_version not in tables:
        raise ArtifactError(
            f"no converter architecture table for llama.cpp toolchain {toolchain_version} in "
            f'{CONVERTER_TABLE}; add it with: python -c "from cortex.artifacts import '
            f'write_converter_table; write_converter_table()"'
        )
    return tables[toolchain_version]


def write_converter_table(toolchain=None) -> Path:
    """Read the installed toolchain's converter and store its table under its version."""
    from cortex.toolchain import find_toolchain

    toolchain = toolchain or find_toolchain()
    tables = json.loads(CONVERTER_TABLE.read_text()) if CONVERTER_TABLE.is_file() else {}
    tables[toolchain.version] = read_converter_architectures(toolchain.convert_script.parent)
    CONVERTER_TABLE.write_text(json.dumps(dict(sorted(tables.items())), indent=1) + "\n")
    return CONVERTER_TABLE


def gguf_architecture_for(hf_architectures: Sequence[str], toolchain_version: str) -> str:
    """The GGUF architecture the converter will write for a checkpoint whose config.json lists
    `hf_architectures`; UnsupportedArchitecture (before anything is downloaded) when none is known."""
    table = converter_architectures(toolchain_version)
    for name in hf_architectures:
        if name in table:
            return table[name]
    raise UnsupportedArchitecture(
        f"convert_hf_to_gguf.py of llama.cpp {toolchain_version} cannot convert "
        f"{', '.join(hf_architectures) or 'a config.json without `architectures`'}: it knows "
        f"{len(table)} architectures and this is not one of them. Serve the model with vLLM "
        "(engine: vllm), use a GGUF someone has already converted (source.gguf), or move to a "
        "llama.cpp release that supports it."
    )


# --- keys and manifests ----------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactKey:
    source_id: str  # Hub commit sha, or sha256 of the local weights
    quantization: str  # F16, BF16, Q8_0, Q4_K_M, ...
    toolchain_version: str

    @property
    def digest(self) -> str:
        text = f"{self.source_id}\n{self.quantization.upper()}\n{self.toolchain_version}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # absolute
    bytes: int
    sha256: str


@dataclass(frozen=True)
class GgufSummary:
    architecture: str
    tensor_count: int
    file_type: str  # F16, Q8_0, ... (llama.cpp's LLAMA_FTYPE name)
    parts: int = 1


@dataclass
class Artifact:
    key: ArtifactKey
    folder: Path
    files: list[ArtifactFile]
    gguf: GgufSummary
    source: dict  # provenance: kind, repo, revision, commit or path, and what it was built from
    created_at: float
    build_seconds: float = 0.0
    steps: list[dict] = field(default_factory=list)  # the commands run, with exit codes and seconds

    @property
    def model_file(self) -> Path:
        """The file to hand to llama-server (the first part of a split set)."""
        return Path(self.files[0].path)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def to_json(self) -> dict:
        return {
            "key": {**asdict(self.key), "digest": self.key.digest},
            "folder": str(self.folder),
            "files": [asdict(f) for f in self.files],
            "gguf": asdict(self.gguf),
            "source": self.source,
            "created_at": self.created_at,
            "build_seconds": self.build_seconds,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: dict, folder: Path) -> Artifact:
        key = {k: v for k, v in data["key"].items() if k != "digest"}
        return cls(
            key=ArtifactKey(**key),
            folder=folder,
            # Files sit in the artifact's own folder: re-rooted, so a moved cache still works.
            files=[ArtifactFile(str(folder / Path(f["path"]).name), f["bytes"], f["sha256"]) for f in data["files"]],
            gguf=GgufSummary(**data["gguf"]),
            source=data["source"],
            created_at=data["created_at"],
            build_seconds=data.get("build_seconds", 0.0),
            steps=data.get("steps", []),
        )


def source_origin(provenance: Mapping[str, Any]) -> str:
    """Where a source is, in a word: the repo, the local folder, or the local GGUF file(s)."""
    return provenance.get("repo") or provenance.get("folder") or ", ".join(provenance.get("gguf_files", []))


@dataclass
class Build:
    """An artifact being built (see `ArtifactStore.building`)."""

    key: ArtifactKey
    work: Path
    source: dict
    paths: list[Path] = field(default_factory=list)
    summary: GgufSummary | None = None
    steps: list[dict] = field(default_factory=list)
    digests: dict[Path, str] = field(default_factory=dict)  # sha256s already computed
    artifact: Artifact | None = None


# --- checking a GGUF ---------------------------------------------------------------------------


def file_type_name(file_type: int) -> str:
    from cortex.quant import FILE_TYPE_NAMES

    return FILE_TYPE_NAMES.get(int(file_type), f"file_type {int(file_type)}")


def _reader_class():
    import numpy as np
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """gguf's GGUFReader over a plain ndarray view of its memory map. The stock reader slices a
        np.memmap once per metadata element, and memmap's per-slice bookkeeping makes opening a
        file with a 49k-token vocabulary take seconds; the view reads the same mapped bytes."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def inspect_gguf(path: Path) -> GgufSummary:
    """Architecture, tensor count (all parts of a split set) and file type of a GGUF file."""
    from cortex.hub import gguf_split_parts

    reader = _reader_class()
    parts = [path.with_name(n) for n in gguf_split_parts(path.name)]
    try:
        readers = [reader(p) for p in parts]
    except (OSError, ValueError) as error:
        raise VerificationFailed(f"{path}: the gguf reader cannot open it ({error}); the file is damaged") from error

    def field_value(name: str):
        f = readers[0].fields.get(name)
        return None if f is None else f.contents()

    arch = field_value("general.architecture")
    ftype = field_value("general.file_type")
    if not arch:
        raise VerificationFailed(f"{path}: no general.architecture in the GGUF metadata")
    return GgufSummary(
        architecture=str(arch),
        tensor_count=sum(len(r.tensors) for r in readers),
        file_type=file_type_name(ftype) if ftype is not None else "unknown",
        parts=len(parts),
    )


def verify_gguf(
    path: Path, *, architecture: str | None = None, file_type: str | None = None, tensor_count: int | None = None
) -> GgufSummary:
    """Open `path` with the gguf reader and check what was asked for; VerificationFailed if not."""
    summary = inspect_gguf(path)
    problems = []
    if architecture is not None and summary.architecture != architecture:
        problems.append(f"architecture {summary.architecture!r}, expected {architecture!r}")
    if file_type is not None and summary.file_type != file_type.upper():
        problems.append(f"file type {summary.file_type}, expected {file_type.upper()}")
    if tensor_count is not None and summary.tensor_count != tensor_count:
        problems.append(f"{summary.tensor_count} tensors, expected {tensor_count}")
    if problems:
        raise VerificationFailed(f"{path}: {'; '.join(problems)}")
    return summary


# --- running the tools -----------------------------------------------------------------------


def run_streamed(
    cmd: Sequence[str], log: Log, *, env: dict[str, str] | None = None, what: str, on_line: Log = lambda line: None
) -> dict:
    """Run `cmd`, handing each output line to `log` and `on_line` (progress) as it comes;
    ToolFailed on a non-zero exit. Returns a record of the step (command, exit code, seconds)
    for the manifest."""
    started = time.monotonic()
    tail: list[str] = []
    log(f"$ {' '.join(cmd)}")
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env, bufsize=1
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-20:]
            log(line)
            on_line(line)
        code = proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C, a cancelled flow run): take the tool down with us.
        proc.terminate()
        proc.wait()
        raise
    seconds = time.monotonic() - started
    if code != 0:
        raise ToolFailed(f"{what} failed (exit {code}) after {seconds:.1f} s; its last lines:\n" + "\n".join(tail))
    return {"what": what, "command": list(cmd), "exit_code": code, "seconds": round(seconds, 3)}


# convert_hf_to_gguf.py's output: a line per tensor as it is read, then the gguf writer's
# "<file>: n_tensors = 272, total_size = 269.1M" per output file and its tqdm bar
# "Writing:  21%|██   | 56.6M/269M [...]" (a carriage return apart: text mode splits there).
_CONVERTED_TENSOR = re.compile(r"^INFO:hf-to-gguf:\S+,\s+\S+ --> \S+, shape = ")
_OUTPUT_SIZE = re.compile(r"n_tensors = \d+, total_size = ([\d.]+)([KMGT]?)\b")
_WRITING = re.compile(r"^Writing:\s+\d+%.*?\|\s*([\d.]+)([kKMGT]?)/([\d.]+)([kKMGT]?)\s")
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def converter_progress(bar: Bar) -> Log:
    """An `on_line` for convert_hf_to_gguf.py that moves `bar` (bytes): tensors read, then bytes
    written of the total the writer announces."""
    tensors = [0]

    def on_line(line: str) -> None:
        if _CONVERTED_TENSOR.match(line):
            tensors[0] += 1
            bar.update(bar.done, note=f"{tensors[0]} tensors read")
        elif size := _OUTPUT_SIZE.search(line):
            bar.update(0, total=(bar.total or 0) + float(size[1]) * _SCALE[size[2]])
            bar.phase("writing")
        elif written := _WRITING.match(line):
            bar.update(float(written[1]) * _SCALE[written[2]])

    return on_line


def quantize_progress(bar: Bar) -> Log:
    """An `on_line` for llama-quantize that moves `bar` (tensors) by its "[  17/ 272]" lines."""

    def on_line(line: str) -> None:
        if step := step_of(line):
            bar.update(*step)

    return on_line


def tool_env() -> dict[str, str]:
    """The environment for the converter and llama-quantize: no Hub token (they need none)."""
    drop = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
    return {k: v for k, v in os.environ.items() if k not in drop}


# --- the cache ----------------------------------------------------------------------------------


class ArtifactStore:
    """Content-addressed GGUF artifacts under `root` (default `$CORTEX_CACHE/artifacts`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "artifacts"

    def folder(self, key: ArtifactKey) -> Path:
        return self.root / key.digest

    def get(self, key: ArtifactKey) -> Artifact | None:
        """The finished artifact for `key`, or None. Its files must all be there with the recorded
        sizes and unchanged bytes (the sha256 is re-checked whenever a file was modified)."""
        folder = self.folder(key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return None
        artifact = Artifact.from_json(json.loads(manifest.read_text()), folder)
        for f in artifact.files:
            p = Path(f.path)
            if not p.is_file() or p.stat().st_size != f.bytes or verified_digest(p) != f.sha256:
                raise ArtifactError(
                    f"cached artifact {folder} is damaged ({p.name} is missing or changed); "
                    f"remove it with `cortex cache prune --key {key.digest}` and prepare again"
                )
        os.utime(manifest)  # last used: what `cortex cache prune --unused-for` reads
        return artifact

    @contextmanager
    def building(self, key: ArtifactKey, *, source: dict, needed_bytes: int) -> Iterator["Build"]:
        """A private build folder for `key`. The body writes files into `build.work` and sets
        `build.paths` and `build.summary` (checked); on a clean exit the folder is renamed into
        the cache (`build.artifact`). On any failure it is removed, so the cache never holds a
        partial artifact."""
        self.root.mkdir(parents=True, exist_ok=True)
        check_disk_space(needed_bytes, self.root, what=f"building {key.quantization} GGUF")
        work = self.root / f".build-{key.digest}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        build = Build(key=key, work=work, source=source)
        started = time.monotonic()
        try:
            yield build
            if build.summary is None or not build.paths:
                raise ArtifactError(f"the build of {key.quantization} finished without a checked file")
            final = self.folder(key)
            files = [
                ArtifactFile(str(final / p.name), p.stat().st_size, build.digests.get(p) or verified_digest(p))
                for p in build.paths
            ]
            artifact = Artifact(
                key=key,
                folder=final,
                files=files,
                gguf=build.summary,
                source=build.source,
                created_at=time.time(),
                build_seconds=round(time.monotonic() - started, 3),
                steps=build.steps,
            )
            (work / MANIFEST).write_text(json.dumps(artifact.to_json(), indent=2))
            try:
                os.rename(work, final)
            except OSError:
                if (final / MANIFEST).is_file():  # another run finished the same artifact first
                    shutil.rmtree(work, ignore_errors=True)
                    build.artifact = self.get(key)
                    return
                raise
            for f in files:  # same inodes, same bytes: carry the digests over to the new paths
                record_digest(Path(f.path), f.sha256)
            build.artifact = artifact
        except ToolFailed as error:
            shutil.rmtree(work, ignore_errors=True)
            if "No space left on device" in str(error):
                raise NotEnoughSpace(
                    f"the disk holding {self.root} filled up while building the {key.quantization} GGUF "
                    f"(the partial build was removed); free space or point CORTEX_CACHE at a larger disk"
                ) from error
            raise
        except OSError as error:
            shutil.rmtree(work, ignore_errors=True)
            if error.errno == 28:  # ENOSPC
                raise NotEnoughSpace(
                    f"the disk holding {self.root} filled up while building the {key.quantization} GGUF "
                    f"(the partial build was removed); free space or point CORTEX_CACHE at a larger disk"
                ) from error
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def build(
        self,
        key: ArtifactKey,
        produce: Callable[[Path], tuple[list[Path], GgufSummary, list[dict]]],
        *,
        source: dict,
        needed_bytes: int,
    ) -> Artifact:
        """`produce(workdir)` -> (files written, their checked summary, the steps run), published
        into the cache as one artifact (see `building`)."""
        with self.building(key, source=source, needed_bytes=needed_bytes) as build:
            build.paths, build.summary, build.steps = produce(build.work)
        assert build.artifact is not None
        return build.artifact

    def list(self) -> list[Artifact]:
        found: builtins.list[Artifact] = []
        if not self.root.is_dir():
            return found
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            try:
                found.append(Artifact.from_json(json.loads(manifest.read_text()), manifest.parent))
            except (ValueError, KeyError, TypeError):
                continue  # not ours, or from an incompatible version: prune --broken handles it
        return found

    def last_used(self, artifact: Artifact) -> float:
        return (artifact.folder / MANIFEST).stat().st_mtime

    def stale_builds(self) -> builtins.list[Path]:
        """Build folders whose process is gone (a crash or a kill)."""
        stale = []
        for work in self.root.glob(".build-*") if self.root.is_dir() else []:
            pid = work.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _alive(int(pid)):
                stale.append(work)
        return stale

    def remove(self, artifact: Artifact) -> None:
        trash = artifact.folder.with_name(f".remove-{artifact.folder.name}-{os.getpid()}")
        os.rename(artifact.folder, trash)  # atomic: never a half-removed artifact that looks whole
        shutil.rmtree(trash)

    def prune(
        self,
        *,
        unused_for_s: float | None = None,
        keys: Iterable[str] = (),
        everything: bool = False,
        dry_run: bool = False,
    ) -> tuple[builtins.list[Artifact], builtins.list[Path]]:
        """Remove artifacts unused for `unused_for_s` seconds, those whose digest starts with one
        of `keys`, or all of them; and always the leftovers of dead builds."""
        keys = [k for k in keys if k]
        now = time.time()
        chosen = [
            a
            for a in self.list()
            if everything
            or (unused_for_s is not None and now - self.last_used(a) >= unused_for_s)
            or any(a.key.digest.startswith(k) for k in keys)
        ]
        stale = self.stale_builds() + [p for p in self.root.glob(".remove-*")] if self.root.is_dir() else []
        if not dry_run:
            for a in chosen:
                self.remove(a)
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)
        return chosen, stale


def f16_reference(plan: Plan, source_revision: str, store: ArtifactStore | None = None) -> Artifact | None:
    """The F16 GGUF that `prepare` quantized the plan's llama.cpp artifact from (it keeps it in
    the cache), for comparing the quantized model with. None when the plan has no such
    reference: its GGUF is not converted from an HF checkpoint, or it is F16 itself.
    ArtifactError when it has one but the cache no longer does."""
    from cortex.toolchain import find_toolchain

    quant = plan.artifact.quantization.upper()
    if plan.engine != "llamacpp" or plan.artifact.convert_from != "hf" or quant == "F16":
        return None
    key = ArtifactKey(source_revision, "F16", find_toolchain().version)
    reference = (store or ArtifactStore()).get(key)
    if reference is None:
        raise ArtifactError(
            f"the F16 reference of source {source_revision[:12]} (cache key {key.digest}) is not in the "
            "artifact cache; run `cortex prepare SPEC` again (it keeps the F16 it quantizes from)"
        )
    return reference


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- convert and quantize -------------------------------------------------------------------------


def gguf_build_types(quantization: str) -> list[str]:
    """The GGUF types a build of `quantization` from an HF checkpoint makes, in order: what the
    converter writes (that type for F16/BF16/F32, else F16), then the quantized type."""
    quant = quantization.upper()
    return list(dict.fromkeys([quant if quant in CONVERTER_OUTTYPES else "F16", quant]))


def predict_build_bytes(facts: ModelFacts, quantization: str) -> dict[str, int]:
    """The predicted size of each GGUF file a build of `quantization` makes (see gguf_build_types)."""
    from cortex.quant import predict_gguf_bytes

    return {
        q: predict_gguf_bytes(
            facts.tensors,
            q,
            metadata_bytes=facts.metadata_bytes or 0,
            n_gqa=facts.n_gqa,
            n_expert=max(1, facts.n_experts),
        )
        for q in gguf_build_types(quantization)
    }


def estimate_gguf_bytes(weights_bytes: int, source_dtype_bytes: float, quantization: str) -> int:
    """A conservative size for the disk-space check (the plan's prediction is used when there is one)."""
    from cortex.quant import GGUF_TYPES

    bits = GGUF_TYPES.get(quantization.upper(), (None, 16.0))[1]
    return int(weights_bytes / max(source_dtype_bytes, 0.5) * bits / 8 * 1.05) + (64 << 20)


def convert(
    hf_dir: Path,
    key: ArtifactKey,
    *,
    toolchain,
    model_name: str,
    architecture: str,
    source: dict,
    needed_bytes: int,
    store: ArtifactStore | None = None,
    log: Log = lambda line: None,
    progress: Reporter | None = None,
) -> Artifact:
    """`convert_hf_to_gguf.py hf_dir --outtype f16|bf16|f32` into the cache (or the cached
    artifact), checked to be `architecture` of the asked file type."""
    from cortex.toolchain import converter_command

    store = store or ArtifactStore()
    outtype = key.quantization.upper()
    if outtype not in CONVERTER_OUTTYPES:
        raise ArtifactError(
            f"the converter writes {', '.join(CONVERTER_OUTTYPES)}; quantize to {outtype} "
            "from one of those with llama-quantize"
        )
    found = store.get(key)
    if found is not None:
        return found

    def produce(work: Path):
        out = work / f"{model_name}-{outtype}.gguf"
        # The converter writes the file itself; it lives in the private build folder, which
        # is only renamed into the cache once the file is complete and verified.
        with (progress or SILENT).task(f"convert {model_name} to {outtype}", unit="bytes") as bar:
            step = run_streamed(
                converter_command(hf_dir, out, outtype.lower(), toolchain=toolchain),
                log,
                env=tool_env(),
                what=f"convert_hf_to_gguf.py ({outtype})",
                on_line=converter_progress(bar),
            )
        summary = verify_gguf(out, architecture=architecture, file_type=outtype)
        log(f"verified {out.name}: {summary.architecture}, {summary.tensor_count} tensors, {summary.file_type}")
        return [out], summary, [step]

    return store.build(key, produce, source=source, needed_bytes=needed_bytes)


def quantize(
    base: Artifact,
    key: ArtifactKey,
    *,
    toolchain,
    model_name: str,
    needed_bytes: int,
    threads: int | None = None,
    store: ArtifactStore | None = None,
    log: Log = lambda line: None,
    progress: Reporter | None = None,
) -> Artifact:
    """`llama-quantize base.gguf out.gguf TYPE` into the cache (or the cached artifact), checked
    to have the base's architecture and tensor count and the asked file type."""
    from cortex.toolchain import quantize_command

    store = store or ArtifactStore()
    quant = key.quantization.upper()
    found = store.get(key)
    if found is not None:
        return found

    def produce(work: Path):
        out = work / f"{model_name}-{quant}.gguf"
        with (progress or SILENT).task(
            f"quantize {model_name} {base.key.quantization} -> {quant}", unit="tensors"
        ) as bar:
            step = run_streamed(
                quantize_command(base.model_file, out, quant, toolchain=toolchain, threads=threads),
                log,
                env=tool_env(),
                what=f"llama-quantize ({base.key.quantization} -> {quant})",
                on_line=quantize_progress(bar),
            )
        summary = verify_gguf(
            out, architecture=base.gguf.architecture, file_type=quant, tensor_count=base.gguf.tensor_count
        )
        log(f"verified {out.name}: {summary.architecture}, {summary.tensor_count} tensors, {summary.file_type}")
        return [out], summary, [step]

    source = {
        **base.source,
        "quantized_from": {"key": base.key.digest, "file": base.model_file.name, "sha256": base.files[0].sha256},
    }
    return store.build(key, produce, source=source, needed_bytes=needed_bytes)


def build_gguf(
    hf_dir: Path,
    *,
    source_id: str,
    quantization: str,
    toolchain,
    model_name: str,
    architecture: str,
    source: dict,
    weights_bytes: int,
    predicted_bytes: dict[str, int] | None = None,
    store: ArtifactStore | None = None,
    log: Log = lambda line: None,
    on_step: Callable[[str, Artifact, bool], None] = lambda step, artifact, built: None,
    progress: Reporter | None = None,
) -> list[Artifact]:
    """The GGUF artifacts a plan of `quantization` needs, from the HF checkpoint in `hf_dir`:
    [F16/BF16/F32] when that is the type asked for, else [F16, the quantized type]. Each comes
    from the cache when it is there; `on_step(name, artifact, built_now)` reports each one, and
    `progress` shows the converter's and llama-quantize's way through the tensors."""
    store = store or ArtifactStore()
    quant = quantization.upper()
    base_type = gguf_build_types(quant)[0]
    predicted = {k.upper(): v for k, v in (predicted_bytes or {}).items()}
    done: list[Artifact] = []

    final_key = ArtifactKey(source_id, quant, toolchain.version)
    if quant != base_type:
        cached = store.get(final_key)
        if cached is not None:  # the quantized file is all an engine needs
            on_step(quant, cached, False)
            return [cached]

    base_key = ArtifactKey(source_id, base_type, toolchain.version)
    base_need = predicted.get(base_type) or estimate_gguf_bytes(weights_bytes, 2, base_type)
    if quant != base_type and store.get(base_key) is None:
        need = predicted.get(quant) or estimate_gguf_bytes(weights_bytes, 2, quant)
        base, quantized = _convert_then_quantize(
            hf_dir,
            base_key,
            final_key,
            toolchain=toolchain,
            model_name=model_name,
            architecture=architecture,
            source=source,
            base_need=base_need,
            need=need,
            store=store,
            log=log,
            progress=progress,
        )
        on_step(base_type, base, True)
        on_step(quant, quantized, True)
        return [base, quantized]
    built = store.get(base_key) is None
    base = convert(
        hf_dir,
        base_key,
        toolchain=toolchain,
        model_name=model_name,
        architecture=architecture,
        source=source,
        needed_bytes=base_need,
        store=store,
        log=log,
        progress=progress,
    )
    on_step(base_type, base, built)
    done.append(base)
    if quant == base_type:
        return done
    need = predicted.get(quant) or estimate_gguf_bytes(weights_bytes, 2, quant)
    built = store.get(final_key) is None
    quantized = quantize(
        base,
        final_key,
        toolchain=toolchain,
        model_name=model_name,
        needed_bytes=need,
        store=store,
        log=log,
        progress=progress,
    )
    on_step(quant, quantized, built)
    done.append(quantized)
    return done


def local_hf_files(folder: Path) -> list[Path]:
    """The files of a local HF checkpoint folder whose sha256s make its source id: weights,
    configs, tokenizer and chat template."""
    return [
        p
        for p in folder.iterdir()
        if p.name.endswith((".safetensors", ".json", ".model", ".txt", ".jinja")) and p.is_file()
    ]


def local_source_id(paths: Iterable[Path]) -> str:
    """The id of a local source (a GGUF file or split set, an HF folder's files): the sha256 of
    a single file, else the sha256 over each file's name and sha256, in name order."""
    paths = sorted(Path(p) for p in paths)
    if len(paths) == 1:
        return verified_digest(paths[0])
    listing = "".join(f"{p.name}\0{verified_digest(p)}\n" for p in paths)
    return hashlib.sha256(listing.encode()).hexdigest()


def _convert_then_quantize(
    hf_dir: Path,
    base_key: ArtifactKey,
    final_key: ArtifactKey,
    *,
    toolchain,
    model_name: str,
    architecture: str,
    source: dict,
    base_need: int,
    need: int,
    store: ArtifactStore,
    log: Log,
    progress: Reporter | None = None,
) -> tuple[Artifact, Artifact]:
    """Convert, then quantize while the converted file is being checked (gguf reader, sha256) on
    another thread: llama-quantize only reads it, and nothing is published unless both files
    pass. On a large model this hides minutes of hashing behind the quantization."""
    from cortex.toolchain import converter_command, quantize_command

    base_type, quant = base_key.quantization.upper(), final_key.quantization.upper()
    progress = progress or SILENT
    with store.building(base_key, source=source, needed_bytes=base_need) as base:
        converted = base.work / f"{model_name}-{base_type}.gguf"
        with progress.task(f"convert {model_name} to {base_type}", unit="bytes") as bar:
            base.steps.append(
                run_streamed(
                    converter_command(hf_dir, converted, base_type.lower(), toolchain=toolchain),
                    log,
                    env=tool_env(),
                    what=f"convert_hf_to_gguf.py ({base_type})",
                    on_line=converter_progress(bar),
                )
            )
        with ThreadPoolExecutor(1) as pool:
            checked = pool.submit(
                lambda: (verify_gguf(converted, architecture=architecture, file_type=base_type), sha256_of(converted))
            )
            with store.building(final_key, source=dict(source), needed_bytes=need) as final:
                out = final.work / f"{model_name}-{quant}.gguf"
                with progress.task(f"quantize {model_name} {base_type} -> {quant}", unit="tensors") as bar:
                    final.steps.append(
                        run_streamed(
                            quantize_command(converted, out, quant, toolchain=toolchain),
                            log,
                            env=tool_env(),
                            what=f"llama-quantize ({base_type} -> {quant})",
                            on_line=quantize_progress(bar),
                        )
                    )
                base.summary, base_sha = checked.result()
                log(
                    f"verified {converted.name}: {base.summary.architecture}, {base.summary.tensor_count} tensors, "
                    f"{base.summary.file_type}"
                )
                final.summary = verify_gguf(
                    out, architecture=base.summary.architecture, file_type=quant, tensor_count=base.summary.tensor_count
                )
                log(
                    f"verified {out.name}: {final.summary.architecture}, {final.summary.tensor_count} tensors, "
                    f"{final.summary.file_type}"
                )
                final.paths = [out]
                final.source["quantized_from"] = {"key": base_key.digest, "file": converted.name, "sha256": base_sha}
        base.paths, base.digests = [converted], {converted: base_sha}
    assert base.artifact is not None and final.artifact is not None
    return base.artifact, final.artifact
