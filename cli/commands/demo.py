"""`cortex demo`: the main job end to end on the embedded default.

Validates and plans every example spec, starts the gateway if none answers, then takes
SmolLM2-135M-Instruct from its HF checkpoint through the whole pipeline with the process
runtime and local Prefect: the prepare-model flow (resolve, plan, convert_hf_to_gguf.py to F16,
llama-quantize to the type the plan picked) and the deploy-model flow (engine picked by the
rules, start, ready, smoke tests, benchmark, gateway). Each step is printed with the time
Prefect recorded for it, and the last step asks the model a question through the gateway.

The default spec is the example `specs/smollm2-135m-instruct.yaml` with its Hub source
replaced by the test model's local checkpoint (no Hub is needed; `./dev setup` installs it);
it is written to `<CORTEX_HOME>/demo/`. `--spec` deploys any other spec instead. A second run
reuses the converted and quantized files from the artifact cache. The model and the gateway
keep running afterwards; the last lines say how to talk to them and how to stop them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.commands import add_command

REPO_SPECS = Path(__file__).resolve().parents[2] / "specs"
DEFAULT_SPEC = "smollm2-135m-instruct.yaml"  # its source is replaced by the local checkpoint


def register(app: typer.Typer) -> None:
    add_command(
        app, run, "demo", help="plan the examples, deploy SmolLM2 locally and ask it something through the gateway"
    )


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(
    specs: Annotated[
        Path, typer.Option(help="folder of example specs (default: the repo's specs/)", show_default=False)
    ] = REPO_SPECS,
    spec: Annotated[
        Optional[Path],
        typer.Option(help=f"spec to deploy (default: SPECS/{DEFAULT_SPEC} from the test model's local HF checkpoint)"),
    ] = None,
    prompt: Annotated[str, typer.Option()] = "Say hello in one short sentence.",
) -> int:
    from cortex.pipeline import plan_spec_file
    from cortex.spec import format_bytes
    from cortex.specfile import SpecError, load_spec, spec_files

    _say(f"validate {specs}")
    files = spec_files([specs])
    for f in files:
        try:
            loaded = load_spec(f)
        except SpecError as e:
            print("\n".join(map(str, e.problems)), file=sys.stderr)
            return 2
        print(f"  {f.name}: ok ({loaded.source.kind})")

    _say("plan every example (no download, no GPU needed)")
    for f in files:
        m = plan_spec_file(f)
        p = m.plan
        how = (
            f"TP {p.tensor_parallel_size}"
            if p.engine == "vllm"
            else f"{p.quantization}, ngl {p.ngl}"
            + (f", split {','.join(f'{x:g}' for x in p.tensor_split)}" if p.tensor_split else "")
        )
        per = max(d.weights_bytes for d in p.devices)
        print(
            f"  {m.spec.name:<30} {p.engine:<9} {how:<34} weights/device {format_bytes(per):>10}  "
            f"{'fits' if p.fits else 'DOES NOT FIT'}"
        )

    from cortex.settings import Settings

    settings = Settings.load()
    _say(f"gateway at {settings.gateway_url}")
    _ensure_gateway(settings)

    spec_path = spec or _local_checkpoint_spec(specs / DEFAULT_SPEC, Path(settings.home) / "demo")
    if spec_path is None:
        return 1
    from cli.commands.local_prefect import ensure_api, run_flow
    from flows.deploy import deploy_model
    from flows.prepare import prepare_model

    api = ensure_api()
    _say(f"Prefect at {api} (the UI shows every run below: {api.removesuffix('/api')}/runs)")
    _say(f"prepare {spec_path} (Prefect flow prepare-model)")
    outcome = run_flow("prepare", prepare_model, str(spec_path))
    if outcome.exit_code:
        return outcome.exit_code
    prepared = outcome.result
    tools = [f"{step['what']:<36} {step['seconds']:>7.1f} s" for step in prepared.build_steps]
    if prepared.format == "gguf" and not tools:
        tools = ["(the converted and quantized files came from the artifact cache)"]
    _print_steps(outcome.flow_run_id, {"build-gguf": tools})
    print(f"  {prepared.engine} will load {prepared.format} {prepared.quantization}: {prepared.artifact_path}")

    _say(f"deploy {spec_path} (Prefect flow deploy-model, process runtime)")
    outcome = run_flow("deploy", deploy_model, str(spec_path), runtime="process", gateway=True)
    if outcome.exit_code:
        return outcome.exit_code
    result = outcome.result.to_json()
    _print_steps(outcome.flow_run_id)
    print(
        f"  deployed {result['name']} ({result['engine']}) as {result['replica']}, engine at {result['endpoint']}"
        + (" (the same launch was already serving: tested again)" if result.get("reused") else "")
    )
    print(f"  smoke tests {'passed' if result['smoke']['passed'] else 'FAILED'}")
    for level in (result.get("benchmark") or {}).get("levels", []):
        print(
            f"  benchmark c={level['concurrency']:<3} {level['output_tokens_per_s']:>8.1f} output tok/s  "
            f"TTFT p50 {level['ttft_ms_p50']:.0f} ms  errors {level['errors']}"
        )

    _say(f"ask {result['name']} through the gateway")
    started = time.monotonic()
    answer, key = _ask(settings, result["name"], prompt)
    print(f"  Q: {prompt}\n  A: {answer}\n  ({time.monotonic() - started:.1f} s)")

    print(f"""
The model keeps serving. Talk to it:
  curl {settings.gateway_url}/v1/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{result["name"]}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
  cortex status            # what runs
  cortex retire {result["name"]}
""")
    return 0


def _local_checkpoint_spec(example: Path, folder: Path) -> Path | None:
    """The example HF spec with its Hub source replaced by the test model's local checkpoint,
    written into `folder`; None (with the reason on stderr) when the test model is missing."""
    import yaml

    from cortex import toolchain as tc

    try:
        model = tc.find_test_model()
    except tc.ToolchainMissing as missing:
        print(f"cortex demo: {missing}", file=sys.stderr)
        return None
    data = yaml.safe_load(example.read_text())
    data["source"] = {"path": str(model.hf_dir)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / example.name
    path.write_text(
        f"# Written by `cortex demo`: {example.name} with its Hub source replaced by the test model's\n"
        "# local HF checkpoint (no Hub needed). The pipeline converts and quantizes it as it would a download.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    print(f"  spec {path}: {example.name} from the local checkpoint {model.hf_dir}")
    return path


def _print_steps(flow_run_id, details: dict[str, list[str]] | None = None) -> None:
    """Each task run of the flow run and of its subflows, grouped by flow, with the times
    Prefect recorded; `details` adds lines under a task of that name."""
    for flow_name, flow_seconds, tasks in _flow_tree(flow_run_id):
        print(f"  {flow_name + ' flow':<40} {flow_seconds:>7.1f} s")
        for name, seconds, note in tasks:
            print(f"    {name:<38} {seconds:>7.1f} s{note}")
            for line in (details or {}).get(name, []):
                print(f"      {line}")


def _flow_tree(flow_run_id) -> list[tuple[str, float, list[tuple[str, float, str]]]]:
    """[(flow name, seconds, [(task name, seconds, note)])] for the flow run and its subflows,
    each in the order it started; a subflow's placeholder task run is left out (its own tasks
    are listed under it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
            )
            flows += children
            frontier = [c.id for c in children]
        placeholders = {f.parent_task_run_id for f in flows}
        names = {f.flow_id: client.read_flow(f.flow_id).name for f in flows}
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in flows]))
        )

    def started(run):
        return run.start_time or run.expected_start_time or run.created

    tree = []
    for flow in sorted(flows, key=started):
        tasks = []
        for run in sorted((r for r in runs if r.flow_run_id == flow.id and r.id not in placeholders), key=started):
            note = "" if run.state is None or run.state.is_completed() else f"  ({run.state.name})"
            tasks.append((run.name.rsplit("-", 1)[0], run.total_run_time.total_seconds(), note))
        tree.append((names[flow.flow_id], flow.total_run_time.total_seconds(), tasks))
    return tree


def _gateway_up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_gateway(settings) -> None:
    url = settings.gateway_url
    if _gateway_up(url):
        print("  already running")
        return
    log = Path(settings.home).expanduser() / "gateway" / "gateway.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "gateway"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=os.environ.copy(),
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _gateway_up(url):
            print(f"  started (pid {proc.pid}, log {log})")
            return
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited with {proc.returncode}; see {log}")
        time.sleep(0.3)
    raise SystemExit(f"the gateway did not answer at {url} within 60 s; see {log}")


def _ask(settings, model: str, prompt: str) -> tuple[str, str]:
    import httpx

    from cortex.gateway.client import GatewayClient

    with GatewayClient(settings) as gw:
        key = gw.create_key(name="demo", models=[model])["key"]
    r = httpx.post(
        f"{settings.gateway_url}/v1/chat/completions",
        timeout=120,
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "max_tokens": 48, "temperature": 0, "messages": [{"role": "user", "content": prompt}]},
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"].strip(), key
