"""Progress of long work: plain lines off a terminal (CI, logs), bounded in number; live Rich bars
on a terminal; events for sinks (the Prefect progress artifacts). The first tests are pure; the
rest run the real steps: a download by the real huggingface_hub client from a local Hub endpoint,
the converter and llama-quantize, a llama-server start and a benchmark of two levels."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import pytest

from cortex.artifacts import converter_progress, quantize_progress
from cortex.engines import startup_phase
from cortex.progress import ProgressEvent, Reporter, progress, step_of

LINE = re.compile(r"^cortex: (?P<label>[^:]+): (?P<body>.*) \((?P<seconds>\d+) s\)$")


def _plain() -> tuple[io.StringIO, Reporter]:
    out = io.StringIO()
    return out, Reporter(stream=out, every_s=3600)  # no time-based lines: the count is exact


def _lines(out: io.StringIO, label_start: str = "") -> list[str]:
    lines = [line for line in out.getvalue().splitlines() if line.startswith(f"cortex: {label_start}")]
    assert all(LINE.match(line) for line in lines), lines
    return lines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_say_start_each_tenth_and_end() -> None:
    out = io.StringIO()
    with progress("building llama.cpp", unit="steps", stream=out, every_s=3600) as bar:
        for n in range(1, 211):
            bar.update(n, total=210)
    lines = out.getvalue().splitlines()
    assert lines[0] == "cortex: building llama.cpp: started (0 s)"
    assert len(lines) == 1 + 9 + 1, lines  # started, each tenth up to 90%, done: not one line per step
    assert "21/210 steps" in lines[1] and "steps/s, ETA" in lines[1]
    assert lines[-1].startswith("cortex: building llama.cpp: 210/210 steps, done (")


def test_a_failure_is_said_and_raised() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress("download", total=100, unit="MB", stream=out) as bar:
        bar.update(5)
        raise RuntimeError("disk full")
    assert out.getvalue().splitlines()[-1].startswith("cortex: download: 5/100 MB, failed (")


def test_bytes_show_size_percent_rate_and_eta_phases_are_said_once() -> None:
    out, reporter = _plain()
    with reporter.task("download model.safetensors", total=269_060_000, unit="bytes", initial=60_000_000) as bar:
        for done in [*range(61_000_000, 269_000_001, 1_000_000), 269_060_000]:
            bar.update(done)
    lines = _lines(out)
    assert lines[0].endswith(", started (0 s)")
    assert "60.0 MB/269.1 MB (22%)" in lines[0]  # resumed: the bytes on disk count from the start
    assert re.search(r"\d+\.\d MB/269\.1 MB \(\d+%\), [\d.]+ [kMGT]?B/s, ETA \d+ s", lines[1]), lines[1]
    assert len(lines) <= 1 + 9 + 1 and lines[-1].startswith("cortex: download model.safetensors: 269.1 MB/269.1 MB")

    out, reporter = _plain()
    with reporter.task("engine llamacpp-model-x", done_word="ready") as bar:
        for phase in ["starting", "loading model", "loading model", "model loaded", "model loaded"]:
            bar.phase(phase)
    said = [LINE.match(line)["body"] for line in _lines(out)]
    assert said == ["started", "starting", "loading model", "model loaded", "ready"]


def test_sinks_see_every_change_and_the_end() -> None:
    seen: list[ProgressEvent] = []
    out, reporter = _plain()
    with reporter.with_sink(seen.append).task("benchmark concurrency 2", total=4, unit="requests") as bar:
        for _ in range(4):
            bar.advance()
    assert [e.state for e in seen] == ["started", "running", "running", "running", "running", "done"]
    assert [e.fraction for e in seen] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError), reporter.with_sink(seen.append).task("x") as bar:
        raise ValueError
    assert seen[-1].state == "failed" and seen[-1].fraction is None


def test_a_terminal_gets_live_bars_shared_by_threads(monkeypatch) -> None:
    """Rich allows one live display at a time: bars of two threads at once share it."""
    monkeypatch.setenv("COLUMNS", "160")
    term = _Terminal()
    reporter = Reporter(stream=term)
    inside = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(name: str, unit: str) -> None:
        try:
            with reporter.task(name, total=1_000_000, unit=unit) as bar:
                inside.wait(timeout=30)
                bar.update(500_000)
                inside.wait(timeout=30)
                bar.update(1_000_000)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=("download a.safetensors", "bytes")),
        threading.Thread(target=work, args=("quantize a F16 -> Q8_0", "tensors")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    screen = term.getvalue()
    assert "download a.safetensors" in screen and "quantize a F16 -> Q8_0" in screen
    assert "1.0 MB/1.0 MB" in screen and "1000000/1000000 tensors" in screen
    assert "cortex: " not in screen  # bars, not plain lines


def test_step_counters_of_ninja_and_llama_quantize() -> None:
    assert step_of("[17/210] Building CXX object src/llama.cpp.o") == (17, 210)
    assert step_of("[  17/ 272] blk.0.attn_k.weight - [576, 192, 1, 1], type = f16") == (17, 272)
    assert step_of("[ 42%] Built target ggml") is None and step_of("INFO: [1/2]") is None


# --- the real steps ----------------------------------------------------------------------------


def test_a_download_from_the_hub_shows_each_file_in_plain_lines(test_model, tmp_path, monkeypatch) -> None:
    """The real huggingface_hub client (http_get for the weights, snapshot_download for the
    small files) against a local Hub endpoint serving the SmolLM2 checkpoint."""
    from cortex import hub
    from hubserver import HubRepo, HubServer

    repo = HubRepo.from_folder("acme/smollm2-progress", Path(test_model.hf_dir))
    server = HubServer([repo]).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CORTEX_CACHE", str(tmp_path / "cortex"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out, reporter = _plain()
    try:
        snap = hub.fetch("acme/smollm2-progress", "main", progress=reporter)
    finally:
        server.stop()
    weights = next(f for f in snap.files if f.path.endswith(".safetensors"))
    small = [f for f in snap.files if f.sha256 is None]
    lines = _lines(out)
    mine = _lines(out, f"download {weights.path}")
    assert mine[0].endswith("started (0 s)") and ", done (" in mine[-1]
    assert f"{weights.size / 1e6:.1f} MB/{weights.size / 1e6:.1f} MB (100%)" in mine[-1]
    assert len(mine) <= 1 + 9 + 1, mine
    smalls = _lines(out, f"download {len(small)} small files")
    assert smalls[0].endswith("started (0 s)") and ", done (" in smalls[-1] and "(100%)" in smalls[-1]
    assert len(lines) == len(mine) + len(smalls)  # one bar per large file, one for the small ones

    again = io.StringIO()
    hub.fetch("acme/smollm2-progress", "main", progress=Reporter(stream=again))
    assert again.getvalue() == ""  # nothing to fetch: nothing to show


def test_conversion_and_quantization_move_their_bars(test_model, toolchain, tmp_path) -> None:
    """The real convert_hf_to_gguf.py and llama-quantize, through cortex.artifacts.build_gguf."""
    from cortex.artifacts import ArtifactStore, build_gguf

    out, reporter = _plain()
    seen: list[ProgressEvent] = []
    weights = sum(p.stat().st_size for p in Path(test_model.hf_dir).glob("*.safetensors"))
    build_gguf(
        Path(test_model.hf_dir),
        source_id="progress-test",
        quantization="Q8_0",
        toolchain=toolchain,
        model_name="SmolLM2",
        architecture="llama",
        source={"test": True},
        weights_bytes=weights,
        store=ArtifactStore(tmp_path / "artifacts"),
        progress=reporter.with_sink(seen.append),
    )
    convert = _lines(out, "convert SmolLM2 to F16")
    assert convert[0].endswith("started (0 s)") and ", done (" in convert[-1]
    assert any(", writing" in line for line in convert)  # the writer's phase, then its bytes
    assert re.search(r"\d+\.\d MB/\d+\.\d MB \(100%\), done", convert[-1]), convert[-1]
    quantize = _lines(out, "quantize SmolLM2 F16 -> Q8_0")
    assert quantize[0].endswith("started (0 s)") and "272/272 tensors, done" in quantize[-1]
    assert len(convert) <= 1 + 1 + 9 + 1 and len(quantize) <= 1 + 9 + 1, (convert, quantize)
    ends = [e for e in seen if e.state == "done"]
    assert [e.label for e in ends] == ["convert SmolLM2 to F16", "quantize SmolLM2 F16 -> Q8_0"]
    assert ends[1].total == 272 and ends[0].total and ends[0].done == pytest.approx(ends[0].total, rel=0.01)


def test_converter_and_quantize_lines_as_the_tools_print_them() -> None:
    """The formats the parsers read, copied from the pinned tools' output (the test above runs them)."""
    seen: list[ProgressEvent] = []
    with Reporter(display=False, sinks=[seen.append]).task("convert", unit="bytes") as bar:
        on_line = converter_progress(bar)
        for line in [
            "INFO:hf-to-gguf:blk.0.attn_k.weight,         torch.bfloat16 --> F16, shape = {576, 192}",
            "INFO:gguf.gguf_writer:/tmp/f16.gguf: n_tensors = 272, total_size = 269.1M",
            "Writing:  21%|██        | 56.6M/269M [00:00<00:02, 99.5Mbyte/s]",
        ]:
            on_line(line)
    assert seen[1].note == "1 tensors read"
    assert (seen[-2].done, seen[-2].total, seen[-2].note) == (56.6e6, 269.1e6, "writing")
    with Reporter(display=False, sinks=[seen.append]).task("quantize", unit="tensors") as bar:
        quantize_progress(bar)("[ 271/ 272] blk.29.ffn_norm.weight - [ 576, 1, 1, 1], type = f32, size = 0.002 MiB")
    assert (seen[-2].done, seen[-2].total) == (271, 272)


def test_engine_start_shows_its_phases_until_ready(toolchain, test_model, tmp_path) -> None:
    from cortex.runtime.process import ProcessRuntime
    from runtime_helpers import SECRETS, llamacpp_launch

    runtime = ProcessRuntime(state_dir=tmp_path / "state")
    out, reporter = _plain()
    replica = runtime.start(llamacpp_launch(test_model.gguf, "smollm2"), SECRETS)
    try:
        runtime.wait_ready(replica, timeout_s=120, progress=reporter)
        # what the phases are read from: this llama-server's own log, once it is up
        assert startup_phase("llamacpp", runtime.logs(replica, lines=200)) == "listening"
    finally:
        runtime.stop(replica)
    lines = _lines(out)
    assert lines[0] == f"cortex: engine {replica.name}: started (0 s)"
    assert LINE.match(lines[-1])["body"] == "ready"
    phases = [LINE.match(line)["body"] for line in lines[1:-1]]
    known = {"starting", "loading model", "initializing slots", "model loaded", "listening"}
    assert set(phases) <= known and len(phases) == len(set(phases)), phases  # each phase said once


def test_llama_server_and_vllm_log_lines_name_their_phase() -> None:
    assert startup_phase("llamacpp", "0.00.012 I srv    load_model: loading model '/m.gguf'\n") == "loading model"
    assert startup_phase("llamacpp", "x\n0.02.858 I srv  llama_server: model loaded\n") == "model loaded"
    assert startup_phase("llamacpp", "nothing yet") is None
    assert (
        startup_phase("vllm", "INFO 01-01 [gpu_model_runner.py:5040] Starting to load model /m...") == "loading weights"
    )
    assert (
        startup_phase("vllm", "INFO [core.py] init engine (profile, create kv cache, warmup model) took 3.2 s")
        == "engine initialized"
    )


def test_a_benchmark_of_two_levels_shows_requests_per_level(llama_server) -> None:
    from cortex.bench import BenchmarkSettings, benchmark

    out, reporter = _plain()
    settings = BenchmarkSettings(concurrency=[1, 2], requests=4, input_len=16, output_len=8)
    result = benchmark(llama_server.base_url, settings, api_key=llama_server.api_key, progress=reporter)
    assert [level.completed for level in result.levels] == [4, 4]
    for conc in (1, 2):
        lines = _lines(out, f"benchmark concurrency {conc}")
        assert lines[0].endswith("started (0 s)") and "4/4 requests, done" in lines[-1]
        assert len(lines) <= 1 + 4 + 1  # one per request at most here (each is a new tenth), start, end
