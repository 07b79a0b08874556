"""The spec's own value rules as pure calls: sizes (parse and print), the cut-down repr that error
messages quote, labels, host names, the engine sections' defaults and the unsafe_extra_args switch,
and the small predicates the flows branch on. tests/test_spec_validation.py checks how a bad spec
file is reported (file, line, field); this file pins each rule's edges."""

from __future__ import annotations

import pytest

from cortex.spec import (
    MAX_BYTES,
    MAX_LABELS,
    GoodputSlo,
    LlamaCppSettings,
    QualityCheck,
    VllmSettings,
    check_host_name,
    check_labels,
    format_bytes,
    parse_bytes,
    short_repr,
)
from cortex.specfile import SpecError, parse_spec_text

OK = "name: m\nsource:\n  repo: org/model\n"


@pytest.mark.parametrize(
    "text,size",
    [
        ("46GiB", 46 * 2**30),
        ("48GB", 48 * 10**9),
        (" 512 mib ", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("1kb", 1000),
        ("2K", 2000),
        ("3t", 3 * 10**12),
        ("1TiB", 2**40),
        ("7", 7),
        ("7B", 7),
        ("1024KiB", 1024 * 2**10),
    ],
)
def test_sizes_parse_with_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_bytes(text) == size


def test_a_size_is_positive_and_at_most_one_pebibyte() -> None:
    assert parse_bytes(1) == 1 and parse_bytes(MAX_BYTES) == MAX_BYTES
    assert parse_bytes("1") == parse_bytes("1B") == 1
    assert parse_bytes(f"{MAX_BYTES}") == MAX_BYTES
    for bad in (0, -1, "0GiB", "0.4"):
        with pytest.raises(ValueError, match="a size must be positive"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match=f"{MAX_BYTES + 1} bytes is more than 1024.00 TiB"):
        parse_bytes(MAX_BYTES + 1)
    with pytest.raises(ValueError, match="'1025TiB' is more than 1024.00 TiB"):
        parse_bytes("1025TiB")


@pytest.mark.parametrize(
    "value,says",
    [
        (True, "not a boolean"),
        (46.5, "with a unit"),
        ([46], "expected a size"),
        (None, "expected a size"),
        ("46 gigs", "'46 gigs' is not a size"),
        ("46XiB", "is not a size"),
        ("GiB", "is not a size"),
        ("-5GiB", "is not a size"),
    ],
)
def test_a_size_that_is_not_one_says_what_it_got(value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_bytes(value)


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1023.9, "1023 B"),
        (2**10, "1.00 KiB"),
        (2**20 - 1, "1024.00 KiB"),
        (2**20, "1.00 MiB"),
        (3 * 2**29, "1.50 GiB"),
        (2**30, "1.00 GiB"),
        (2**40, "1.00 TiB"),
        (MAX_BYTES, "1024.00 TiB"),
        (-(2**30), "-1.00 GiB"),
    ],
)
def test_sizes_print_in_the_largest_binary_unit_they_fill(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_printed_sizes_parse_back() -> None:
    for n in (2**10, 2**20, 46 * 2**30, 2**40):
        assert parse_bytes(format_bytes(n)) == n


def test_short_repr_keeps_short_values_whole_and_cuts_long_ones_saying_how_long() -> None:
    assert short_repr("abc") == "'abc'"
    exact = "x" * 58  # repr is 60 characters: the limit, kept whole
    assert short_repr(exact) == repr(exact)
    long = "y" * 59  # 61 characters
    assert short_repr(long) == "'" + "y" * 54 + "...' (61 chars)"
    assert short_repr("z" * 1000, limit=20) == "'" + "z" * 14 + "...' (1002 chars)"
    assert short_repr(12345) == "12345"


def test_labels_are_text_keys_and_values_at_most_64() -> None:
    most = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert check_labels(most) == most and check_labels({}) == {}
    with pytest.raises(ValueError, match=f"{MAX_LABELS + 1} labels; at most {MAX_LABELS}"):
        check_labels({**most, "one-more": "v"})
    with pytest.raises(ValueError, match="mapping of key: value"):
        check_labels(["gpu", "h100"])
    with pytest.raises(ValueError, match="label key 'a b' is not a label name"):
        check_labels({"a b": "x"})
    with pytest.raises(ValueError, match="label key 3 is not a label name"):
        check_labels({3: "x"})
    with pytest.raises(ValueError, match="label gpus: 8 is not text; quote it: gpus: '8'"):
        check_labels({"gpus": 8})
    with pytest.raises(ValueError, match="label zone: 'eu west' is not a label value"):
        check_labels({"zone": "eu west"})
    assert check_labels({"cortex.ai/gpu": "h100", "zone": "eu-west_1.a"}) == {
        "cortex.ai/gpu": "h100",
        "zone": "eu-west_1.a",
    }


def test_a_bad_host_name_is_quoted_in_its_error() -> None:
    assert check_host_name("gpu-01.lab") == "gpu-01.lab"
    with pytest.raises(ValueError, match="'gpu 01' is not a host name"):
        check_host_name("gpu 01")


def test_engine_sections_default_to_no_extra_args_no_env_and_safe_flags_only() -> None:
    for section in (VllmSettings(), LlamaCppSettings()):
        assert section.extra_args == [] and section.env == {} and section.unsafe_extra_args is False
    assert VllmSettings().extra_args is not VllmSettings().extra_args  # not one shared list


def test_an_unsafe_flag_needs_unsafe_extra_args_and_passes_with_it() -> None:
    for section, flag in (("llamacpp", "--log-file"), ("vllm", "--download-dir")):
        text = OK + f"{section}:\n  extra_args: ['{flag}', '/tmp/x']\n"
        with pytest.raises(SpecError, match=f"{flag} is refused.*unsafe_extra_args: true"):
            parse_spec_text(text, "m.yaml")
        spec = parse_spec_text(text + "  unsafe_extra_args: true\n", "m.yaml")
        assert getattr(spec, section).extra_args == [flag, "/tmp/x"]
        with pytest.raises(SpecError, match=f"{flag} is refused"):
            parse_spec_text(text + "  unsafe_extra_args: false\n", "m.yaml")


def test_goodput_slo_is_set_by_any_one_objective() -> None:
    assert not GoodputSlo().is_set()
    assert GoodputSlo(ttft_ms=500).is_set() and GoodputSlo(tpot_ms=50).is_set() and GoodputSlo(e2el_ms=9000).is_set()


def test_kld_is_measured_when_either_kld_gate_is_set() -> None:
    assert not QualityCheck().measures_kld()
    assert not QualityCheck(min_top1_agreement=0.9).measures_kld()
    assert QualityCheck(max_kld=0.05).measures_kld()
    assert QualityCheck(min_same_top_p=0.9).measures_kld()
    assert QualityCheck(max_kld=0.05, min_same_top_p=0.9).measures_kld()
