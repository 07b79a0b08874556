"""Pick the engine: the seed's decision tree, kept as data (cortex/data/decision-rules.yaml).

Each rule is a question with a condition and an engine. The first rule that matches decides;
all rules are evaluated so the trace says, for every rule, whether it matched and why, and
why the other engine was not chosen. The conditions are a small vocabulary of named facts
(`CONDITIONS`), so an operator can reorder or edit rules without touching code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from cortex.facts import ModelFacts
from cortex.spec import format_bytes

ENGINES = ("vllm", "llamacpp")
ENGINE_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp"}


class DecisionError(Exception):
    pass


@dataclass(frozen=True)
class DecisionInput:
    """Everything the rules look at, already computed (the rules do no I/O)."""

    facts: ModelFacts
    concurrency: int
    vllm_version: str
    vllm_architectures: frozenset[str]
    fits_16bit: bool
    fits_16bit_reason: str


@dataclass
class RuleResult:
    rule: str
    question: str
    matched: bool
    reason: str
    engine: str  # the engine this rule points to
    decided: bool = False
    policy: str | None = None


@dataclass
class Decision:
    engine: str
    pinned: bool
    trace: list[RuleResult] = field(default_factory=list)
    why_not: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "pinned": self.pinned,
            "trace": [asdict(r) for r in self.trace],
            "why_not": self.why_not,
        }


# --------------------------------------------------------------------------- conditions


def _architecture_in(x: DecisionInput, names: list[str]) -> tuple[bool, str]:
    f = x.facts
    have = {f.architecture, f.model_type}
    hit = have & set(names)
    if hit:
        return True, f"architecture {f.architecture} ({f.model_type}) is listed"
    return False, f"architecture {f.architecture} is not one of {', '.join(names)}"


def _source_format(x: DecisionInput, want: str) -> tuple[bool, str]:
    have = x.facts.source_format
    label = {"gguf": "a GGUF file", "hf": "an HF checkpoint"}
    return have == want, f"the source is {label.get(have, have)}"


def _vllm_supports(x: DecisionInput, want: bool) -> tuple[bool, str]:
    f = x.facts
    if f.source_format == "gguf":
        return (want is False), f"a GGUF source has no HF architecture for vLLM {x.vllm_version} to load"
    ok = f.architecture in x.vllm_architectures
    why = f"{f.architecture} is {'in' if ok else 'not in'} vLLM {x.vllm_version}'s model registry"
    return ok == want, why


def _concurrency_at_least(x: DecisionInput, n: int) -> tuple[bool, str]:
    c = x.concurrency
    return c >= n, f"resources.concurrency is {c} ({'>=' if c >= n else '<'} {n})"


def _fits_16bit(x: DecisionInput, want: bool) -> tuple[bool, str]:
    return x.fits_16bit == want, x.fits_16bit_reason


CONDITIONS: dict[str, Callable[[DecisionInput, Any], tuple[bool, str]]] = {
    "architecture_in": _architecture_in,
    "source_format": _source_format,
    "vllm_supports_architecture": _vllm_supports,
    "concurrency_at_least": _concurrency_at_least,
    "fits_16bit": _fits_16bit,
}


# --------------------------------------------------------------------------- rules as data


@dataclass(frozen=True)
class Rule:
    id: str
    question: str
    condition: dict[str, Any]
    engine: str
    policy: str | None = None


# Parsed rules by (file, mtime, size): parsing the YAML takes about 2 ms, 25 times what the rest of
# a plan takes, and placement plans a spec for every kind of host. An edited file is read again.
_PARSED_RULES: dict[tuple[str, int, int], list[Rule]] = {}


# What each condition takes, checked when the rules are read: a wrong argument is an error that
# names the rule, not a TypeError (or a rule that silently never matches) while a plan is made.
ARGUMENTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "architecture_in": (
        lambda a: type(a) is list and bool(a) and all(type(n) is str and n for n in a),
        "a list of architecture names",
    ),
    "source_format": (lambda a: a in ("hf", "gguf"), "hf or gguf"),
    "vllm_supports_architecture": (lambda a: type(a) is bool, "true or false"),
    "concurrency_at_least": (lambda a: type(a) is int and a >= 1, "a whole number of requests, at least 1"),
    "fits_16bit": (lambda a: type(a) is bool, "true or false"),
}


def load_rules(path: Path | None = None) -> list[Rule]:
    file = path or resources.files("cortex.data").joinpath("decision-rules.yaml")
    if not isinstance(file, Path):  # a packaged resource without a path (a zip): no mtime to key on
        return _parse_rules(file.read_text(), "cortex/data/decision-rules.yaml")
    st = file.stat()
    key = (str(file), st.st_mtime_ns, st.st_size)
    if key not in _PARSED_RULES:
        _PARSED_RULES[key] = _parse_rules(file.read_text(), str(file))
    return list(_PARSED_RULES[key])


def _parse_rules(text: str, source: str) -> list[Rule]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DecisionError(f"{source}: not valid YAML: {exc}") from None
    items = data.get("rules") if type(data) is dict else None
    if type(items) is not list:
        raise DecisionError(f"{source}: expected a mapping with a `rules` list")
    rules: list[Rule] = []
    for i, r in enumerate(items):
        where = f"{source}: decision rule {i + 1}"
        if type(r) is not dict:
            raise DecisionError(f"{where}: expected a mapping with id, question, if and then")
        rid = r.get("id")
        if type(rid) is not str or not rid:
            raise DecisionError(f"{where}: `id` must be a non-empty string")
        where += f" ({rid})"
        if any(rule.id == rid for rule in rules):
            raise DecisionError(f"{where}: another rule has this id; ids name rules in the trace")
        condition = r.get("if") or {}
        if type(condition) is not dict:
            raise DecisionError(f"{where}: `if` must be a mapping of condition: argument (empty for the default)")
        unknown = set(condition) - set(CONDITIONS)
        if unknown:
            raise DecisionError(
                f"{where}: unknown condition {', '.join(sorted(map(str, unknown)))}; known: {', '.join(CONDITIONS)}"
            )
        for name, arg in condition.items():
            check, expected = ARGUMENTS[name]
            if not check(arg):
                raise DecisionError(f"{where}: {name} takes {expected}, got {arg!r}")
        if r.get("then") not in ENGINES:
            raise DecisionError(f"{where}: `then` must be one of {', '.join(ENGINES)}")
        rules.append(Rule(rid, str(r.get("question", rid)), dict(condition), r["then"], r.get("policy")))
    if not rules or rules[-1].condition:
        raise DecisionError(f"{source}: the decision rules must end with a default rule (an empty `if`)")
    return rules


@cache
def vllm_architectures(version: str) -> frozenset[str]:
    """vLLM's supported architectures for `version`, from the data file made from vLLM's registry."""
    name = f"vllm-architectures-{version}.txt"
    ref = resources.files("cortex.data").joinpath(name)
    if not ref.is_file():
        raise DecisionError(
            f"no architecture list for vLLM {version} (cortex/data/{name}); Cortex knows the versions it has lists for"
        )
    return frozenset(line.strip() for line in ref.read_text().splitlines() if line.strip() and not line.startswith("#"))


def decide(x: DecisionInput, *, pinned: str | None = None, rules: list[Rule] | None = None) -> Decision:
    rules = rules if rules is not None else load_rules()
    trace: list[RuleResult] = []
    chosen: str | None = None
    for rule in rules:
        reasons = []
        matched = True
        for name, arg in rule.condition.items():
            ok, why = CONDITIONS[name](x, arg)
            matched = matched and ok
            reasons.append(why)
        reason = "; ".join(reasons) if reasons else "no earlier rule decided"
        res = RuleResult(rule.id, rule.question, matched, reason, rule.engine, policy=rule.policy)
        if matched and chosen is None:
            res.decided = True
            chosen = rule.engine
        trace.append(res)
    assert chosen is not None  # load_rules guarantees a default rule
    if pinned and pinned != "auto":
        other = chosen if chosen != pinned else None
        why_not = f"engine pinned by the spec (engine: {pinned}); the rules alone would pick {ENGINE_NAMES[chosen]}" + (
            f" (rule {next(r.rule for r in trace if r.decided)})" if other else ""
        )
        return Decision(pinned, True, trace, why_not)
    return Decision(chosen, False, trace, _why_not(trace, chosen))


def _why_not(trace: list[RuleResult], chosen: str) -> str:
    other = "llamacpp" if chosen == "vllm" else "vllm"
    decided = next(r for r in trace if r.decided)
    before = [r for r in trace[: trace.index(decided)] if r.engine == other]
    after = [r for r in trace[trace.index(decided) + 1 :] if r.engine == other and r.matched]
    parts = [f"{ENGINE_NAMES[other]} was not chosen: rule {decided.rule} decided first ({decided.reason})"]
    for r in before:
        parts.append(f"rule {r.rule} did not match ({r.reason})")
    for r in after:
        parts.append(f"rule {r.rule} would have matched but comes later")
    return "; ".join(parts)


def describe_fit(weights: int, kv: int, overhead: int, capacity: int) -> str:
    need = weights + kv + overhead
    verdict = "fits" if need <= capacity else "does not fit"
    return (
        f"FP16/BF16 needs {format_bytes(need)} (weights {format_bytes(weights)} + KV {format_bytes(kv)} + "
        f"overhead {format_bytes(overhead)}) against {format_bytes(capacity)} of GPU memory: {verdict}"
    )
