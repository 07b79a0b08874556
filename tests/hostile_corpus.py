"""A corpus of hostile spec files and model files, written into a folder by `build(root)`.

Each `Case` is one file that `cortex validate` or `cortex plan` must refuse with exit 2, no
traceback and no hang: either a spec problem (`FILE:LINE: field: message`, `field` and a
fragment of the message given) or a reader error naming the model file (`reader` names it).
The classes grow from the ones in issue 15: special files, YAML shape, numbers, patterns with a
trailing newline, crons, timezones, paths and secrets, GGUF headers, config.json,
tokenizer.json and safetensors headers.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

OK = "name: m\nsource:\n  repo: org/model\n"
SECRET = "hf_SECRETvalue0123456789"  # the HF_TOKEN the secret cases run with


@dataclass
class Case:
    name: str
    cls: str  # the class of hostility (for picking a subprocess subset)
    command: str  # "validate" | "plan"
    fragment: str  # part of the message, case-insensitive
    field: str | None = None  # the spec field, for a spec problem
    reader: str | None = None  # the model file's name, for a reader error
    spec: str = ""  # the spec file, relative to the corpus root (set by build)
    make: Callable[[Path], None] | None = dc_field(default=None, repr=False)  # writes the files


CASES: list[Case] = []


def spec_case(name: str, cls: str, text: str | bytes, field_: str, fragment: str) -> None:
    def make(root: Path) -> None:
        p = root / f"{name}.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    CASES.append(Case(name, cls, "validate", fragment, field=field_, spec=f"{name}.yaml", make=make))


def file_case(name: str, make_path: Callable[[Path], Path], fragment: str) -> None:
    """The spec path itself is hostile (not a regular file, a loop, too large...)."""
    case = Case(name, "file", "validate", fragment, field="(file)")

    def make(root: Path) -> None:
        case.spec = str(make_path(root).relative_to(root))

    case.make = make
    CASES.append(case)


def model_case(
    name: str, cls: str, source: str, write: Callable[[Path], None], reader: str, fragment: str, command: str = "plan"
) -> None:
    """A valid spec whose model file(s) are hostile; `write(folder)` writes them into `folder`."""

    def make(root: Path) -> None:
        folder = root / name
        folder.mkdir()
        write(folder)
        (root / f"{name}.yaml").write_text(
            f"name: m\nsource:\n  {source}\nresources:\n  gpus: 1\n  gpu_memory: 24GiB\n"
        )

    CASES.append(Case(name, cls, command, fragment, reader=reader, spec=f"{name}.yaml", make=make))


# --------------------------------------------------------------------------- the spec file itself


def _dir(root: Path) -> Path:
    (root / "a-folder.yaml").mkdir()
    return root / "a-folder.yaml"


def _fifo(root: Path) -> Path:
    os.mkfifo(root / "fifo.yaml")
    return root / "fifo.yaml"


def _link(name: str, target: str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        (root / name).symlink_to(target)
        return root / name

    return make


def _loop(root: Path) -> Path:
    (root / "loop-a.yaml").symlink_to(root / "loop-b.yaml")
    (root / "loop-b.yaml").symlink_to(root / "loop-a.yaml")
    return root / "loop-a.yaml"


def _socket(root: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock.yaml"))
    s.close()
    return root / "sock.yaml"


def _big(root: Path) -> Path:
    p = root / "big.yaml"
    p.write_text(OK + "# padding\n" * 120_000)
    return p


def _sparse(root: Path) -> Path:
    p = root / "sparse.yaml"
    with p.open("wb") as f:
        f.truncate(8 << 30)  # 8 GiB of zeros, no disk used
    return p


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        (root / name).write_bytes(data)
        return root / name

    return make


file_case("spec-is-a-fifo", _fifo, "FIFO")
file_case("spec-is-dev-zero", _link("zero.yaml", "/dev/zero"), "character device")
file_case("spec-is-dev-null-like", _link("null.yaml", "/dev/null"), "character device")
file_case("spec-symlink-loop", _loop, "symlink loop")
file_case("spec-self-symlink", _link("self.yaml", "self.yaml"), "symlink loop")
file_case("spec-dangling-symlink", _link("dangling.yaml", "/nonexistent/x.yaml"), "no such file")
file_case("spec-is-a-socket", _socket, "socket")
file_case("spec-too-large", _big, "more than")
file_case("spec-sparse-8gib", _sparse, "more than")
file_case("spec-not-utf8", _bytes("latin1.yaml", "name: caf\xe9\n".encode("latin-1")), "UTF-8")
file_case("spec-binary", _bytes("binary.yaml", bytes(range(256)) * 4), "UTF-8")

# --------------------------------------------------------------------------- YAML shape

for depth in (40, 100, 1000, 100_000):
    # past 1000 levels libyaml stops first ("exceeded maximum nesting depth"), also at the line
    spec_case(f"yaml-flow-nesting-{depth}", "yaml", OK + "tests: " + "[" * depth + "]" * depth + "\n", "(yaml)", "nest")
spec_case(
    "yaml-block-nesting-50",
    "yaml",
    OK + "".join("  " * i + f"k{i}:\n" for i in range(50)) + "  " * 50 + "x: 1\n",
    "(yaml)",
    "levels deep",
)
spec_case(
    "yaml-mapping-nesting-5000", "yaml", OK + "tests: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "(yaml)", "nest"
)
_laughs = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)
spec_case("yaml-billion-laughs", "yaml", _laughs + OK, "(yaml)", "aliases expanded")
spec_case(
    "yaml-alias-fanout",
    "yaml",
    "x: &x [" + ",".join(["1"] * 200) + "]\ny: [" + ",".join(["*x"] * 60) + "]\n" + OK,
    "(yaml)",
    "aliases expanded",
)
spec_case("yaml-too-many-aliases", "yaml", "x: &x 1\ny: [" + ",".join(["*x"] * 150) + "]\n" + OK, "(yaml)", "aliases")
spec_case(
    "yaml-alias-deepens", "yaml", "d: &d " + "[" * 30 + "]" * 30 + "\ne: [[[[[[*d]]]]]]\n" + OK, "(yaml)", "levels deep"
)
spec_case("yaml-200k-prompts", "yaml", OK + "tests:\n  prompts: [" + "a," * 200_000 + "]\n", "(yaml)", "values")
spec_case(
    "yaml-100k-gpu-list",
    "yaml",
    OK + "resources:\n  gpus: [" + ",".join(map(str, range(100_000))) + "]\n",
    "(yaml)",
    "values",
)
spec_case("yaml-5k-prompts", "yaml", OK + "tests:\n  prompts:\n" + "  - hi\n" * 5000, "tests.prompts", "at most 100")
spec_case(
    "yaml-300-gpu-list",
    "yaml",
    OK + "resources:\n  gpus: [" + ",".join(map(str, range(300))) + "]\n",
    "resources.gpus[256]",
    "less than 256",
)
spec_case("yaml-flow-seq-key", "yaml", OK + "? [a, b]\n: 1\n", "(yaml)", "plain names")
spec_case("yaml-mapping-key", "yaml", OK + "? {a: 1}\n: 1\n", "(yaml)", "plain names")
spec_case("yaml-int-key", "yaml", OK + "1: x\n", "(yaml)", "not a name")
spec_case("yaml-null-key", "yaml", OK + "~: x\n", "(yaml)", "not a name")
spec_case("yaml-bool-key", "yaml", OK + "on: x\n", "(yaml)", "not a name")
spec_case("yaml-nested-int-key", "yaml", OK + "resources:\n  7: x\n", "(yaml)", "not a name")
spec_case("yaml-5000-digit-int", "yaml", OK + "resources:\n  concurrency: " + "9" * 5000 + "\n", "(yaml)", "digits")
spec_case("yaml-python-tag", "yaml", OK + "x: !!python/object/apply:os.system ['true']\n", "(yaml)", "YAML")
spec_case("yaml-unknown-tag", "yaml", OK + "x: !secret 1\n", "(yaml)", "YAML")
spec_case("yaml-timestamp-name", "yaml", "name: 2001-12-14\nsource:\n  repo: a/b\n", "name", "string")
spec_case("yaml-two-documents", "yaml", OK + "---\n" + OK, "(yaml)", "YAML")
spec_case("yaml-nul-byte", "yaml", OK + "x: \x00\n", "(yaml)", "YAML")
spec_case("yaml-undefined-alias", "yaml", OK + "x: *nope\n", "(yaml)", "YAML")

# --------------------------------------------------------------------------- numbers

R = OK + "resources:\n"
V = OK + "vllm:\n"
L = OK + "llamacpp:\n"
B = OK + "benchmark:\n"
NUMBERS: list[tuple[str, str, str, str]] = [  # name, text, field, fragment
    ("gpus-100m", R + "  gpus: 100000000\n", "resources.gpus", "256"),
    ("gpus-400-digits", R + "  gpus: " + "9" * 39 + "\n", "resources.gpus", "256"),
    ("gpus-float-inf", R + "  gpus: .inf\n", "resources.gpus", ""),
    ("gpu-id-huge", R + "  gpus: [0, 100000000]\n", "resources.gpus[1]", "less than 256"),
    ("gpu-memory-400-digits", R + "  gpu_memory: " + "9" * 400 + "GB\n", "resources.gpu_memory", "not a size"),
    ("gpu-memory-30-digits", R + "  gpu_memory: " + "9" * 30 + "GB\n", "resources.gpu_memory", "more than"),
    ("gpu-memory-int-huge", R + "  gpu_memory: " + "9" * 39 + "\n", "resources.gpu_memory", "more than"),
    ("gpu-memory-1000tb", R + "  gpu_memory: 1000TB\n", "resources.gpu_memory", "more than 16.00 TiB"),
    ("gpu-memory-inf", R + "  gpu_memory: .inf\n", "resources.gpu_memory", "unit"),
    ("gpu-memory-nan", R + "  gpu_memory: .nan\n", "resources.gpu_memory", "unit"),
    ("gpu-memory-exponent", R + "  gpu_memory: 1e400GB\n", "resources.gpu_memory", "not a size"),
    ("gpu-memory-zero", R + "  gpu_memory: 0GB\n", "resources.gpu_memory", "positive"),
    ("concurrency-huge", R + "  concurrency: 1000000000\n", "resources.concurrency", "less than or equal"),
    ("concurrency-nan", R + "  concurrency: .nan\n", "resources.concurrency", ""),
    ("context-huge", R + "  context_length: 1099511627776\n", "resources.context_length", "less than or equal"),
    ("context-float-huge", R + "  context_length: 1.0e300\n", "resources.context_length", ""),
    ("tp-huge", V + "  tensor_parallel_size: 1000000\n", "vllm.tensor_parallel_size", "less than or equal"),
    ("pp-huge", V + "  pipeline_parallel_size: 1000000\n", "vllm.pipeline_parallel_size", "less than or equal"),
    ("util-nan", V + "  gpu_memory_utilization: .nan\n", "vllm.gpu_memory_utilization", "finite"),
    ("util-inf", V + "  gpu_memory_utilization: .inf\n", "vllm.gpu_memory_utilization", "finite"),
    ("max-model-len-huge", V + "  max_model_len: 1000000000000\n", "vllm.max_model_len", "less than or equal"),
    ("swap-inf", V + "  swap_space_gb: .inf\n", "vllm.swap_space_gb", "finite"),
    ("graph-sizes-huge", V + "  cuda_graph_sizes: [1, 1000000000000]\n", "vllm.cuda_graph_sizes[1]", "less than"),
    ("max-num-seqs-huge", V + "  max_num_seqs: 1000000000\n", "vllm.max_num_seqs", "less than or equal"),
    ("ngl-huge", L + "  ngl: 1000000000000\n", "llamacpp.ngl", "less than or equal"),
    ("ngl-negative", L + "  ngl: -1\n", "llamacpp.ngl", "greater than or equal"),
    ("split-inf", L + "  tensor_split: [.inf, 1]\n", "llamacpp.tensor_split[0]", "finite"),
    ("split-nan", L + "  tensor_split: [.nan]\n", "llamacpp.tensor_split[0]", "finite"),
    ("split-huge", L + "  tensor_split: [1.0e300, 1]\n", "llamacpp.tensor_split[0]", "less than or equal"),
    ("split-negative-inf", L + "  tensor_split: [-.inf]\n", "llamacpp.tensor_split[0]", "finite"),
    (
        "split-300-shares",
        L + "  tensor_split: [" + ",".join(["1"] * 300) + "]\n",
        "llamacpp.tensor_split",
        "at most 256",
    ),
    ("batch-huge", L + "  batch_size: 10000000000\n", "llamacpp.batch_size", "less than or equal"),
    ("ubatch-huge", L + "  ubatch_size: 10000000000\n", "llamacpp.ubatch_size", "less than or equal"),
    ("threads-huge", L + "  threads: 10000000000\n", "llamacpp.threads", "less than or equal"),
    ("context-size-huge", L + "  context_size: 100000000000\n", "llamacpp.context_size", "less than or equal"),
    ("parallel-huge", L + "  parallel: 100000000\n", "llamacpp.parallel", "less than or equal"),
    ("rope-base-inf", L + "  rope_freq_base: .inf\n", "llamacpp.rope_freq_base", "finite"),
    ("rope-base-nan", L + "  rope_freq_base: .nan\n", "llamacpp.rope_freq_base", "finite"),
    ("rope-base-huge", L + "  rope_freq_base: 1.0e300\n", "llamacpp.rope_freq_base", "less than or equal"),
    ("rope-scale-neg-inf", L + "  rope_freq_scale: -.inf\n", "llamacpp.rope_freq_scale", "finite"),
    ("bench-requests-huge", B + "  requests: 1000000000000\n", "benchmark.requests", "less than or equal"),
    ("bench-input-huge", B + "  input_len: 1000000000000\n", "benchmark.input_len", "less than or equal"),
    ("bench-output-huge", B + "  output_len: 1000000000000\n", "benchmark.output_len", "less than or equal"),
    ("bench-rate-inf", B + "  request_rate: .inf\n", "benchmark.request_rate", "finite"),
    ("bench-burstiness-nan", B + "  burstiness: .nan\n", "benchmark.burstiness", "finite"),
    ("bench-duration-inf", B + "  max_duration_s: .inf\n", "benchmark.max_duration_s", "finite"),
    ("bench-price-nan", B + "  gpu_hour_price_usd: .nan\n", "benchmark.gpu_hour_price_usd", "finite"),
    ("bench-levels-huge", B + "  concurrency: [1, 1000000000]\n", "benchmark.concurrency[1]", "less than or equal"),
    (
        "bench-levels-many",
        B + "  concurrency: [" + ",".join(["1"] * 100) + "]\n",
        "benchmark.concurrency",
        "at most 64",
    ),
    ("slo-ttft-inf", B + "  goodput_slo:\n    ttft_ms: .inf\n", "benchmark.goodput_slo.ttft_ms", "finite"),
    ("gate-max-nan", B + "  gates:\n    - {metric: ttft_ms, max: .nan}\n", "benchmark.gates[0].max", "finite"),
    (
        "gate-min-inf",
        B + "  gates:\n    - {metric: output_tokens_per_s, min: .inf}\n",
        "benchmark.gates[0].min",
        "finite",
    ),
    (
        "gate-level-huge",
        B + "  gates:\n    - {metric: ttft_ms, max: 1, concurrency: 10000000000}\n",
        "benchmark.gates[0].concurrency",
        "less than or equal",
    ),
    (
        "quality-agreement-nan",
        B + "  quality:\n    min_top1_agreement: .nan\n",
        "benchmark.quality.min_top1_agreement",
        "finite",
    ),
    ("quality-tokens-huge", B + "  quality:\n    tokens: 1000000000000\n", "benchmark.quality.tokens", "less than"),
    ("smoke-max-tokens-huge", OK + "tests:\n  max_tokens: 1000000000000\n", "tests.max_tokens", "less than or equal"),
]
for _name, _text, _field, _frag in NUMBERS:
    spec_case("num-" + _name, "numbers", _text, _field, _frag)

# --------------------------------------------------------------------------- patterns and a trailing newline

spec_case("nl-name", "patterns", 'name: "m\\n"\nsource:\n  repo: a/b\n', "name", "DNS-safe")
spec_case("nl-name-block", "patterns", "name: |\n  m\nsource:\n  repo: a/b\n", "name", "DNS-safe")
spec_case("nl-alias", "patterns", OK + 'aliases: ["other\\n"]\n', "aliases", "characters")
spec_case("nl-repo", "patterns", 'name: m\nsource:\n  repo: "org/model\\n"\n', "source.repo", "owner/name")
spec_case("nl-revision", "patterns", OK + '  revision: "main\\n"\n', "source.revision", "not a branch")
spec_case("nl-quantization", "patterns", OK + 'quantization: "Q8_0\\n"\n', "quantization", "GGUF type")
spec_case("nl-cron", "patterns", OK + 'schedule:\n  cron: "0 3 * * *\\n"\n', "schedule.cron", "five fields")
spec_case(
    "nl-timezone",
    "patterns",
    OK + 'schedule:\n  cron: "0 3 * * *"\n  timezone: "UTC\\n"\n',
    "schedule.timezone",
    "timezone",
)
spec_case("nl-gpu-memory", "patterns", OK + 'resources:\n  gpu_memory: "46GiB\\n\\n"\n', "resources.gpu_memory", "")
spec_case("unicode-name", "patterns", "name: ｍｏｄｅｌ\nsource:\n  repo: a/b\n", "name", "DNS-safe")
spec_case("unicode-repo", "patterns", "name: m\nsource:\n  repo: ｏｒｇ/model\n", "source.repo", "owner/name")
spec_case("huge-name", "patterns", "name: " + "a" * 200_000 + "\nsource:\n  repo: a/b\n", "name", "DNS-safe")
spec_case("huge-alias", "patterns", OK + "aliases: [" + "a" * 200_000 + "]\n", "aliases", "characters")

# --------------------------------------------------------------------------- cron and timezone

S = OK + "schedule:\n"
for _name, _cron, _frag in [
    ("cron-6-fields", "0 0 3 * * *", "five fields"),
    ("cron-7-fields", "0 0 3 * * * 2030", "five fields"),
    ("cron-4-fields", "0 3 * *", "five fields"),
    ("cron-macro", "@daily", "five fields"),
    ("cron-reboot", "@reboot", "five fields"),
    ("cron-feb-31", "0 0 31 2 *", "never fires"),
    ("cron-feb-30", "0 0 30 2 *", "never fires"),
    ("cron-apr-31", "0 0 31 4 *", "never fires"),
    ("cron-nov-31", "30 12 31 11 *", "never fires"),
    ("cron-step-zero", "*/0 * * * *", "five fields"),
    ("cron-out-of-range", "0-99999 * * * *", "five fields"),
    ("cron-empty", "", "five fields"),
    ("cron-long", "0 " * 400, "at most"),
    ("cron-tab", "0\t3\t*\t*\t*", "five fields"),
]:
    spec_case(_name, "cron", S + f"  cron: {json.dumps(_cron)}\n", "schedule.cron", _frag)
for _name, _tz in [
    ("tz-america", "America"),
    ("tz-folder-slash", "America/"),
    ("tz-dotdot", "../../../etc/passwd"),
    ("tz-absolute", "/etc/localtime"),
    ("tz-empty", ""),
    ("tz-long", "Europe/" + "x" * 100),
    ("tz-dot", "."),
]:
    spec_case(_name, "timezone", S + f"  cron: '0 3 * * *'\n  timezone: {json.dumps(_tz)}\n", "schedule.timezone", "")

# --------------------------------------------------------------------------- paths and secrets


def _loop_in(d: Path, name: str) -> None:
    (d / name).symlink_to(d / name)


# Symlink loops where a model file should be: `plan` names the file and the loop. (`validate`
# reads no model file, so it has nothing to say about them.)
model_case(
    "path-symlink-loop",
    "paths",
    "path: path-symlink-loop/weights",
    lambda d: _loop_in(d, "weights"),
    "weights",
    "symlink loop",
)
model_case(
    "gguf-symlink-loop",
    "paths",
    "gguf: gguf-symlink-loop/model.gguf",
    lambda d: _loop_in(d, "model.gguf"),
    "model.gguf",
    "symlink loop",
)
model_case(
    "gguf-loop-in-folder",
    "paths",
    "gguf: gguf-loop-in-folder/sub/model.gguf",
    lambda d: _loop_in(d, "sub"),
    "sub/model.gguf",
    "symlink loop",
)


def _absolute_loop(d: Path) -> None:
    (d / "a.gguf").symlink_to(d / "b.gguf")
    (d / "b.gguf").symlink_to(d / "a.gguf")


model_case("gguf-two-link-loop", "paths", "gguf: gguf-two-link-loop/a.gguf", _absolute_loop, "a.gguf", "symlink loop")


spec_case("path-nul-byte", "paths", 'name: m\nsource:\n  path: "/tmp/a\\0b"\n', "source.path", "NUL")
spec_case("gguf-nul-byte", "paths", 'name: m\nsource:\n  gguf: "/tmp/a\\0b.gguf"\n', "source.gguf", "NUL")
spec_case("path-too-long", "paths", "name: m\nsource:\n  gguf: /" + "a/" * 3000 + "x.gguf\n", "source.gguf", "at most")
for _name, _value in [
    ("secret-hf-token", "/data/$HF_TOKEN.gguf"),
    ("secret-braced", "/data/${HF_TOKEN}.gguf"),
    ("secret-in-default", "${NO_SUCH_VAR_X:-/data/$HF_TOKEN}/m.gguf"),
    ("secret-api-key", "/data/$OPENAI_API_KEY/m.gguf"),
    ("secret-password", "$DB_PASSWORD.gguf"),
]:
    spec_case(_name, "secrets", f"name: m\nsource:\n  gguf: {_value}\n", "source.gguf", "secret")
spec_case("secret-in-path", "secrets", "name: m\nsource:\n  path: /models/${HF_TOKEN}\n", "source.path", "secret")


def _gguf_source(make_target: Callable[[Path], None], fragment: str, name: str) -> None:
    model_case(name, "paths", "gguf: " + f"{name}/model.gguf", make_target, "model.gguf", fragment)


_gguf_source(lambda d: os.mkfifo(d / "model.gguf"), "FIFO", "gguf-is-a-fifo")
_gguf_source(lambda d: (d / "model.gguf").symlink_to("/dev/zero"), "character device", "gguf-is-dev-zero")
_gguf_source(lambda d: (d / "model.gguf").mkdir(), "folder", "gguf-is-a-folder")
_gguf_source(lambda d: None, "no such file", "gguf-missing")
model_case(
    "path-is-a-file",
    "paths",
    "path: path-is-a-file/weights.bin",
    lambda d: (d / "weights.bin").write_bytes(b"x"),
    "weights.bin",
    "not a folder",
)
model_case(
    "config-is-a-fifo", "paths", "path: config-is-a-fifo", lambda d: os.mkfifo(d / "config.json"), "config.json", "FIFO"
)
model_case(
    "config-is-dev-zero",
    "paths",
    "path: config-is-dev-zero",
    lambda d: (d / "config.json").symlink_to("/dev/zero"),
    "config.json",
    "character device",
)
model_case(
    "config-is-a-folder",
    "paths",
    "path: config-is-a-folder",
    lambda d: (d / "config.json").mkdir(),
    "config.json",
    "folder",
)
model_case(
    "config-symlink-loop",
    "paths",
    "path: config-symlink-loop",
    lambda d: (d / "config.json").symlink_to(d / "config.json"),
    "config.json",
    "symlink loop",
)


def _sparse_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


model_case(
    "config-sparse-huge",
    "paths",
    "path: config-sparse-huge",
    lambda d: _sparse_file(d / "config.json", 1 << 33),
    "config.json",
    "more than",
)
model_case(
    "gguf-sparse-huge",
    "paths",
    "gguf: gguf-sparse-huge/model.gguf",
    lambda d: _sparse_file(d / "model.gguf", 1 << 34),
    "model.gguf",
    "bad magic",
)

# --------------------------------------------------------------------------- GGUF headers


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", v))


def _str(key: str, v: str) -> bytes:
    return _kv(key, STR, _s(v))


def _tensor(name: str, dims: tuple[int, ...], ttype: int = 0, offset: int = 0) -> bytes:
    return (
        _s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ttype, offset)
    )


def _base_kvs(arch: str = "llama") -> list[bytes]:
    return [
        _str("general.architecture", arch),
        _u32(f"{arch}.block_count", 2),
        _u32(f"{arch}.attention.head_count", 4),
        _u32(f"{arch}.embedding_length", 64),
        _u32(f"{arch}.context_length", 256),
        _u32("general.file_type", 0),
        _kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 3) + _s("a") + _s("b") + _s("c")),
    ]


def gguf_bytes(
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    magic: bytes = b"GGUF",
    pad: int = 4096,
) -> bytes:
    kvs = _base_kvs() if kvs is None else kvs
    tensors = [_tensor("token_embd.weight", (64, 3))] if tensors is None else tensors
    head = magic + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    return head + b"".join(kvs) + b"".join(tensors) + b"\0" * pad


def _gguf(name: str, data: bytes, fragment: str) -> None:
    def write(d: Path) -> None:
        (d / "model.gguf").write_bytes(data)

    model_case(name, "gguf", f"gguf: {name}/model.gguf", write, "model.gguf", fragment)


_nested = struct.pack("<IQ", ARR, 1) * 20 + struct.pack("<IQ", U32, 0)  # [[[[...[]...]]]], 21 deep
GGUF_CASES: list[tuple[str, bytes, str]] = [
    ("gguf-bad-magic", gguf_bytes(magic=b"GGML"), "bad magic"),
    ("gguf-empty", b"", "truncated"),
    ("gguf-only-magic", b"GGUF", "truncated"),
    ("gguf-version-1", gguf_bytes(version=1), "version 1"),
    ("gguf-version-99", gguf_bytes(version=99), "version 99"),
    ("gguf-absurd-kv-count", gguf_bytes(n_kv=2**63), "corrupt"),
    ("gguf-absurd-tensor-count", gguf_bytes(n_tensors=2**62), "corrupt"),
    ("gguf-kv-count-past-end", gguf_bytes(n_kv=50_000, pad=0), "truncated"),
    ("gguf-duplicate-key", gguf_bytes(_base_kvs() + [_u32("llama.block_count", 3)]), "appears twice"),
    ("gguf-nested-arrays", gguf_bytes(_base_kvs() + [_kv("x.nested", ARR, _nested)]), "nests arrays"),
    (
        "gguf-array-count-huge",
        gguf_bytes(_base_kvs() + [_kv("x.arr", ARR, struct.pack("<IQ", U32, 2**62))]),
        "truncated",
    ),
    (
        "gguf-string-array-huge",
        gguf_bytes(_base_kvs() + [_kv("x.arr", ARR, struct.pack("<IQ", STR, 2**40))]),
        "truncated",
    ),
    ("gguf-unknown-value-type", gguf_bytes(_base_kvs() + [_kv("x.odd", 99, b"\0" * 8)]), "unknown value type"),
    (
        "gguf-unknown-array-type",
        gguf_bytes(_base_kvs() + [_kv("x.odd", ARR, struct.pack("<IQ", 77, 1))]),
        "unknown value type",
    ),
    ("gguf-huge-string-length", gguf_bytes([_kv("general.architecture", STR, struct.pack("<Q", 2**62))]), "truncated"),
    ("gguf-huge-key-length", gguf_bytes([struct.pack("<Q", 2**63)]), "truncated"),
    ("gguf-unknown-architecture", gguf_bytes([_str("general.architecture", "zzz-unknown")]), "zzz-unknown.block_count"),
    ("gguf-no-architecture", gguf_bytes([_u32("llama.block_count", 2)]), "general.architecture"),
    ("gguf-architecture-is-int", gguf_bytes([_u32("general.architecture", 5)]), "general.architecture"),
    (
        "gguf-block-count-huge",
        gguf_bytes(
            [_kv("general.architecture", STR, _s("llama")), _kv("llama.block_count", U64, struct.pack("<Q", 10**12))]
            + _base_kvs()[2:]
        ),
        "block_count",
    ),
    (
        "gguf-zero-heads",
        gguf_bytes(_base_kvs()[:2] + [_u32("llama.attention.head_count", 0)] + _base_kvs()[3:]),
        "head_count",
    ),
    (
        "gguf-heads-empty-list",
        gguf_bytes(
            _base_kvs()[:2] + [_kv("llama.attention.head_count", ARR, struct.pack("<IQ", U32, 0))] + _base_kvs()[3:]
        ),
        "head_count",
    ),
    (
        "gguf-heads-is-string",
        gguf_bytes(_base_kvs()[:2] + [_str("llama.attention.head_count", "four")] + _base_kvs()[3:]),
        "head_count",
    ),
    (
        "gguf-embedding-nan",
        gguf_bytes(
            _base_kvs()[:3] + [_kv("llama.embedding_length", F32, struct.pack("<f", float("nan")))] + _base_kvs()[4:]
        ),
        "embedding_length",
    ),
    (
        "gguf-context-huge",
        gguf_bytes(_base_kvs()[:4] + [_kv("llama.context_length", U64, struct.pack("<Q", 2**62))] + _base_kvs()[5:]),
        "context_length",
    ),
    (
        "gguf-file-type-string",
        gguf_bytes(_base_kvs()[:5] + [_str("general.file_type", "Q4")] + _base_kvs()[6:]),
        "file_type",
    ),
    ("gguf-tokens-not-list", gguf_bytes(_base_kvs()[:6] + [_str("tokenizer.ggml.tokens", "abc")]), "tokens"),
    ("gguf-alignment-zero", gguf_bytes(_base_kvs() + [_u32("general.alignment", 0)]), "alignment"),
    ("gguf-alignment-odd", gguf_bytes(_base_kvs() + [_u32("general.alignment", 3)]), "alignment"),
    ("gguf-alignment-string", gguf_bytes(_base_kvs() + [_str("general.alignment", "32")]), "alignment"),
    ("gguf-tensor-9-dims", gguf_bytes(tensors=[_tensor("t", (1,) * 9)]), "dimensions"),
    ("gguf-tensor-0-dims", gguf_bytes(tensors=[_tensor("t", ())]), "dimensions"),
    ("gguf-tensor-unknown-type", gguf_bytes(tensors=[_tensor("t", (32,), ttype=999)]), "unknown type"),
    ("gguf-tensor-duplicate", gguf_bytes(tensors=[_tensor("t", (32,)), _tensor("t", (32,))]), "appears twice"),
    ("gguf-split-part-zero", b"", "no part"),
]
for _name, _data, _frag in GGUF_CASES:
    if _name == "gguf-split-part-zero":
        model_case(
            _name,
            "gguf",
            f"gguf: {_name}/m-00000-of-00002.gguf",
            lambda d: (d / "m-00000-of-00002.gguf").write_bytes(gguf_bytes()),
            "m-00000-of-00002.gguf",
            _frag,
        )
        continue
    _gguf(_name, _data, _frag)
model_case(
    "gguf-split-missing-parts",
    "gguf",
    "gguf: gguf-split-missing-parts/m-00001-of-99999.gguf",
    lambda d: (d / "m-00001-of-99999.gguf").write_bytes(gguf_bytes()),
    "m-00001-of-99999.gguf",
    "missing",
)

# --------------------------------------------------------------------------- config.json

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}
MIXTRAL = {
    **LLAMA,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
DEEPSEEK = {
    **LLAMA,
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "kv_lora_rank": 64,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
}
GEMMA2 = {
    **LLAMA,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "sliding_window": 128,
    "sliding_window_pattern": 2,
    "head_dim": 16,
}
QWEN_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "text_config": {**LLAMA}}


def _config(name: str, config: object, fragment: str, raw: bytes | None = None) -> None:
    def write(d: Path) -> None:
        (d / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())

    model_case(name, "config", f"path: {name}", write, "config.json", fragment)


CONFIG_CASES: list[tuple[str, object, str]] = [
    ("config-is-a-list", [LLAMA], "not an object"),
    ("config-is-a-string", "llama", "not an object"),
    ("config-zero-heads", {**LLAMA, "num_attention_heads": 0}, "num_attention_heads"),
    ("config-zero-kv-heads", {**LLAMA, "num_key_value_heads": 0}, "num_key_value_heads"),
    ("config-layers-1e12", {**LLAMA, "num_hidden_layers": 1e12}, "num_hidden_layers"),
    ("config-layers-int-huge", {**LLAMA, "num_hidden_layers": 10**30}, "num_hidden_layers"),
    ("config-layers-negative", {**LLAMA, "num_hidden_layers": -2}, "num_hidden_layers"),
    ("config-layers-string", {**LLAMA, "num_hidden_layers": "two"}, "num_hidden_layers"),
    ("config-layers-bool", {**LLAMA, "num_hidden_layers": True}, "num_hidden_layers"),
    ("config-hidden-fraction", {**LLAMA, "hidden_size": 64.5}, "hidden_size"),
    # a family Cortex has no defaults for (a known family takes transformers' default instead)
    (
        "config-hidden-missing",
        {**{k: v for k, v in LLAMA.items() if k != "hidden_size"}, "model_type": "acme"},
        "hidden_size",
    ),
    (
        "config-vocab-missing",
        {**{k: v for k, v in LLAMA.items() if k != "vocab_size"}, "model_type": "acme"},
        "vocab_size",
    ),
    ("config-vocab-huge", {**LLAMA, "vocab_size": 10**12}, "vocab_size"),
    ("config-head-dim-zero", {**LLAMA, "head_dim": 0}, "head_dim"),
    ("config-context-huge", {**LLAMA, "max_position_embeddings": 10**30}, "max_position_embeddings"),
    ("config-no-architectures", {k: v for k, v in LLAMA.items() if k != "architectures"}, "architectures"),
    ("config-architectures-empty", {**LLAMA, "architectures": []}, "architectures"),
    ("config-architectures-string", {**LLAMA, "architectures": "LlamaForCausalLM"}, "architectures"),
    ("config-architectures-ints", {**LLAMA, "architectures": [1, 2]}, "architectures"),
    ("config-text-config-list", {**QWEN_VL, "text_config": [LLAMA]}, "text_config"),
    (
        "config-qwen-vl-zero-heads",
        {**QWEN_VL, "text_config": {**LLAMA, "num_attention_heads": 0}},
        "num_attention_heads",
    ),
    ("config-quant-config-list", {**LLAMA, "quantization_config": ["awq"]}, "quantization_config"),
    ("config-mixtral-experts-huge", {**MIXTRAL, "num_local_experts": 10**9}, "num_local_experts"),
    ("config-mixtral-experts-float", {**MIXTRAL, "num_local_experts": 8.5}, "num_local_experts"),
    ("config-deepseek-lora-huge", {**DEEPSEEK, "kv_lora_rank": 10**9}, "kv_lora_rank"),
    ("config-deepseek-rope-string", {**DEEPSEEK, "qk_rope_head_dim": "sixty-four"}, "qk_rope_head_dim"),
    ("config-deepseek-shared-huge", {**DEEPSEEK, "n_shared_experts": 10**8}, "n_shared_experts"),
    ("config-gemma-window-negative", {**GEMMA2, "sliding_window": -5}, "sliding_window"),
    ("config-gemma-window-huge", {**GEMMA2, "sliding_window": 10**15}, "sliding_window"),
]
for _name, _cfg_value, _frag in CONFIG_CASES:
    _config(_name, _cfg_value, _frag)
_config("config-not-json", None, "not valid JSON", raw=b"{not json")
_config("config-not-utf8", None, "not valid JSON", raw=b'{"a": "\xff\xfe"}')
_config("config-nested-100k", None, "nested too deeply", raw=b"[" * 100_000 + b"]" * 100_000)
_config("config-empty", None, "not valid JSON", raw=b"")

# --------------------------------------------------------------------------- tokenizer.json and safetensors


def _with_config(name: str, extra: Callable[[Path], None], reader: str, fragment: str) -> None:
    def write(d: Path) -> None:
        (d / "config.json").write_text(json.dumps(LLAMA))
        extra(d)

    model_case(name, "tokenizer" if "tokenizer" in name else "safetensors", f"path: {name}", write, reader, fragment)


for _name, _tok, _frag in [
    ("tokenizer-is-a-list", b"[1, 2]", "not an object"),
    ("tokenizer-model-string", json.dumps({"model": "bpe"}).encode(), "model is a str"),
    ("tokenizer-vocab-string", json.dumps({"model": {"vocab": "abc"}}).encode(), "model.vocab is a str"),
    ("tokenizer-vocab-ints", json.dumps({"model": {"vocab": [1, 2]}}).encode(), "not a string"),
    ("tokenizer-merges-dict", json.dumps({"model": {"vocab": {}, "merges": {"a": 1}}}).encode(), "merges is a dict"),
    ("tokenizer-added-int", json.dumps({"added_tokens": 5}).encode(), "added_tokens is a int"),
    ("tokenizer-nested-deep", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("tokenizer-not-json", b"\x00\x01garbage", "not valid JSON"),
]:
    _with_config(_name, lambda d, t=_tok: (d / "tokenizer.json").write_bytes(t), "tokenizer.json", _frag)
_with_config("tokenizer-fifo", lambda d: os.mkfifo(d / "tokenizer.json"), "tokenizer.json", "FIFO")
_with_config(
    "tokenizer-sparse-huge", lambda d: _sparse_file(d / "tokenizer.json", 1 << 34), "tokenizer.json", "more than"
)


def _safetensors(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


for _name, _st, _frag in [
    ("safetensors-length-huge", _safetensors(b"{}", 2**63), "header length"),
    ("safetensors-length-zero", _safetensors(b"", 0), "header length"),
    ("safetensors-length-past-end", _safetensors(b"{}", 1000), "truncated"),
    ("safetensors-too-short", b"\x01\x02", "shorter"),
    ("safetensors-header-list", _safetensors(b"[1, 2, 3]"), "not an object"),
    ("safetensors-header-not-json", _safetensors(b"{{{{"), "not valid JSON"),
    ("safetensors-shape-string", _safetensors(json.dumps({"w": {"dtype": "F16", "shape": "big"}}).encode()), "shape"),
    (
        "safetensors-shape-negative",
        _safetensors(json.dumps({"w": {"dtype": "F16", "shape": [-1, 4]}}).encode()),
        "shape",
    ),
    ("safetensors-shape-huge", _safetensors(json.dumps({"w": {"dtype": "F16", "shape": [10**15]}}).encode()), "shape"),
    ("safetensors-entry-list", _safetensors(json.dumps({"w": [1, 2]}).encode()), "shape"),
    ("safetensors-deep", _safetensors(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
]:
    _with_config(_name, lambda d, b=_st: (d / "model.safetensors").write_bytes(b), "model.safetensors", _frag)
_with_config("safetensors-fifo", lambda d: os.mkfifo(d / "model.safetensors"), "model.safetensors", "FIFO")
_with_config(
    "safetensors-index-list",
    lambda d: (d / "model.safetensors.index.json").write_text("[]"),
    "model.safetensors.index.json",
    "not an object",
)
_with_config(
    "safetensors-index-size-huge",
    lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 10**30}})),
    "model.safetensors.index.json",
    "total_size",
)


# --------------------------------------------------------------------------- building


def build(root: Path) -> list[Case]:
    """Write every case's files under `root` (a fresh folder); returns the cases with `spec` set."""
    for case in CASES:
        assert case.make is not None
        case.make(root)
    return CASES


# A valid model of each kind, to show the generators write readable files (the hostile cases
# differ from these in one thing).
def write_valid_gguf(path: Path) -> None:
    path.write_bytes(gguf_bytes())


def write_valid_hf_dir(folder: Path, config: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or LLAMA))
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 1}, "merges": ["a b"]}, "added_tokens": [{"content": "<s>"}]})
    )
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    (folder / "model.safetensors").write_bytes(_safetensors(header) + b"\0" * 32)
