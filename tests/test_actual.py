"""cortex.actual on vLLM's memory lines and on logs it cannot read.

llama-server's report is read from real llama-server logs in tests/test_plan_vs_llamacpp.py
and in the deploy flow (tests/test_deploy.py); a real vLLM CPU log in tests/test_toolchain.py.
vLLM on a GPU cannot run here: those lines are written from vLLM 0.32's own format strings
(v1/worker/gpu_model_runner.py "Model loading took %s GiB memory and %.6f seconds",
v1/worker/gpu_worker.py "Available KV cache memory: %s GiB", "Graph capturing finished in %.0f
secs, took %.2f GiB"), with the worker prefixes its multiprocess executor puts before them.
"""

from __future__ import annotations

import pytest

from cortex.actual import (
    MemoryComparison,
    compare_memory,
    llamacpp_device,
    read_engine_report,
    read_vllm_report,
)
from cortex.plan import GiB, DevicePlan

VLLM_TP2 = """\
(Worker_TP0 pid=101) INFO 12-02 10:00:01 [weight_utils.py:1108] Filesystem type for checkpoints: EXT4. Checkpoint size: 14.96 GiB. Available RAM: 1000.0 GiB.
(Worker_TP1 pid=102) INFO 12-02 10:00:05 [gpu_model_runner.py:5150] Model loading took 7.5 GiB memory and 12.345678 seconds
(Worker_TP0 pid=101) INFO 12-02 10:00:05 [gpu_model_runner.py:5150] Model loading took 7.5 GiB memory and 12.401234 seconds
(Worker_TP0 pid=101) INFO 12-02 10:00:20 [gpu_worker.py:760] Available KV cache memory: 60.25 GiB
(Worker_TP1 pid=102) INFO 12-02 10:00:20 [gpu_worker.py:760] Available KV cache memory: 60.25 GiB
(EngineCore pid=100) INFO 12-02 10:00:21 [kv_cache_utils.py:2328] GPU KV cache size: 1,973,248 tokens, Maximum concurrency for 8,192 tokens per request: 240.87x
(Worker_TP0 pid=101) INFO 12-02 10:00:40 [gpu_model_runner.py:6582] Graph capturing finished in 19 secs, took 0.53 GiB
"""


def _gpu_plan(weights: float, kv: float, overhead: float, capacity: float) -> list[DevicePlan]:
    return [
        DevicePlan(f"cuda:{i}", int(weights * GiB), int(kv * GiB), int(overhead * GiB), int(capacity * GiB))
        for i in range(2)
    ]


def test_vllm_gpu_workers_become_devices_with_weights_kv_and_derived_overhead() -> None:
    report = read_vllm_report(VLLM_TP2)
    assert [d.device for d in report.devices] == ["cuda:0", "cuda:1"]  # by TP rank, not by line order
    assert all(d.weights_bytes == int(7.5 * GiB) and d.kv_cache_bytes == int(60.25 * GiB) for d in report.devices)
    assert len(report.lines) == 5 and not any("Checkpoint size" in line for line in report.lines)

    comparison = compare_memory(_gpu_plan(7.47, 59.93, 2.5, 70.25), report)
    rows = {(r.device, r.term): r for r in comparison.rows}
    assert not any(r.off for r in comparison.rows) and comparison.warnings == ()
    overhead = rows["cuda:0", "overhead"]  # vLLM's budget less weights and KV cache
    assert overhead.derived and overhead.actual_bytes == int(70.25 * GiB) - int(7.5 * GiB) - int(60.25 * GiB)

    # A plan whose KV pool is 25% larger than what vLLM found room for: a warning naming the term.
    off = compare_memory(_gpu_plan(7.47, 80.0, 2.5, 70.25), report)
    assert {(r.device, r.term) for r in off.rows if r.off} == {("cuda:0", "kv_cache"), ("cuda:1", "kv_cache")}
    assert off.warnings[:2] == (
        "cuda:0: KV cache is -25% off the plan (planned 80.00 GiB, vLLM reports 60.25 GiB)",
        "cuda:1: KV cache is -25% off the plan (planned 80.00 GiB, vLLM reports 60.25 GiB)",
    )


def test_vllm_cpu_reports_its_kv_cache_and_checkpoint() -> None:
    log = (
        "(Worker pid=7) INFO 12-02 10:00:01 [weight_utils.py:1108] Filesystem type for checkpoints: EXT4. "
        "Checkpoint size: 0.25 GiB. Available RAM: 19.68 GiB.\n"
        "(Worker pid=7) INFO 12-02 10:00:30 [cpu_worker.py:260] Explicitly set (1.0/23.54) GiB for KV cache on node 0.\n"
    )
    [cpu] = read_vllm_report(log).devices
    assert (cpu.device, cpu.weights_bytes, cpu.kv_cache_bytes, cpu.overhead_bytes) == ("cpu", GiB // 4, GiB, None)
    plan = [DevicePlan("cpu", 269_060_352, GiB, 512 * 2**20, 20 * GiB)]
    comparison = compare_memory(plan, read_vllm_report(log))
    assert comparison.warnings == ()  # no overhead figure on CPU, and none expected
    assert [(r.term, r.off) for r in comparison.rows] == [("weights", False), ("kv_cache", False), ("overhead", False)]


@pytest.mark.parametrize(
    "engine,log",
    [
        (
            "vllm",
            VLLM_TP2.replace("Model loading took", "Loaded model in").replace("Available KV cache memory", "KV memory"),
        ),
        ("vllm", ""),
        ("llamacpp", "\x00\xff garbage\nload_tensors:   CPU_Mapped model buffer size = lots MiB\n"),
        ("sglang", "anything"),
    ],
)
def test_an_unreadable_report_is_a_typed_result_and_one_warning(engine: str, log: str) -> None:
    report = read_engine_report(engine, log)
    assert not report.readable and report.problem and report.devices == ()
    comparison = compare_memory(_gpu_plan(7.5, 60, 2.5, 70), report)
    [warning] = comparison.warnings
    assert "memory report could not be read" in warning and comparison.rows == ()
    again = MemoryComparison.from_json(comparison.to_json())  # the stored record reads back
    assert again == comparison


def test_llamacpp_buffer_types_map_to_plan_devices() -> None:
    assert [
        llamacpp_device(b)
        for b in ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host", "CUDA0", "CUDA1", "ROCm2", "Vulkan0")
    ] == ["cpu", "cpu", "cpu", "cpu", "cuda:0", "cuda:1", "cuda:2", "vulkan0"]
