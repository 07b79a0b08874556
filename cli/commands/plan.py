"""`cortex plan SPEC`: the decision trace, the memory plan and the exact launch, before anything runs.
`cortex plan SPEC --fleet [--hosts FILE]`: which hosts would run the replicas, and why."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import RenderableType

from cli.commands import add_command
from cli.options import SpecArgument
from cli.output import JsonFlag, output, table
from cortex.decide import ENGINE_NAMES, DecisionError
from cortex.engines import FlagError
from cortex.facts import FactsError, ModelFileError
from cortex.hardware import HardwareError
from cortex.fleet.inventory import HostInventory, load_hosts, local_inventory
from cortex.fleet.placement import Placement
from cortex.pipeline import PlannedModel, place_spec_file, plan_spec_file
from cortex.plan import PlanError
from cortex.spec import MAX_GPU_BYTES, MAX_GPUS, ModelSpec, format_bytes, parse_bytes
from cortex.specfile import SpecError


def register(app: typer.Typer) -> None:
    add_command(
        app,
        run,
        "plan",
        short_help="explain the engine choice, memory plan and launch for a spec",
        help="Decide the engine, plan memory per device and build the launch spec. "
        "No download, no container; no network for local sources or a warm Hub cache. "
        "With --fleet: plan the spec for every host of the fleet and say which hosts its replicas "
        "go to, and why each other host was passed over.",
    )


def _size(text: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if size > MAX_GPU_BYTES:
        raise typer.BadParameter(f"{format_bytes(size)} on one GPU is more than {format_bytes(MAX_GPU_BYTES)}")
    return size


def run(
    spec: SpecArgument,
    gpus: Annotated[
        Optional[int], typer.Option(min=0, max=MAX_GPUS, help="plan for N GPUs (overrides resources.gpus)")
    ] = None,
    gpu_memory: Annotated[
        Optional[int],
        typer.Option(parser=_size, metavar="SIZE", help="memory per GPU, e.g. 46GiB (overrides resources.gpu_memory)"),
    ] = None,
    fleet: Annotated[
        bool,
        typer.Option(
            "--fleet",
            help="place the replicas on the fleet: the hosts of --hosts, else this machine alone "
            "(hosts joined through Prefect are not read yet)",
        ),
    ] = False,
    hosts: Annotated[
        Optional[Path],
        typer.Option(
            "--hosts",
            metavar="FILE",
            help="YAML or JSON list of host inventories (name, address, labels, gpus, cpu_cores, ram_bytes, "
            "runtimes, ...); implies --fleet",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> int:
    if fleet or hosts is not None:
        if gpus is not None or gpu_memory is not None:
            print(
                "--gpus and --gpu-memory plan for one declared machine; with --fleet each host's inventory "
                "says what it has (declare hosts in --hosts FILE)",
                file=sys.stderr,
            )
            return 2
        return _run_fleet(spec, hosts, as_json)
    try:
        planned = plan_spec_file(spec, gpus=gpus, gpu_memory=gpu_memory)
    except SpecError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except ModelFileError as e:  # the model's files are bad input, as an invalid spec is: exit 2
        print(f"{spec}: cannot plan: {e}", file=sys.stderr)
        return 2
    except (FactsError, PlanError, DecisionError, FlagError, HardwareError) as e:
        print(f"{spec}: cannot plan: {e}", file=sys.stderr)
        return 1
    output(planned.to_json(), as_json, lambda _: render(planned))
    return 0


def _run_fleet(spec: str, hosts_file: Path | None, as_json: bool) -> int:
    try:
        hosts = load_hosts(hosts_file) if hosts_file is not None else [local_inventory()]
        model, placement = place_spec_file(spec, hosts)
    except SpecError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except ModelFileError as e:
        print(f"{spec}: cannot place: {e}", file=sys.stderr)
        return 2
    except (FactsError, DecisionError) as e:
        print(f"{spec}: cannot place: {e}", file=sys.stderr)
        return 1
    where = str(hosts_file) if hosts_file is not None else "this machine (local inventory; no --hosts given)"
    data = {"spec": spec, "fleet": where, **placement.to_json()}
    output(data, as_json, lambda _: render_placement(spec, model, placement, hosts, where))
    return 0


def render_placement(
    spec_path: str, spec: ModelSpec, p: Placement, hosts: list[HostInventory], where: str
) -> list[RenderableType]:
    """The placement: one row per host (fits? chosen? why), then the replicas and any shortfall."""
    sel = spec.placement
    head = [
        f"# {spec.name}  ({spec_path})",
        "",
        f"fleet: {len(hosts)} host{'s' if len(hosts) != 1 else ''} from {where}",
        f"wants {spec.replicas} replica{'s' if spec.replicas != 1 else ''}, spread {sel.spread}"
        + (f", hosts {', '.join(sel.hosts)}" if sel.hosts is not None else "")
        + (f", labels {', '.join(f'{k}={v}' for k, v in sel.labels.items())}" if sel.labels else "")
        + f", runtime {spec.runtime}",
    ]
    by_name = {h.name: h for h in hosts}

    def gpus(h: HostInventory) -> str:
        if not h.gpus:
            return f"no GPU, {format_bytes(h.ram_bytes)} RAM"
        free = {g.memory_free_mib for g in h.gpus}
        each = format_bytes(h.gpus[0].memory_free_mib * 2**20) if len(free) == 1 else "mixed"
        return f"{len(h.gpus)} x {each} free"

    rows = table(
        ("host", "hardware", "plan", "fits", "left after", "replicas", "why"),
        (
            (
                t.host,
                gpus(by_name[t.host]),
                t.plan_summary(),
                "yes" if t.fits else "NO",
                format_bytes(t.free_after) if t.free_after is not None else "-",
                ",".join(map(str, t.replicas)) or "-",
                t.reason,
            )
            for t in p.hosts
        ),
        right=("left after",),
    )
    rest = [""]
    for note in p.notes:
        rest.append(f"  note: {note}")
    for r in p.placed:
        moved = ", ".join(f"{a} -> {b}" for a, b in r.devices.items() if a != b)
        rest.append(
            f"  replica {r.replica} -> {r.host} ({r.address}): {r.plan.engine}"
            + (f" {r.plan.quantization}" if r.plan.quantization else "")
            + f", {', '.join(f'{d} {format_bytes(n)}' for d, n in r.need.items())}"
            + (f" (plan's {moved})" if moved else "")
        )
    if not p.ok:
        rest.append(f"  NOT PLACED: {p.shortfall}")
        for s in p.would_fit:
            rest.append(f"    would fit: {s}")
    return ["\n".join(head), _indent(rows), "\n".join(rest)]


def render(m: PlannedModel) -> list[RenderableType]:
    """The plan as text sections around one Rich table (memory per device)."""
    p, f = m.plan, m.facts
    out = [f"# {m.spec.name}  ({m.spec_path})", ""]
    moe = f", MoE {f.n_experts_active}/{f.n_experts} experts" if f.is_moe else ""
    swa = f", sliding window {f.sliding_window} on {f.sliding_layers}/{f.n_layers} layers" if f.sliding_window else ""
    mla = f", MLA latent {f.mla_kv_lora_rank}" if f.is_mla else ""
    out.append(
        f"model: {f.architecture} ({f.source_format}), {f.params_total / 1e9:.2f}B params"
        f"{f' ({f.params_active / 1e9:.2f}B active)' if f.is_moe else ''}, {f.n_layers} layers, "
        f"{f.n_heads} heads / {f.n_kv_heads} KV heads (GQA {f.n_gqa}) x {f.head_dim}{moe}{swa}{mla}, "
        f"context {f.max_context}, {f.dtype}{', tied embeddings' if f.tie_embeddings else ''}"
    )
    gpus = ", ".join(f"cuda:{g.index} {format_bytes(g.memory_bytes)}" for g in m.inventory.gpus) or "none"
    out.append(
        f"hardware ({m.inventory.source}): GPUs {gpus}; {m.inventory.cpu_cores} CPU cores, "
        f"{format_bytes(m.inventory.ram_bytes)} RAM available"
    )
    out += [
        "",
        f"## engine: {ENGINE_NAMES[p.engine]} {p.engine_version}" + (" (pinned by spec)" if p.decision.pinned else ""),
    ]
    for r in p.decision.trace:
        mark = "=>" if r.decided else ("+ " if r.matched else "- ")
        out.append(f"  {mark} {r.rule:<18} {r.question}  [{ENGINE_NAMES[r.engine]}]")
        out.append(f"       {'matched' if r.matched else 'not matched'}: {r.reason}")
        if r.policy and r.matched:
            out.append(f"       policy: {r.policy}")
    out.append(f"  {p.decision.why_not}")
    out += ["", "## plan"]
    settings: list[tuple[str, object]] = [
        (
            "artifact",
            f"{p.artifact.format} {p.artifact.quantization}, {format_bytes(p.artifact.predicted_bytes)}"
            + (" (converted from the HF checkpoint)" if p.artifact.convert_from else ""),
        )
    ]
    if p.engine == "vllm":
        settings += [
            ("tensor parallel", p.tensor_parallel_size),
            ("pipeline parallel", p.pipeline_parallel_size),
            ("gpu memory utilization", p.gpu_memory_utilization),
            ("max model len", p.max_model_len),
            ("sequences in KV pool", p.parallel),
        ]
        if p.cpu_kv_cache_gib:
            settings.append(("CPU KV cache space", f"{p.cpu_kv_cache_gib} GiB"))
    else:
        settings += [
            ("quantization", p.quantization),
            ("ngl", p.ngl),
            ("tensor split", ",".join(f"{x:g}" for x in p.tensor_split) if p.tensor_split else "-"),
            ("context", f"{p.context_total} total = {p.parallel} slots x {p.context}"),
            ("KV cache type", p.kv_cache_type),
        ]
    for k, v in settings:
        if v is not None:
            out.append(f"  {k:<24} {v}")
    devices = table(
        ("device", "weights", "KV cache", "overhead", "reserve", "total", "capacity", "fits"),
        (
            (
                d.device,
                format_bytes(d.weights_bytes),
                format_bytes(d.kv_cache_bytes),
                format_bytes(d.overhead_bytes),
                format_bytes(d.reserve_bytes) if d.reserve_bytes else "-",
                format_bytes(d.total_bytes),
                format_bytes(d.capacity_bytes),
                "yes" if d.fits else "NO",
            )
            for d in p.devices
        ),
        right=("weights", "KV cache", "overhead", "reserve", "total", "capacity"),
    )
    rest: list[str] = []
    overheads = [(d.device, d.overhead_parts) for d in p.devices if d.overhead_parts]
    if overheads and all(ps == overheads[0][1] for _, ps in overheads):
        overheads = [("each device" if len(overheads) > 1 else overheads[0][0], overheads[0][1])]
    for name, ps in overheads:
        words = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in ps.items())
        rest.append(f"  overhead of {name}: {words}")
    if any(d.reserve_bytes for d in p.devices):
        rest.append("  reserve: the CUDA context, which llama.cpp reports in no buffer")
    for w in p.warnings:
        rest.append(f"  warning: {w}")
    if not p.fits:
        rest.append(f"  DOES NOT FIT: {p.shortfall}")
        for s in p.suggestions:
            rest.append(f"    would fit: {s}")
    L = m.launch
    rest += [
        "",
        "## launch",
        f"  image        {L.image}",
        f"  name         {L.name}",
        f"  command      {shlex.join(L.command)}",
        "  env          "
        + ", ".join(f"{k}={'<secret:' + v['secret'] + '>' if isinstance(v, dict) else v}" for k, v in L.env.items()),
    ]
    for mnt in L.mounts:
        rest.append(
            f"  mount        {mnt.source or '(made by prepare)'} -> {mnt.target} ({'ro' if mnt.read_only else 'rw'})"
        )
    rest += [
        f"  gpus         {L.gpus or 'none'}",
        f"  port         {L.port}  health {L.health_path}",
        f"  stop timeout {L.stop_timeout_s} s",
    ]
    parts: list[RenderableType] = ["\n".join(out), _indent(devices), "\n".join(rest)]
    if p.unsafe_extra_args:  # loud, first and last: someone chose to pass flags the allow-list refuses
        banner = unsafe_banner(m)
        parts = [banner, *parts, banner]
    return parts


def unsafe_banner(m: PlannedModel) -> RenderableType:
    from rich.text import Text

    section = "vllm" if m.plan.engine == "vllm" else "llamacpp"
    lines = [
        f"!! UNSAFE: {section}.unsafe_extra_args is true, so these extra_args pass although the "
        "allow-list refuses them:"
    ]
    lines += [f"!!   {flag}" for flag in m.plan.unsafe_extra_args]
    lines.append("!! Review them before deploying; remove them, or unsafe_extra_args, to go back to the allow-list.")
    return Text("\n".join(lines), style="bold red")


def _indent(renderable: RenderableType) -> RenderableType:
    from rich.padding import Padding

    return Padding(renderable, (1, 0, 0, 2), expand=False)
