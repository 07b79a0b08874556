"""The plan's numeric decisions, one rule a test: the TP vLLM picks, what its KV pool holds, the
CPU backend's sizes, llama.cpp's slots, KV types, tensor split, the output GPU's logits, and the
suggestions that change a plan. Pure calls on the real configs in specs/hub (no engine, no
Docker); the GPU sizes are declared, chosen so each rule is on its edge (issue 11 §10: these
pin down what a mutation pass found no test held).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex.facts import ModelFacts, facts_from_config
from cortex.hardware import Gpu, Inventory
from cortex.plan import CPU_RAM_SHARE, GiB, MiB, Plan, PlanError, fits_16bit, make_plan
from cortex.spec import ModelSpec, format_bytes
from cortex.specfile import parse_spec_text
from cortex.toolchain import TOOLCHAIN_VERSION

HUB = Path(__file__).resolve().parent.parent / "specs" / "hub"


def _config(repo: str) -> dict:
    [config] = (HUB / f"models--{repo.replace('/', '--')}").glob("snapshots/*/config.json")
    return json.loads(config.read_text())


L70 = facts_from_config(_config("meta-llama/Meta-Llama-3-70B-Instruct"))
L8 = facts_from_config(_config("meta-llama/Meta-Llama-3-8B-Instruct"))
MISTRAL = facts_from_config(_config("mistralai/Mistral-7B-Instruct-v0.3"))
SMOL = facts_from_config(_config("HuggingFaceTB/SmolLM2-135M-Instruct"))
GPT_OSS = facts_from_config(_config("huihui-ai/Huihui-gpt-oss-120b-BF16-abliterated"))
KV_TOKEN_8B = 2 * 32 * 8 * 128 * 2  # 2 (K, V) x layers x kv heads x head dim x 2 bytes: 128 KiB


def spec(body: str) -> ModelSpec:
    return parse_spec_text("name: m\nsource:\n  repo: x/y\n" + body, "m.yaml")


def gpus(n: int, gib: float, ram_gib: int = 64) -> Inventory:
    return Inventory([Gpu(i, int(gib * GiB)) for i in range(n)], 16, ram_gib * GiB, "declared")


def cpu_only(ram_gib: int) -> Inventory:
    return Inventory([], 16, ram_gib * GiB, "declared")


def vllm(ctx: int, extra: str = "") -> ModelSpec:
    return spec(f"engine: vllm\nresources:\n  context_length: {ctx}\n{extra}")


# ----------------------------------------------------------------------------- vLLM: TP choice


@pytest.mark.parametrize(
    "n,gib,tp",
    [(2, 80, 2), (8, 24, 8), (16, 16, 16)],
    ids=["2x80GiB-tp2", "8x24GiB-tp8", "16x16GiB-tp16"],
)
def test_auto_picks_the_smallest_tensor_parallel_size_that_holds_16_bit_70b(n: int, gib: float, tp: int) -> None:
    plan = make_plan(spec("resources:\n  context_length: 8192\n"), L70, gpus(n, gib))
    assert plan.engine == "vllm" and plan.fits and plan.tensor_parallel_size == tp
    assert len(plan.devices) == tp and plan.parallel >= 1
    assert fits_16bit(spec(""), L70, gpus(n, gib), 8192)[0]


def test_one_full_sequence_is_enough_to_stay_on_one_gpu() -> None:
    """8B BF16 on 19.5 GiB GPUs: the pool holds exactly one 8K sequence. vLLM starts with one, so
    TP 1 is chosen (not TP 2), the plan fits with no shortfall, and auto keeps vLLM."""
    two = make_plan(vllm(8192), L8, gpus(2, 19.5))
    assert two.tensor_parallel_size == 1 and two.parallel == 1 and two.fits and two.shortfall is None
    one = make_plan(spec("resources:\n  context_length: 8192\n"), L8, gpus(1, 19.5))
    assert one.engine == "vllm" and one.parallel == 1 and one.shortfall is None
    [d] = one.devices
    assert KV_TOKEN_8B * 8192 <= d.kv_cache_bytes < 2 * KV_TOKEN_8B * 8192
    assert d.total_bytes == d.capacity_bytes  # the pool is what the budget leaves: vLLM takes it all
    assert d.capacity_bytes == int(0.90 * 19.5 * GiB)  # vLLM's default gpu_memory_utilization


def test_kv_pool_sequences_and_the_default_max_num_seqs_cap() -> None:
    """parallel = full sequences in the pool (pool x shards // one sequence), at most 256."""
    p = make_plan(vllm(8192), L8, gpus(2, 19))
    assert p.tensor_parallel_size == 2 and p.fits
    assert all(d.total_bytes == d.capacity_bytes for d in p.devices)
    assert p.parallel == p.devices[0].kv_cache_bytes * 2 // (KV_TOKEN_8B * 8192) == 12
    small = make_plan(spec("engine: vllm\nresources:\n  context_length: 2048\n"), SMOL, gpus(1, 80))
    assert small.parallel == 256
    capped = make_plan(
        spec("engine: vllm\nresources:\n  context_length: 2048\nvllm:\n  max_num_seqs: 64\n"), SMOL, gpus(1, 80)
    )
    assert capped.parallel == 64


def test_fp8_kv_cache_holds_twice_the_sequences() -> None:
    auto = make_plan(vllm(8192), L8, gpus(1, 24))
    fp8 = make_plan(vllm(8192, "vllm:\n  kv_cache_dtype: fp8\n"), L8, gpus(1, 24))
    pool = auto.devices[0].kv_cache_bytes
    assert fp8.devices[0].kv_cache_bytes == pool
    assert auto.parallel == pool // (KV_TOKEN_8B * 8192)
    assert fp8.parallel == pool // (KV_TOKEN_8B // 2 * 8192)
    assert fp8.kv_cache_type == "fp8" and auto.kv_cache_type == "auto"


def test_vllm_settings_reach_the_memory_model() -> None:
    base = make_plan(vllm(8192), L8, gpus(1, 46)).devices[0]
    eager = make_plan(vllm(8192, "vllm:\n  enforce_eager: true\n"), L8, gpus(1, 46)).devices[0]
    assert base.overhead_parts["cuda_graphs"] > 0 and eager.overhead_parts["cuda_graphs"] == 0
    assert eager.kv_cache_bytes > base.kv_cache_bytes
    few = make_plan(vllm(8192, "vllm:\n  max_num_batched_tokens: 2048\n  max_num_seqs: 8\n"), L8, gpus(1, 46))
    assert few.devices[0].overhead_parts["activation"] < base.overhead_parts["activation"]
    many = make_plan(vllm(8192, "vllm:\n  max_num_batched_tokens: 32768\n"), L8, gpus(1, 46))
    assert many.devices[0].overhead_parts["activation"] > base.overhead_parts["activation"]
    fp8 = make_plan(vllm(8192, "vllm:\n  quantization: fp8\n"), L8, gpus(1, 46)).devices[0]
    assert fp8.weights_bytes < 0.6 * base.weights_bytes
    fp32 = make_plan(vllm(8192, "vllm:\n  dtype: float32\n"), L8, gpus(1, 80)).devices[0]
    assert fp32.weights_bytes > 1.9 * base.weights_bytes
    pp = make_plan(vllm(8192, "vllm:\n  pipeline_parallel_size: 2\n"), L8, gpus(2, 46))
    assert pp.tensor_parallel_size == 1 and pp.pipeline_parallel_size == 2 and len(pp.devices) == 2
    assert pp.devices[0].weights_bytes < 0.6 * base.weights_bytes


def test_a_pinned_tensor_parallel_size_is_used_and_checked_against_the_gpus() -> None:
    p = make_plan(vllm(8192, "vllm:\n  tensor_parallel_size: 2\n"), L8, gpus(4, 46))
    assert p.tensor_parallel_size == 2 and p.pipeline_parallel_size == 1 and len(p.devices) == 2 and p.fits
    exact = make_plan(vllm(8192, "vllm:\n  tensor_parallel_size: 2\n  pipeline_parallel_size: 2\n"), L8, gpus(4, 46))
    assert len(exact.devices) == 4 and exact.fits
    all4 = make_plan(vllm(8192, "vllm:\n  tensor_parallel_size: 4\n"), L8, gpus(4, 46))
    assert all4.tensor_parallel_size == 4
    with pytest.raises(PlanError, match="needs more GPUs than the 4 available"):
        make_plan(vllm(8192, "vllm:\n  tensor_parallel_size: 4\n  pipeline_parallel_size: 2\n"), L8, gpus(4, 46))


def test_when_one_sequence_does_not_fit_the_plan_says_so_and_serves_none() -> None:
    """70B BF16 on two 46 GiB GPUs: weights alone overflow each GPU; the plan keeps one sequence's
    share of KV per GPU, serves 0 and says by how much it is short."""
    p = make_plan(vllm(8192), L70, gpus(2, 46))
    assert not p.fits and p.parallel == 0 and p.tensor_parallel_size == 2
    per_seq = L70.kv_cache_bytes(8192, 2.0)
    assert all(d.kv_cache_bytes == -(-per_seq // 2) for d in p.devices)
    d = p.devices[0]
    assert p.shortfall and f"short by {format_bytes(d.total_bytes - d.capacity_bytes)}" in p.shortfall


@pytest.mark.parametrize(
    "facts,gib,ctx,want",
    [
        (L70, 80, 8192, "more GPUs: 2 x 80.00 GiB with tensor_parallel_size 2"),
        (L70, 24, 8192, "more GPUs: 8 x 24.00 GiB with tensor_parallel_size 8"),
        (L70, 16, 8192, "more GPUs: 16 x 16.00 GiB with tensor_parallel_size 16"),
        (L8, 19, 8192, "a shorter context: vllm.max_model_len 4096"),
        (L8, 18.7, 8192, "a shorter context: vllm.max_model_len 2048"),
        (MISTRAL, 18.5, 16384, "a shorter context: vllm.max_model_len 8192"),
    ],
    ids=["2-gpus", "8-gpus", "16-gpus", "half-context", "quarter-context", "16k-to-8k"],
)
def test_vllm_suggestions_name_the_smallest_change_that_fits(
    facts: ModelFacts, gib: float, ctx: int, want: str
) -> None:
    p = make_plan(vllm(ctx), facts, gpus(1, gib))
    assert not p.fits
    assert want in p.suggestions
    assert p.suggestions[-1].startswith("llama.cpp with a GGUF quantization")
    # each suggestion, applied, fits
    if want.startswith("more GPUs"):
        n = int(want.split()[2])
        assert make_plan(vllm(ctx, f"vllm:\n  tensor_parallel_size: {n}\n"), facts, gpus(n, gib)).fits
    else:
        length = int(want.split()[-1])
        assert make_plan(vllm(ctx, f"vllm:\n  max_model_len: {length}\n"), facts, gpus(1, gib)).fits


def test_vllm_on_a_cpu_host_sizes_its_kv_space_in_whole_gib() -> None:
    """vLLM's CPU backend: weights at 2 bytes a parameter, VLLM_CPU_KVCACHE_SPACE = the KV of
    every requested sequence rounded up to GiB (at least 1), 512 MiB overhead, 90% of RAM."""
    s = spec("engine: vllm\nresources:\n  context_length: 8192\n  concurrency: 10\n")
    p = make_plan(s, L8, cpu_only(128))
    [d] = p.devices
    assert p.engine == "vllm" and d.device == "cpu" and p.fits and p.shortfall is None
    assert p.tensor_parallel_size == 1 and p.max_model_len == 8192 and p.parallel == 10
    assert p.kv_cache_type == "auto" and any("CPU backend" in w for w in p.warnings)
    assert d.weights_bytes == 2 * L8.params_total
    assert p.cpu_kv_cache_gib == 10 and d.kv_cache_bytes == 10 * GiB  # 10 x 8192 x 128 KiB = 10 GiB
    assert d.overhead_bytes == 512 * MiB and d.capacity_bytes == int(128 * GiB * CPU_RAM_SHARE)
    # an fp8 KV cache halves the space asked for (it used to be sized at 2 bytes regardless)
    fp8 = make_plan(vllm(8192, "  concurrency: 10\nvllm:\n  kv_cache_dtype: fp8\n"), L8, cpu_only(128))
    assert fp8.cpu_kv_cache_gib == 5 and fp8.kv_cache_type == "fp8"
    tiny = make_plan(spec("engine: vllm\nresources:\n  context_length: 2048\n"), SMOL, cpu_only(8))
    assert tiny.cpu_kv_cache_gib == 1 and tiny.devices[0].kv_cache_bytes == GiB
    short = make_plan(s, L8, cpu_only(16))
    assert not short.fits and short.shortfall and "of RAM" in short.shortfall


def test_vllm_refuses_an_architecture_outside_its_registry() -> None:
    config = _config("HuggingFaceTB/SmolLM2-135M-Instruct") | {"architectures": ["NoSuchModelForCausalLM"]}
    with pytest.raises(PlanError, match="not in vLLM .* model registry"):
        make_plan(vllm(2048), facts_from_config(config), gpus(1, 46))


def test_fits_16bit_is_false_for_gguf_and_for_no_gpu() -> None:
    assert fits_16bit(spec(""), L8, cpu_only(64), 8192)[0] is False
    assert fits_16bit(spec(""), L8, gpus(1, 10), 8192)[0] is False
    assert fits_16bit(spec(""), L8, gpus(1, 46), 8192)[0] is True


def test_context_longer_than_the_model_is_refused() -> None:
    with pytest.raises(PlanError, match="use at most 8192"):
        make_plan(spec("resources:\n  context_length: 16384\n"), L8, gpus(1, 46))


# ----------------------------------------------------------------------------- llama.cpp


def llamacpp(body: str = "", quant: str = "auto", ctx: int = 2048, concurrency: int = 2) -> ModelSpec:
    return spec(
        f"engine: llamacpp\nquantization: {quant}\nresources:\n  context_length: {ctx}\n"
        f"  concurrency: {concurrency}\n" + (f"llamacpp:\n{body}" if body else "")
    )


def test_slots_split_the_context_and_never_exceed_the_model() -> None:
    p = make_plan(llamacpp("  context_size: 1000\n  parallel: 3\n"), SMOL, cpu_only(16))
    assert p.context == 333 and p.parallel == 3 and p.context_total == 1000
    default = make_plan(llamacpp(ctx=2048, concurrency=2), SMOL, cpu_only(16))
    assert default.context == 2048 and default.parallel == 2 and default.context_total == 4096
    with pytest.raises(PlanError, match="tokens per slot"):
        make_plan(llamacpp("  context_size: 20000\n  parallel: 2\n"), SMOL, cpu_only(16))


def test_kv_cache_type_and_bytes_follow_the_cache_types() -> None:
    """SmolLM2: 30 layers x 3 KV heads x 64 dims x K and V = 11,520 elements a token."""
    f16 = make_plan(llamacpp(), SMOL, cpu_only(16))
    assert f16.kv_cache_type == "f16" and f16.devices[0].kv_cache_bytes == 11_520 * 2 * 4096
    q8 = make_plan(llamacpp("  cache_type_k: q8_0\n  cache_type_v: q8_0\n"), SMOL, cpu_only(16))
    assert q8.kv_cache_type == "q8_0" and q8.devices[0].kv_cache_bytes == 11_520 * 34 * 4096 // 32
    mixed = make_plan(llamacpp("  cache_type_k: q8_0\n"), SMOL, cpu_only(16))
    assert mixed.kv_cache_type == "q8_0/f16"
    assert mixed.devices[0].kv_cache_bytes == 11_520 * 4096 * (34 / 32 + 2) // 2


def test_each_slot_keeps_its_own_sliding_window() -> None:
    """gpt-oss: 18 of 36 layers slide over 128 tokens; 4 slots hold 4 windows, 1 slot one."""
    one = make_plan(llamacpp("  context_size: 8192\n  parallel: 1\n"), GPT_OSS, cpu_only(512))
    four = make_plan(llamacpp("  context_size: 8192\n  parallel: 4\n"), GPT_OSS, cpu_only(512))
    per_token_layer = GPT_OSS.kv_bytes_per_token_layer(2.0)
    assert four.devices[0].kv_cache_bytes - one.devices[0].kv_cache_bytes == 18 * 3 * 128 * per_token_layer


def test_a_cpu_host_plans_the_same_weights_llama_cpp_would_offload() -> None:
    """On a CPU host every tensor is in RAM: the same bytes as over GPUs (for untied embeddings;
    a tied output layer is copied to the output GPU), and the GGUF's tensor data."""
    for facts, quant in ((L8, "Q4_K_M"), (GPT_OSS, "Q8_0"), (SMOL, "Q8_0")):
        cpu = make_plan(llamacpp(quant=quant), facts, cpu_only(512))
        gpu = make_plan(llamacpp(quant=quant), facts, gpus(2, 80))
        if not facts.tie_embeddings:
            assert cpu.devices[0].weights_bytes == sum(d.weights_bytes for d in gpu.devices)
        assert 0.97 * cpu.artifact.predicted_bytes < cpu.devices[0].weights_bytes <= cpu.artifact.predicted_bytes
    [d] = make_plan(llamacpp(quant="Q8_0"), SMOL, cpu_only(16)).devices
    assert d.capacity_bytes == int(16 * GiB * CPU_RAM_SHARE)
    assert d.overhead_bytes == sum(d.overhead_parts.values()) and set(d.overhead_parts) == {"compute", "output"}
    assert d.overhead_parts["output"] == 4 * SMOL.vocab_size * 2  # one fp32 logits row per slot


def test_gguf_artifact_is_predicted_from_the_hf_checkpoint() -> None:
    p = make_plan(llamacpp(quant="auto"), GPT_OSS, gpus(4, 46))
    assert p.quantization == "Q8_0" and p.artifact.quantization == "Q8_0"
    assert p.artifact.format == "gguf" and p.artifact.convert_from == "hf"
    assert p.artifact.predicted_bytes == pytest.approx(124.1e9, rel=0.01)  # 8.5 bits a parameter
    assert p.engine_version == TOOLCHAIN_VERSION
    assert make_plan(llamacpp(), SMOL, cpu_only(16)).tensor_split is None


def test_kv_cells_are_padded_to_256_and_flash_attention_changes_the_compute_buffer() -> None:
    """Without flash attention the KQ matrix scales with the cache cells per slot, which
    llama.cpp pads to 256: 769..1024 cells plan the same buffer, 1025 a bigger one."""

    def compute(ctx: int, fa: str, parallel: int = 1) -> int:
        body = f"  context_size: {ctx}\n  parallel: {parallel}\n  flash_attention: {fa}\n"
        return make_plan(llamacpp(body), SMOL, cpu_only(16)).devices[0].overhead_parts["compute"]

    assert compute(769, "off") == compute(1024, "off") < compute(1025, "off")
    assert compute(2048, "off", parallel=2) == compute(1024, "off")  # cells per slot
    assert compute(2048, "on") < compute(2048, "off")
    assert compute(2048, "auto") == compute(2048, "on") == compute(2048, "true")
    assert compute(2048, "false") == compute(2048, "off") == compute(2048, "'off'")  # YAML's off is False
    assert compute(8192, "on") > compute(256, "on")  # the mask grows with the cells


def test_gpu_layout_ngl_tensor_split_kv_and_the_logits_on_the_output_gpu() -> None:
    s = llamacpp(quant="Q8_0")
    even = make_plan(s, L8, gpus(2, 46))
    cpu, g0, g1 = even.devices
    assert even.ngl == 999 and even.tensor_split == [0.5, 0.5]
    assert g0.kv_cache_bytes > 0 and g1.kv_cache_bytes > 0 and cpu.kv_cache_bytes == 0
    assert g0.kv_cache_bytes + g1.kv_cache_bytes == L8.kv_cache_bytes(4096, 2.0, sequences=2)
    # both GPUs run the blocks' graph; the last one also holds the logits of every slot
    assert g1.overhead_bytes - g0.overhead_bytes == 4 * L8.vocab_size * 2
    assert all(d.overhead_bytes == sum(d.overhead_parts.values()) for d in even.devices)
    assert set(g0.overhead_parts) == {"compute"} and set(cpu.overhead_parts) == {"compute", "output"}
    # the CPU's compute buffer with every block on the GPUs is the small host one
    assert cpu.overhead_parts["compute"] < g0.overhead_parts["compute"]
    # all blocks on GPU 0: it gets the logits, GPU 1 nothing
    first = make_plan(llamacpp("  tensor_split: [1, 0]\n", quant="Q8_0"), L8, gpus(2, 46))
    _, f0, f1 = first.devices
    assert f1.weights_bytes == f1.kv_cache_bytes == f1.overhead_bytes == 0
    assert f0.overhead_bytes == g1.overhead_bytes
    assert first.tensor_split == [1.0, 0.0]
    # an uneven split moves the blocks
    skew = make_plan(llamacpp("  tensor_split: [1, 2]\n", quant="Q8_0"), L8, gpus(2, 46))
    assert skew.tensor_split == [0.3333, 0.6667]
    assert skew.devices[2].weights_bytes > 1.7 * skew.devices[1].weights_bytes
    # -ngl set: the rest of the blocks stay in RAM and the CPU runs the full graph
    partial = make_plan(llamacpp("  ngl: 10\n", quant="Q8_0"), L8, gpus(2, 46))
    assert partial.ngl == 10 and partial.devices[0].kv_cache_bytes > 0
    assert partial.devices[0].overhead_parts["compute"] == g0.overhead_parts["compute"]
    with pytest.raises(PlanError, match="one share per GPU"):
        make_plan(llamacpp("  tensor_split: [1, 1, 1]\n"), L8, gpus(2, 46))


def test_a_gguf_source_is_served_as_it_is() -> None:
    from cortex.pipeline import plan_spec_file

    specs = Path(__file__).resolve().parent.parent / "specs"
    m = plan_spec_file(specs / "smollm2-135m-instruct-community-gguf.yaml")
    assert m.plan.quantization == "Q4_1" and m.plan.artifact.quantization == "Q4_1"
    assert m.plan.artifact.convert_from is None and m.plan.artifact.format == "gguf"
    if not m.inventory.gpus:
        assert m.plan.devices[0].weights_bytes == m.facts.weights_bytes_on_disk
    text = (specs / "smollm2-135m-instruct-community-gguf.yaml").read_text()
    bad = parse_spec_text(text + "quantization: Q8_0\n", "bad.yaml")
    with pytest.raises(PlanError, match="already Q4_1"):
        make_plan(bad, m.facts, cpu_only(16))


@pytest.mark.parametrize(
    "quant,n,gib,want,absent",
    [
        ("Q8_0", 1, 64, ["a smaller quantization: Q6_K", "more GPUs: 2 x 64.00 GiB"], "a shorter context"),
        ("Q8_0", 2, 32, ["a smaller quantization: Q5_K_M", "more GPUs: 4 x 32.00 GiB"], "a shorter context"),
        (
            "Q4_K_M",
            1,
            44,
            ["a smaller quantization: Q3_K_M", "a shorter context: llamacpp.context_size 8192 (2048 per slot)"],
            None,
        ),
        (
            "Q4_K_M",
            1,
            46,
            ["a smaller quantization: Q3_K_M", "a shorter context: llamacpp.context_size 16384 (4096 per slot)"],
            None,
        ),
        ("Q4_K_M", 1, 40.5, ["a smaller quantization: Q2_K"], "a shorter context"),
        ("Q4_0", 1, 40.5, ["a smaller quantization: Q2_K"], None),  # a type outside the auto ladder
    ],
    ids=["next-quant", "4-gpus", "quarter-context", "half-context", "no-context-fits", "off-the-ladder"],
)
def test_llamacpp_suggestions_name_what_would_fit(
    quant: str, n: int, gib: float, want: list[str], absent: str | None
) -> None:
    s = llamacpp(quant=quant, ctx=8192, concurrency=4)
    p = make_plan(s, L70, gpus(n, gib))
    assert not p.fits and p.quantization == quant
    worst = max(p.devices, key=lambda d: d.total_bytes - d.capacity_bytes)
    assert p.shortfall and f"short by {format_bytes(worst.total_bytes - worst.capacity_bytes)}" in p.shortfall
    for w in want:
        assert w in p.suggestions
    assert not absent or not any(x.startswith(absent) for x in p.suggestions)
    assert p.suggestions[-1].startswith("partial offload")
    smaller = next(x.split(": ")[1] for x in p.suggestions if x.startswith("a smaller quantization"))
    assert make_plan(llamacpp(quant=smaller, ctx=8192, concurrency=4), L70, gpus(n, gib)).fits


def test_unsafe_extra_args_are_listed_for_the_chosen_engine() -> None:
    body = "  unsafe_extra_args: true\n  extra_args: ['--log-file', '/tmp/x.log', '--temp', '0.5']\n"
    p = make_plan(llamacpp(body), SMOL, cpu_only(16))
    assert [u.split(" ")[0] for u in p.unsafe_extra_args] == ["--log-file"]
    assert make_plan(llamacpp(), SMOL, cpu_only(16)).unsafe_extra_args == []


# ----------------------------------------------------------------------------- the JSON contract


def test_plan_json_carries_every_decided_value() -> None:
    p: Plan = make_plan(llamacpp("  tensor_split: [1, 2]\n", quant="Q8_0"), L8, gpus(2, 46))
    out = p.to_json()
    for key in (
        "engine",
        "engine_version",
        "quantization",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "ngl",
        "tensor_split",
        "context",
        "context_total",
        "parallel",
        "kv_cache_type",
        "cpu_kv_cache_gib",
        "fits",
        "shortfall",
        "suggestions",
        "warnings",
        "unsafe_extra_args",
    ):
        assert out[key] == getattr(p, key), key
    assert out["devices"] == [d.to_json() for d in p.devices]
    assert all(
        d["total_bytes"] == d["weights_bytes"] + d["kv_cache_bytes"] + d["overhead_bytes"] + d["reserve_bytes"]
        for d in out["devices"]
    )
    v = make_plan(vllm(8192, "vllm:\n  pipeline_parallel_size: 2\n"), L8, gpus(2, 46)).to_json()
    assert (v["tensor_parallel_size"], v["pipeline_parallel_size"], v["gpu_memory_utilization"]) == (1, 2, 0.9)
    assert v["max_model_len"] == 8192 and v["engine"] == "vllm" and v["fits"] is True


def test_vllm_serves_the_hf_checkpoint_as_it_is() -> None:
    p = make_plan(vllm(8192), L8, gpus(1, 46))
    assert p.artifact.format == "hf" and p.artifact.convert_from is None
    assert p.artifact.quantization == "BF16" and p.artifact.predicted_bytes == 2 * L8.params_total
    body = "vllm:\n  unsafe_extra_args: true\n  extra_args: ['--download-dir', '/tmp/x']\n"
    risky = make_plan(vllm(8192, body), L8, gpus(1, 46))
    assert [u.split(" ")[0] for u in risky.unsafe_extra_args] == ["--download-dir"]


def test_a_gguf_source_never_fits_as_16_bit() -> None:
    from cortex.pipeline import plan_spec_file

    m = plan_spec_file(Path(__file__).resolve().parent.parent / "specs" / "smollm2-135m-instruct-community-gguf.yaml")
    assert fits_16bit(spec(""), m.facts, gpus(1, 80), 2048)[0] is False
