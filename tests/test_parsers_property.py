"""Property tests of the parsers a user's text reaches (issue 11 item 4): the probe spec, the target profile
and the teacher reference. Whatever they are given, they give back a value or raise an RkdError (which the
CLI prints as one line, exit 2); any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rkdtool.errors import RkdError  # noqa: E402
from rkdtool.hub import parse_ref  # noqa: E402
from rkdtool.probes.spec import load_probes, probe_from_table  # noqa: E402
from rkdtool.resources import load_profile, parse_profile  # noqa: E402

# derandomize: the same examples on every run, so a red CI is a regression and not a new random draw;
# a session widening the search sets HYPOTHESIS_PROFILE=explore (random draws, more examples).
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SETTINGS = settings(settings.get_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci")))

# Values TOML can hold (no None), nested a little.
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def table_over(known: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Tables whose fields are drawn from `known` (good values or any value) plus stray keys."""
    fields = {k: st.one_of(v, toml_values) for k, v in known.items()}
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda base: st.dictionaries(st.text(max_size=8), toml_values, max_size=2).map(
            lambda extra: {**extra, **base}
        )
    )


def gives_value_or_rkd_error(fn, *args):
    try:
        return fn(*args)
    except RkdError as exc:
        assert str(exc).strip(), "an RkdError without a message"
        assert "\n" not in str(exc).strip() or len(str(exc)) < 2000
        return None


def parses_file_or_one_line(parse, filename: str, text: str):
    """Writes `text` to `filename` in a fresh folder and parses it with `parse` (value or RkdError)."""
    with tempfile.TemporaryDirectory() as base:
        path = Path(base) / filename
        path.write_text(text)
        return gives_value_or_rkd_error(parse, path)


PROBE_FIELDS = {
    "name": st.text(max_size=10),
    "kind": st.sampled_from(["patch", "blend", "image-mask", "sinusoid", "bogus"]),
    "space": st.sampled_from(["pixel", "normalized", "other"]),
    "target": st.integers(-3, 12),
    "size": st.integers(-2, 40),
    "margin": st.integers(-2, 40),
    "position": st.one_of(
        st.sampled_from(["bottom-right", "top-left", "center", "middle"]),
        st.lists(st.integers(-5, 40), min_size=0, max_size=3),
    ),
    "pattern": st.sampled_from(["checker", "white", "noise:3", "binary:-1", "noise:x", "missing.npy"]),
    "alpha": st.floats(-1, 2),
    "image": st.sampled_from(["white", "missing.png"]),
    "mask": st.sampled_from(["missing.npy", "white"]),
    "delta": st.floats(-1, 1),
    "frequency": st.floats(-10, 10),
    "phase": st.floats(-10, 10),
    "width": st.integers(-3, 64),
}


@SETTINGS
@given(table_over(PROBE_FIELDS))
def test_probe_table_gives_a_probe_or_one_line(table):
    with tempfile.TemporaryDirectory() as base:
        probe = gives_value_or_rkd_error(probe_from_table, table, Path(base))
    if probe is not None:
        assert probe.pattern.ndim == 3 and probe.mask.ndim == 3


@SETTINGS
@given(st.text(max_size=300))
def test_probe_spec_text_gives_probes_or_one_line(text):
    parses_file_or_one_line(load_probes, "probes.toml", text)


@SETTINGS
@given(
    st.lists(table_over(PROBE_FIELDS), min_size=0, max_size=3),
    st.sampled_from(["probe", "probes", "Probe"]),
)
def test_probe_spec_with_tables_gives_probes_or_one_line(tables, key):
    import json

    def toml_of(value) -> str:
        # every drawn value is rendered as TOML; values TOML cannot write are skipped
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value != value:
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(toml_of(v) for v in value) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_of(v)}" for k, v in value.items()) + "}"

    text = "".join(
        f"[[{key}]]\n" + "".join(f"{json.dumps(k)} = {toml_of(v)}\n" for k, v in t.items()) for t in tables
    )
    parses_file_or_one_line(load_probes, "probes.toml", text)


PROFILE_FIELDS = {
    "name": st.text(max_size=8),
    "family": st.sampled_from(["jetson", "x86"]),
    "sm": st.sampled_from(["none", "87", "72"]),
    "tensorrt": st.sampled_from(["none", ">=10.3,<11", ">=8.2", "ten", ">=10.3,", ""]),
    "dla_cores": st.integers(-1, 3),
    "precision": st.sampled_from(["fp32", "fp16", "int8", "int4"]),
    "fallback_precision": st.sampled_from(["fp32", "fp16", "int8", "bf16"]),
    "opset": st.integers(0, 25),
    "exporter": st.sampled_from(["torchscript", "dynamo", "jit"]),
    "workspace_mb": st.integers(-5, 4096),
    "batch": st.fixed_dictionaries(
        {}, optional={k: st.one_of(st.integers(-1, 64), toml_values) for k in ("min", "opt", "max")}
    ),
    "calib_samples": st.integers(-1, 1024),
    "calibration": st.sampled_from(["entropy", "percentile", "minmax"]),
    "latency_budget_ms": st.one_of(st.floats(-5, 50), st.integers(-5, 50)),
    "notes": st.text(max_size=20),
    "jetpack": st.sampled_from(["6.0", "4.6"]),
}


@SETTINGS
@given(table_over(PROFILE_FIELDS))
def test_profile_table_gives_a_profile_or_one_line(table):
    profile = gives_value_or_rkd_error(parse_profile, table, "fuzz.toml")
    if profile is not None:  # a profile that parses writes TOML that parses back to itself
        assert parse_profile(__import__("tomllib").loads(profile.to_toml()), "again") == profile


@SETTINGS
@given(st.text(max_size=300))
def test_profile_file_text_gives_a_profile_or_one_line(text):
    parses_file_or_one_line(load_profile, "target.toml", text)


@SETTINGS
@given(st.text(max_size=40))
def test_profile_name_gives_a_profile_or_one_line(name):
    gives_value_or_rkd_error(load_profile, name)


refs = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda scheme, body: f"{scheme}:{body}",
        st.sampled_from(["hf", "demo", "file", "s3", "HF"]),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=50),
    ),
    st.builds(
        lambda owner, repo, rev, file: f"hf:{owner}/{repo}{rev}{file}",
        st.from_regex(r"[A-Za-z0-9._-]{0,12}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9._-]{0,12}", fullmatch=True),
        st.sampled_from(["", "@", "@main", "@v1.0/x"]),
        st.sampled_from(["", "/", "/model.safetensors", "/a/b.pt"]),
    ),
)


@SETTINGS
@given(refs)
def test_teacher_reference_parses_or_one_line(ref):
    parsed = gives_value_or_rkd_error(parse_ref, ref)
    if parsed is not None:
        assert parsed.scheme in ("hf", "file", "demo")
        if parsed.scheme == "hf":
            assert parsed.repo and "/" in parsed.repo


@SETTINGS
@given(refs.filter(lambda r: not r.strip().lower().startswith(("hf:", "demo:"))))
def test_teacher_file_reference_resolves_or_one_line(ref):
    from rkdtool.teachers import resolve

    with tempfile.TemporaryDirectory() as base:
        # a relative reference is looked up from an empty folder, so it never names a real file
        import os

        here = os.getcwd()
        os.chdir(base)
        try:
            gives_value_or_rkd_error(resolve, ref)
        finally:
            os.chdir(here)
