"""The gateway's hot path compiled to C with mypyc, and how a gateway process picks it up.

Why (issue 14): at c=64 the gateway's own Python code, not the kernel, was what kept one worker
under half of nginx's throughput; the syscalls per request were already nginx's (two reads, two
writes). mypyc compiles the modules of the request path (MODULES) from the same typed source:
attribute access on the gateway's classes and calls between them become C, with no change of
behaviour. The source stays the truth: unit tests import it as it is, and a process without a
build runs it interpreted.

A build is keyed by the sources of MODULES and the interpreter's ABI, and lives under
`$CORTEX_CACHE/gateway-build/<key>/`: editing any compiled module makes the old build unusable
(a new key), so a stale binary can never run in place of the source. `./dev` builds it once
per source (`python -m cortex.gateway.compiled build`, about two minutes on two cores, mypy's
mypyc from the test extra); `install()`, called by `cortex gateway` and `python -m
cortex.gateway` before they import the server, puts it ahead of the source when it exists.
`CORTEX_GATEWAY_COMPILED=0` runs the source instead. The gateway logs which one it runs and
/health says it (`code`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from ..settings import cache_root

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent  # cortex/
# The request path: the server, the upstream client, the gateway and what it calls per request.
MODULES = ("http", "upstream", "app", "routing", "metrics", "accesslog", "usage", "limits")
ENV = "CORTEX_GATEWAY_COMPILED"
KEEP = 4  # builds kept per machine (the newest); older ones are removed by the next build
MYPY_CONFIG = """\
[mypy]
python_version = 3.11
ignore_missing_imports = True
check_untyped_defs = True
plugins = pydantic.mypy
"""

# What this process runs, set by install(): "compiled (...)" or "interpreted (why)".
state = "interpreted (cortex.gateway.compiled.install() not called)"


def build_key(package: Path = PACKAGE) -> str:
    digest = hashlib.sha256()
    digest.update(f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}\n".encode())
    for name in MODULES:
        source = (package / "gateway" / f"{name}.py").read_bytes()
        digest.update(b"%s %d\n" % (name.encode(), len(source)))
        digest.update(source)
    return digest.hexdigest()[:24]


def builds_root() -> Path:
    return cache_root() / "gateway-build"


def install() -> str:
    """Put this source's compiled build ahead of the source for the rest of this process (and
    the workers it forks). Call before anything imports the server; returns what runs."""
    global state
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        state = f"interpreted ({ENV}=0)"
        return state
    loaded = [name for name in MODULES if f"cortex.gateway.{name}" in sys.modules]
    if loaded:
        state = f"interpreted (already imported before install(): {', '.join(loaded)})"
        return state
    key = build_key()
    build = builds_root() / key
    if not (build / "BUILT").exists():
        state = (
            f"interpreted (no compiled build of this source under {builds_root()}; "
            "`python -m cortex.gateway.compiled build` makes one)"
        )
        return state
    import cortex.gateway

    cortex.gateway.__path__.insert(0, str(build / "gateway"))
    sys.path.insert(0, str(build))  # the group's shared library, <hash>__mypyc
    state = f"compiled (mypyc build {key[:12]})"
    return state


def build(force: bool = False, log=print) -> Path:
    """Compile MODULES of this source with mypyc into the cache (nothing when that build exists)."""
    root = builds_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        # A copy of the package: the key, the type check and the binary all come from the same
        # bytes even if the checkout changes meanwhile, and nothing is written into the checkout.
        shutil.copytree(PACKAGE, work / "cortex", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        key = build_key(work / "cortex")
        target = root / key
        if (target / "BUILT").exists() and not force:
            log(f"gateway: compiled build {key[:12]} is cached ({target})")
            return target
        try:
            import mypyc  # noqa: F401  (comes with mypy)
        except ImportError:
            raise RuntimeError("mypyc (part of mypy) is not installed: pip install -e '.[test]' installs it") from None
        (work / "mypy.ini").write_text(MYPY_CONFIG)
        log(f"gateway: compiling {', '.join(MODULES)} with mypyc (build {key[:12]}; a few minutes)")
        logfile = root / f"{key}.log"
        with open(logfile, "w") as out:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mypyc",
                    "--config-file",
                    "mypy.ini",
                    *(f"cortex/gateway/{m}.py" for m in MODULES),
                ],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MYPYC_OPT_LEVEL": "3"},
            )
        if done.returncode != 0:
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"mypyc failed (exit {done.returncode}); log: {logfile}\n{tail}")
        staging = work / "out"
        (staging / "gateway").mkdir(parents=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for name in MODULES:
            shutil.move(str(work / "cortex" / "gateway" / f"{name}{suffix}"), staging / "gateway")
        shared = list(work.glob(f"*__mypyc{suffix}"))
        for lib in shared:
            shutil.move(str(lib), staging)
        (staging / "BUILT").write_text("\n".join(MODULES) + "\n")
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "BUILT").exists():  # not another build of the same key finishing first
                raise
    logfile.unlink(missing_ok=True)
    _prune(root, keep=target)
    log(f"gateway: compiled build {key[:12]} ready ({target})")
    return target


def _prune(root: Path, keep: Path) -> None:
    builds = sorted(
        (p for p in root.iterdir() if p.is_dir() and (p / "BUILT").exists() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"]:
        try:
            build(force="--force" in args)
        except RuntimeError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        return 0
    if args[:1] == ["status"]:
        print(install())
        return 0
    print("usage: python -m cortex.gateway.compiled build [--force] | status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
