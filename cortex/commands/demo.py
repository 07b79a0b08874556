"""`cortex demo`: the main job end to end on the embedded default.

Validates and plans every example spec, starts the gateway if none answers, deploys the
SmolLM2 GGUF spec with the process runtime through the Prefect deploy flow (local Prefect),
then asks the model a question through the gateway and prints the answer. The model and the
gateway keep running afterwards; the last lines say how to talk to them and how to stop them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_SPECS = Path(__file__).resolve().parents[2] / "specs"
DEFAULT_SPEC = "smollm2-135m-instruct-gguf.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="plan the examples, deploy SmolLM2 locally and ask it something through the gateway")
    p.add_argument("--specs", type=Path, default=REPO_SPECS, help="folder of example specs (default: the repo's specs/)")
    p.add_argument("--spec", type=Path, default=None, help=f"spec to deploy (default: SPECS/{DEFAULT_SPEC})")
    p.add_argument("--prompt", default="Say hello in one short sentence.")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from cortex.pipeline import plan_spec_file
    from cortex.spec import format_bytes
    from cortex.specfile import SpecError, load_spec, spec_files

    spec_path = args.spec or args.specs / DEFAULT_SPEC
    _say(f"validate {args.specs}")
    files = spec_files([args.specs])
    for f in files:
        try:
            spec = load_spec(f)
        except SpecError as e:
            print("\n".join(map(str, e.problems)), file=sys.stderr)
            return 2
        print(f"  {f.name}: ok ({spec.source.kind})")

    _say("plan every example (no download, no GPU needed)")
    for f in files:
        m = plan_spec_file(f)
        p = m.plan
        how = (f"TP {p.tensor_parallel_size}" if p.engine == "vllm"
               else f"{p.quantization}, ngl {p.ngl}" + (f", split {','.join(f'{x:g}' for x in p.tensor_split)}" if p.tensor_split else ""))
        per = max(d.weights_bytes for d in p.devices)
        print(f"  {m.spec.name:<30} {p.engine:<9} {how:<34} weights/device {format_bytes(per):>10}  "
              f"{'fits' if p.fits else 'DOES NOT FIT'}")

    from cortex.settings import Settings

    settings = Settings.load()
    _say(f"gateway at {settings.gateway_url}")
    _ensure_gateway(settings)

    _say(f"deploy {spec_path} (process runtime, Prefect flow deploy-model)")
    from flows.deploy import deploy_model

    state = deploy_model(str(spec_path), runtime="process", gateway=True, return_state=True)
    if state.is_failed():
        try:
            state.result()
        except Exception as exc:  # the flow's error is already in its logs; say it plainly
            print(f"deploy failed: {exc}", file=sys.stderr)
            return 1
    result = state.result()
    print(f"  deployed {result['name']} ({result['engine']}) as {result['replica']}, engine at {result['endpoint']}")
    print(f"  smoke tests {'passed' if result['smoke']['passed'] else 'FAILED'}")

    _say(f"ask {result['name']} through the gateway")
    answer, key = _ask(settings, result["name"], args.prompt)
    print(f"  Q: {args.prompt}\n  A: {answer}")

    print(f"""
The model keeps serving. Talk to it:
  curl {settings.gateway_url}/v1/chat/completions -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{result['name']}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
  cortex status            # what runs
  cortex retire {result['name']}
""")
    return 0


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
        proc = subprocess.Popen([sys.executable, "-m", "cortex.cli", "gateway"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
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
    r = httpx.post(f"{settings.gateway_url}/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "max_tokens": 48, "temperature": 0,
                         "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"].strip(), key
