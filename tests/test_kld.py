"""Quantization quality as llama.cpp measures it: Cortex runs the pinned `llama-perplexity`
(F16 log-probabilities saved once with --kl-divergence-base, each quant scored with
--kl-divergence) and reports exactly the numbers it prints; the spec's KLD gates judge them."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from cortex import toolchain as tc
from cortex.kld import (
    BASE_FILE,
    KLD_CORPUS,
    KldError,
    KldReport,
    kld_command,
    measure_kld,
    parse_kld_output,
)
from cortex.quality import QualityGateFailed, QualityReport, enforce_quality
from cortex.spec import QualityCheck

# What llama-perplexity --kl-divergence printed for SmolLM2-135M-Instruct Q4_K_M against its
# F16 over cortex/data/kld-corpus.txt (stdout and stderr, as Cortex reads them).
PRINTED = Path(__file__).parent / "data" / "llama-perplexity-kld-q4_k_m.txt"
FACTS = dict(
    candidate_label="Q4_K_M",
    corpus="kld-corpus.txt",
    corpus_sha256="c" * 64,
    reference_sha256="r" * 64,
    candidate_sha256="q" * 64,
    toolchain_version=tc.TOOLCHAIN_VERSION,
)


def printed_lines(report: KldReport) -> list[str]:
    """The summary lines as llama-perplexity formats them (tools/perplexity/perplexity.cpp)."""
    return [
        f"Mean PPL(Q)                   : {report.ppl:10.6f} ± {report.ppl_uncertainty:10.6f}",
        f"Mean PPL(base)                : {report.reference_ppl:10.6f} ± {report.reference_ppl_uncertainty:10.6f}",
        f"Mean ln(PPL(Q)/PPL(base))     : {report.ln_ppl_ratio:10.6f} ± {report.ln_ppl_ratio_uncertainty:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {report.ppl_ratio:10.6f} ± {report.ppl_ratio_uncertainty:10.6f}",
        f"Mean    KLD: {report.mean_kld:10.6f} ± {report.mean_kld_uncertainty:10.6f}",
        f"99.0%   KLD: {report.kld_p99:10.6f}",
        f"Same top p: {100 * report.same_top_p:6.3f} ± {100 * report.same_top_p_uncertainty:5.3f} %",
    ]


def test_the_report_holds_the_numbers_as_printed() -> None:
    text = PRINTED.read_text()
    report = KldReport.from_output(text, **FACTS)
    for line in printed_lines(report):
        assert line in text, line
    assert report.chunks is not None and report.chunks >= 2
    assert report.printed.startswith("====== Perplexity statistics") and "Same top p" in report.printed
    assert 0 < report.same_top_p < 1 and report.mean_kld > 0 and report.kld_p99 > report.mean_kld


def test_an_unknown_output_format_names_what_cannot_be_read() -> None:
    text = PRINTED.read_text().replace("Same top p:", "Same top-1:").replace("99.0%   KLD:", "p99 KLD:")
    with pytest.raises(KldError) as error:
        parse_kld_output(text)
    message = str(error.value)
    assert "'99.0% KLD:'" in message and "'Same top p:'" in message and "--kl-divergence" in message
    assert "Mean KLD" not in message.split("its last lines")[0]  # only what is missing is named


def test_a_failed_run_shows_what_llama_perplexity_said() -> None:
    said = "kl_divergence: failed to open /nowhere/f16.kld\n"
    with pytest.raises(KldError, match="cannot read 'Mean PPL") as error:
        parse_kld_output("llama_model_loader: loaded meta data\n" + said)
    assert said.strip() in str(error.value)


def test_kld_gates_judge_the_report() -> None:
    report = KldReport.from_output(PRINTED.read_text(), **FACTS)
    assert report.with_gates(None, None).passed is None
    ok = report.with_gates(max_kld=report.mean_kld * 2, min_same_top_p=report.same_top_p / 2)
    assert ok.passed is True and ok.failures() == []
    bad = report.with_gates(max_kld=report.mean_kld / 2, min_same_top_p=min(1.0, report.same_top_p * 1.05))
    assert bad.passed is False
    [kld, top] = bad.failures()
    assert f"{report.mean_kld:.6f}" in kld and f"{report.mean_kld / 2:g}" in kld
    assert f"{100 * report.same_top_p:.3f}%" in top


def test_a_failed_kld_gate_fails_the_quality_check_with_the_numbers() -> None:
    agreement = QualityReport(
        reference_label="F16",
        candidate_label="Q4_K_M",
        prompts=1,
        tokens_per_prompt=4,
        positions=4,
        agreements=4,
        top1_agreement=1.0,
        identical_continuations=1.0,
        mean_first_divergence=4.0,
        min_top1_agreement=0.5,
        passed=True,
    )
    kld = KldReport.from_output(PRINTED.read_text(), **FACTS)
    passing = agreement.with_kld(kld.with_gates(max_kld=kld.mean_kld * 2, min_same_top_p=None))
    assert passing.passed is True and enforce_quality(passing) is passing
    assert f"| mean KLD | {kld.mean_kld:.6f}" in passing.markdown()

    failing = agreement.with_kld(kld.with_gates(max_kld=kld.mean_kld / 2, min_same_top_p=None))
    assert failing.passed is False
    with pytest.raises(QualityGateFailed, match=rf"mean KL-divergence of {kld.mean_kld:.6f} .*above the maximum"):
        enforce_quality(failing)
    assert "Gates: mean KLD <= " in failing.markdown() and "FAILED" in failing.markdown()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_kld", math.nan),
        ("max_kld", math.inf),
        ("max_kld", 0),
        ("max_kld", -0.1),
        ("min_same_top_p", 1.5),
        ("min_same_top_p", -0.1),
        ("min_same_top_p", math.nan),
    ],
)
def test_kld_gates_in_the_spec_are_finite_and_in_range(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        QualityCheck(**{field: value})


def test_kld_is_measured_when_a_kld_gate_is_set() -> None:
    assert not QualityCheck(min_top1_agreement=0.9).measures_kld()
    assert QualityCheck(max_kld=0.05).measures_kld() and QualityCheck(min_same_top_p=0.9).measures_kld()


def test_the_corpus_is_long_enough_and_licensed() -> None:
    text = KLD_CORPUS.read_text()
    assert len(text.split()) > 2000  # llama-perplexity needs 2 chunks of 256 tokens at least
    assert "CC0 1.0" in (KLD_CORPUS.parent / "kld-corpus.LICENSE.txt").read_text()


# --- the real tool ----------------------------------------------------------------------------------


def test_cortex_reports_what_llama_perplexity_prints(toolchain, smollm2_ggufs, tmp_path: Path) -> None:
    """Measured through Cortex (base saved once, cached per quant), then the same command run
    by hand on the saved base: every number Cortex reports is the one the tool printed."""
    f16, q4, q8 = smollm2_ggufs["F16"], smollm2_ggufs["Q4_K_M"], smollm2_ggufs["Q8_0"]
    q4_report = measure_kld(f16, q4, candidate_label="Q4_K_M", toolchain=toolchain, cache=tmp_path)
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    base = folder / BASE_FILE
    by_hand = subprocess.run(
        kld_command(toolchain, q4, base), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True
    ).stdout
    for line in printed_lines(q4_report):
        assert line in by_hand, f"{line!r} is not what llama-perplexity printed:\n{by_hand[-2500:]}"
    assert q4_report.printed in by_hand

    # cached: the base is saved once, a quant's report is read back while its file is the same
    base_saved, q4_saved = base.stat().st_mtime_ns, (folder / "Q4_K_M.json").stat().st_mtime_ns
    q8_report = measure_kld(f16, q8, candidate_label="Q8_0", toolchain=toolchain, cache=tmp_path)
    again = measure_kld(f16, q4, candidate_label="Q4_K_M", toolchain=toolchain, cache=tmp_path, max_kld=1.0)
    assert base.stat().st_mtime_ns == base_saved and (folder / "Q4_K_M.json").stat().st_mtime_ns == q4_saved
    assert again.model_dump(exclude={"max_kld", "passed"}) == q4_report.model_dump(exclude={"max_kld", "passed"})
    assert again.passed is True
    # Q8_0 is far closer to F16 than Q4_K_M (measured: about 20 times lower mean KLD)
    assert q8_report.mean_kld < q4_report.mean_kld / 4 and q8_report.same_top_p > q4_report.same_top_p
    assert q8_report.reference_ppl == q4_report.reference_ppl  # one base, one reference perplexity

    # another file under a cached quant type is measured again, not mistaken for the cached one
    relabelled = measure_kld(f16, q8, candidate_label="Q4_K_M", toolchain=toolchain, cache=tmp_path)
    assert relabelled.candidate_sha256 == q8_report.candidate_sha256 != q4_report.candidate_sha256
    assert relabelled.mean_kld == q8_report.mean_kld


def test_a_corpus_under_two_chunks_is_refused_with_the_reason(toolchain, smollm2_ggufs, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("A few words are not enough to measure anything.\n")
    with pytest.raises(KldError, match="at least 512 tokens"):
        measure_kld(
            smollm2_ggufs["F16"],
            smollm2_ggufs["Q8_0"],
            candidate_label="Q8_0",
            corpus=short,
            toolchain=toolchain,
            cache=tmp_path / "kld",
        )
    assert not list((tmp_path / "kld").rglob("*.kld"))  # nothing half-saved is left to be reused
