"""Quantization quality as llama.cpp measures it: KL-divergence from the F16 model.

The community judges a quant by the numbers llama.cpp's own `llama-perplexity` prints, so
Cortex runs that tool (built into the pinned toolchain) rather than computing them itself:

    llama-perplexity -m F16.gguf -f corpus -c 256 --kl-divergence-base F16.kld   (once)
    llama-perplexity -m QUANT.gguf --kl-divergence-base F16.kld --kl-divergence -c 256

The first run saves the F16 model's log-probabilities over the corpus (and the corpus' tokens);
the second runs the quant over the same tokens and prints, among the rest, the mean and the
99th percentile of the per-token KL-divergence, the perplexity ratio PPL(Q)/PPL(F16) and "same
top p", the share of tokens where both models rank the same token first. `parse_kld_output`
reads those lines, exactly as printed; `KldReport` holds them typed.

The corpus is `cortex/data/kld-corpus.txt`: about 2,400 words of English prose written for
Cortex and dedicated to the public domain (CC0 1.0, see `kld-corpus.LICENSE.txt`). At 256
tokens per chunk it is 11 chunks, of which llama-perplexity scores the second half of each
(1,397 tokens for SmolLM2's tokenizer): seconds for a small model on a CPU.

Both runs are cached in the artifact cache, under `$CORTEX_CACHE/artifacts/kld/<key>/`, where
the key is (F16 file sha256, corpus sha256, context, toolchain version): `f16.kld` (the saved
log-probabilities, about 100 KB per scored token for a 49k vocabulary) and `<QUANT>.json`, one
report per quant type, reused while the quant's file is the same (its sha256 is recorded).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from cortex.fileio import atomic_write_json, file_lock
from cortex.hub import verified_digest
from cortex.settings import cache_root

if TYPE_CHECKING:
    from cortex.toolchain import Toolchain

KLD_CORPUS = Path(__file__).parent / "data" / "kld-corpus.txt"
KLD_CONTEXT = 256  # tokens per chunk; llama-perplexity scores the second half of each
BASE_FILE = "f16.kld"


class KldError(RuntimeError):
    """llama-perplexity failed, or its output lacks a number Cortex reads from it."""


# --- reading llama-perplexity's output ------------------------------------------------------------

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|-?inf))"
_PM = r"\s*±\s*" + _NUM
# (field, the label llama-perplexity prints before it, whether a "± uncertainty" follows)
_LINES: tuple[tuple[str, str, bool], ...] = (
    ("ppl", "Mean PPL(Q) :", True),
    ("reference_ppl", "Mean PPL(base) :", True),
    ("ln_ppl_ratio", "Mean ln(PPL(Q)/PPL(base)) :", True),
    ("ppl_ratio", "Mean PPL(Q)/PPL(base) :", True),
    ("mean_kld", "Mean KLD:", True),
    ("kld_p99", "99.0% KLD:", False),
    ("same_top_p_percent", "Same top p:", True),
)
_CHUNKS = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")


def parse_kld_output(text: str) -> dict[str, float]:
    """The numbers of llama-perplexity's `--kl-divergence` summary, as printed: `ppl`,
    `reference_ppl`, `ln_ppl_ratio`, `ppl_ratio`, `mean_kld`, `same_top_p_percent` (each with
    `<name>_uncertainty`, the ± it prints), `kld_p99`, and `chunks`, `context` when it says them.
    KldError naming every line it could not find (a changed output format, or a failed run)."""
    found: dict[str, float] = {}
    missing = []
    for name, label, uncertain in _LINES:
        pattern = r"\s*".join(re.escape(word) for word in label.split())  # any spacing between words
        m = re.search(rf"^\s*{pattern}\s*{_NUM}{_PM if uncertain else ''}", text, re.MULTILINE)
        if m is None:
            missing.append(label)
            continue
        found[name] = float(m.group(1))
        if uncertain:
            found[f"{name}_uncertainty"] = float(m.group(2))
    if missing:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise KldError(
            "cannot read "
            + ", ".join(repr(m) for m in missing)
            + " from the output of llama-perplexity --kl-divergence (a failed run, or an output format "
            f"this Cortex does not know); its last lines:\n{tail}"
        )
    if m := _CHUNKS.search(text):
        found["chunks"], found["context"] = float(m.group(1)), float(m.group(2))
    return found


# --- the report -----------------------------------------------------------------------------------


class KldReport(BaseModel):
    """llama-perplexity's KL-divergence summary for one quant against its F16 reference."""

    reference_label: str = "F16"
    candidate_label: str
    mean_kld: float = Field(description="mean per-token KL-divergence from the reference (nats)")
    mean_kld_uncertainty: float
    kld_p99: float = Field(description="99th percentile of the per-token KL-divergence")
    ppl_ratio: float = Field(description="Mean PPL(Q)/PPL(base)")
    ppl_ratio_uncertainty: float
    ln_ppl_ratio: float = Field(description="Mean ln(PPL(Q)/PPL(base))")
    ln_ppl_ratio_uncertainty: float
    same_top_p: float = Field(description="share of tokens where both rank the same token first (0-1)")
    same_top_p_uncertainty: float
    ppl: float = Field(description="the candidate's perplexity on the corpus (Mean PPL(Q))")
    ppl_uncertainty: float
    reference_ppl: float = Field(description="the reference's perplexity on the corpus (Mean PPL(base))")
    reference_ppl_uncertainty: float
    chunks: int | None = None
    context: int = KLD_CONTEXT
    corpus: str = Field(description="the corpus file's name")
    corpus_sha256: str
    reference_sha256: str
    candidate_sha256: str
    toolchain_version: str
    printed: str = Field(description="llama-perplexity's statistics, as it printed them")
    max_kld: float | None = None
    min_same_top_p: float | None = None
    passed: bool | None = None

    @classmethod
    def from_output(cls, text: str, **facts) -> KldReport:
        """The report of one `--kl-divergence` run's output (`facts`: labels, digests, ...)."""
        n = parse_kld_output(text)
        start = text.find("====== Perplexity statistics")
        end = text.find("\n", text.find("Same top p:", max(start, 0)))  # then timings, which vary by run
        return cls(
            mean_kld=n["mean_kld"],
            mean_kld_uncertainty=n["mean_kld_uncertainty"],
            kld_p99=n["kld_p99"],
            ppl_ratio=n["ppl_ratio"],
            ppl_ratio_uncertainty=n["ppl_ratio_uncertainty"],
            ln_ppl_ratio=n["ln_ppl_ratio"],
            ln_ppl_ratio_uncertainty=n["ln_ppl_ratio_uncertainty"],
            # printed as a percentage with 3 decimals; kept as the share, like top-1 agreement
            same_top_p=n["same_top_p_percent"] / 100,
            same_top_p_uncertainty=n["same_top_p_percent_uncertainty"] / 100,
            ppl=n["ppl"],
            ppl_uncertainty=n["ppl_uncertainty"],
            reference_ppl=n["reference_ppl"],
            reference_ppl_uncertainty=n["reference_ppl_uncertainty"],
            chunks=int(n["chunks"]) if "chunks" in n else None,
            printed=text[start : end if end >= 0 else None].strip() if start >= 0 else "",
            **facts,
        )

    def with_gates(self, max_kld: float | None, min_same_top_p: float | None) -> KldReport:
        """This report judged by the spec's gates (`passed` is None when neither is set)."""
        report = self.model_copy(update={"max_kld": max_kld, "min_same_top_p": min_same_top_p})
        set_ = max_kld is not None or min_same_top_p is not None
        return report.model_copy(update={"passed": not report.failures() if set_ else None})

    def failures(self) -> list[str]:
        """Each gate not met, in words with the measured number and the bound."""
        out = []
        if self.max_kld is not None and not self.mean_kld <= self.max_kld:
            out.append(
                f"{self.candidate_label} has a mean KL-divergence of {self.mean_kld:.6f} from "
                f"{self.reference_label}, above the maximum {self.max_kld:g}"
            )
        if self.min_same_top_p is not None and not self.same_top_p >= self.min_same_top_p:
            out.append(
                f"{self.candidate_label} ranks the same top token as {self.reference_label} on "
                f"{100 * self.same_top_p:.3f}% of tokens, below the minimum {self.min_same_top_p:.1%}"
            )
        return out

    def markdown_rows(self) -> str:
        """Table rows (| metric | value |) as llama-perplexity printed the numbers."""
        return (
            f"| mean KLD | {self.mean_kld:.6f} ± {self.mean_kld_uncertainty:.6f} |\n"
            f"| 99th percentile KLD | {self.kld_p99:.6f} |\n"
            f"| PPL(Q)/PPL({self.reference_label}) | {self.ppl_ratio:.6f} ± {self.ppl_ratio_uncertainty:.6f} |\n"
            f"| same top p | {100 * self.same_top_p:.3f} ± {100 * self.same_top_p_uncertainty:.3f} % |\n"
            f"| PPL(Q), PPL({self.reference_label}) | {self.ppl:.4f}, {self.reference_ppl:.4f} |"
        )

    def markdown(self) -> str:
        gates = []
        if self.max_kld is not None:
            gates.append(f"mean KLD <= {self.max_kld:g}")
        if self.min_same_top_p is not None:
            gates.append(f"same top p >= {self.min_same_top_p:.1%}")
        gate = f"\n\nGates: {', '.join(gates)}: {'passed' if self.passed else 'FAILED'}" if gates else ""
        return (
            f"KL-divergence of {self.candidate_label} from {self.reference_label}, by `llama-perplexity` "
            f"(llama.cpp {self.toolchain_version}) over {self.corpus} ({self.chunks} chunks of {self.context} tokens):\n\n"
            "| metric | value |\n|---|---:|\n" + self.markdown_rows() + gate + "\n"
        )


# --- running llama-perplexity ---------------------------------------------------------------------


def kld_base_command(
    toolchain: Toolchain,
    reference_gguf: Path,
    corpus: Path,
    base_file: Path,
    *,
    context: int = KLD_CONTEXT,
    threads: int | None = None,
) -> list[str]:
    """Save the reference's log-probabilities over `corpus` to `base_file`."""
    cmd = [
        str(toolchain.llama_perplexity),
        "-m",
        str(reference_gguf),
        "-f",
        str(corpus),
        "-c",
        str(context),
        "--kl-divergence-base",
        str(base_file),
    ]
    return cmd + (["-t", str(threads)] if threads else [])


def kld_command(
    toolchain: Toolchain,
    candidate_gguf: Path,
    base_file: Path,
    *,
    context: int = KLD_CONTEXT,
    threads: int | None = None,
) -> list[str]:
    """Score `candidate_gguf` against the saved log-probabilities (the corpus' tokens are in them)."""
    cmd = [
        str(toolchain.llama_perplexity),
        "-m",
        str(candidate_gguf),
        "--kl-divergence-base",
        str(base_file),
        "--kl-divergence",
        "-c",
        str(context),
    ]
    return cmd + (["-t", str(threads)] if threads else [])


def run_llama_perplexity(cmd: list[str], what: str) -> str:
    """Run llama-perplexity; its stdout and stderr together (the summary is on stdout, the
    progress on stderr). KldError with its last lines when it exits non-zero."""
    from cortex.artifacts import tool_env

    result = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=tool_env()
    )
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise KldError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")
    return result.stdout


def kld_folder(
    reference_sha256: str, corpus_sha256: str, context: int, toolchain_version: str, root: Path | None = None
) -> Path:
    """`$CORTEX_CACHE/artifacts/kld/<key>/`: one F16 file, one corpus, one context, one toolchain."""
    key = hashlib.sha256(f"{reference_sha256}\n{corpus_sha256}\n{context}\n{toolchain_version}".encode())
    return (root or cache_root() / "artifacts" / "kld") / key.hexdigest()[:32]


def save_reference_logits(
    toolchain: Toolchain, reference_gguf: Path, folder: Path, *, corpus: Path, context: int, threads: int | None = None
) -> Path:
    """`folder/f16.kld` (made once; call with the folder's lock held)."""
    base = folder / BASE_FILE
    if base.is_file():
        return base
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{BASE_FILE}.{os.getpid()}.partial"
    try:
        out = run_llama_perplexity(
            kld_base_command(toolchain, reference_gguf, corpus, partial, context=context, threads=threads),
            f"llama-perplexity --kl-divergence-base ({reference_gguf.name})",
        )
        # It exits 0 even when it saved nothing (a corpus under 2 chunks, an unwritable file).
        with open(partial, "rb") as saved:
            complete = saved.read(8) == b"_logits_" and "Final estimate: PPL" in out
        if not complete:
            tail = "\n".join(out.strip().splitlines()[-10:])
            raise KldError(
                f"llama-perplexity saved no complete log-probabilities of {reference_gguf.name} over "
                f"{corpus} at {context} tokens per chunk (it needs at least {2 * context} tokens):\n{tail}"
            )
        partial.replace(base)
    except FileNotFoundError as error:
        raise KldError(f"llama-perplexity wrote no {partial}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return base


def measure_kld(
    reference_gguf: Path,
    candidate_gguf: Path,
    *,
    candidate_label: str,
    reference_label: str = "F16",
    reference_sha256: str | None = None,
    candidate_sha256: str | None = None,
    corpus: Path = KLD_CORPUS,
    context: int = KLD_CONTEXT,
    max_kld: float | None = None,
    min_same_top_p: float | None = None,
    toolchain: Toolchain | None = None,
    threads: int | None = None,
    cache: Path | None = None,
) -> KldReport:
    """llama-perplexity's KL-divergence of `candidate_gguf` from `reference_gguf` over `corpus`,
    judged by the gates given. Cached by (reference, quant type = `candidate_label`, corpus):
    the reference's log-probabilities are saved once, and a quant's report is reused while its
    file is the same. The digests are computed (once per file) unless given."""
    from cortex.toolchain import find_toolchain

    toolchain = toolchain or find_toolchain()
    reference_sha256 = reference_sha256 or verified_digest(Path(reference_gguf))
    candidate_sha256 = candidate_sha256 or verified_digest(Path(candidate_gguf))
    corpus_sha256 = hashlib.sha256(Path(corpus).read_bytes()).hexdigest()
    folder = kld_folder(reference_sha256, corpus_sha256, context, toolchain.version, cache)
    result = folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', candidate_label)}.json"
    with file_lock(folder / ".lock"):
        report = None
        if result.is_file():
            try:
                report = KldReport.model_validate_json(result.read_text())
            except ValueError:
                report = None  # written by another Cortex version: measured again
            if report is not None and report.candidate_sha256 != candidate_sha256:
                report = None  # another file of this quant type
        if report is None:
            base = save_reference_logits(
                toolchain, Path(reference_gguf), folder, corpus=Path(corpus), context=context, threads=threads
            )
            out = run_llama_perplexity(
                kld_command(toolchain, Path(candidate_gguf), base, context=context, threads=threads),
                f"llama-perplexity --kl-divergence ({Path(candidate_gguf).name})",
            )
            report = KldReport.from_output(
                out,
                candidate_label=candidate_label,
                reference_label=reference_label,
                context=context,
                corpus=Path(corpus).name,
                corpus_sha256=corpus_sha256,
                reference_sha256=reference_sha256,
                candidate_sha256=candidate_sha256,
                toolchain_version=toolchain.version,
            )
            atomic_write_json(
                result, report.model_dump(mode="json", exclude={"max_kld", "min_same_top_p", "passed"}), newline=True
            )
    return report.with_gates(max_kld, min_same_top_p)
