"""Property tests over every loader (issue 11): for any mangled input the result is either
success with the values as written, or the project's ``TwinInputError`` — never another
exception. Modest example counts; deterministic (derandomized)."""

import json
from importlib import resources

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from twin.config import ServingConfig  # noqa: E402
from twin.errors import TwinInputError  # noqa: E402
from twin.costs.profile import Profile, load_profile  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.integers(1, 4096), st.floats(0.01, 1.0), st.none(), st.booleans(),
                    st.integers(-10, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["8", "16", "true", "off", "vllm", "1e3", "", "nan"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mangled(draw, obj, keys_too=True):
    """``obj`` with one to three edits at random paths: a value replaced, a key deleted or
    an unknown key added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        node = obj
        while True:   # walk down a random path, stopping at a random depth
            kids = list(node) if isinstance(node, dict) else list(range(len(node))) \
                if isinstance(node, list) else []
            if not kids:
                break
            k = draw(st.sampled_from(kids))
            if not isinstance(node[k], (dict, list)) or draw(st.booleans()):
                break
            node = node[k]
        if not isinstance(node, (dict, list)) or not len(node):
            continue
        k = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        op = draw(st.sampled_from(["set", "set", "del", "add"] if keys_too else ["set"]))
        if op == "set":
            node[k] = draw(values)
        elif op == "del" and isinstance(node, dict):
            del node[k]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=6))] = draw(values)
    return obj


def _same(given_value, loaded) -> bool:
    """A value of the field's own type must come back unchanged."""
    return loaded == given_value


# -- serving config YAML ------------------------------------------------------------------------

SERVE = {"max_loras": 8, "max_cpu_loras": 32, "max_lora_rank": 16, "max_num_seqs": 256,
         "max_num_batched_tokens": 2048, "gpu_memory_utilization": 0.9, "block_size": 16,
         "enable_chunked_prefill": True, "max_model_len": 4096, "policy": "vllm",
         "enable_lora": True, "preload_adapters": False}
_TYPES = {f: type(v) for f, v in SERVE.items()}


@FUZZ
@given(mangled(SERVE))
def test_serving_yaml_mangled(tmp_path, d):
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(d))
    try:
        cfg = ServingConfig.from_yaml(p)
    except TwinInputError:
        return
    for k, v in d.items():
        if type(v) is _TYPES.get(k):         # as written: must be kept exactly
            assert _same(v, getattr(cfg, k)), k
    assert ServingConfig.from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(st.binary(max_size=60), st.integers(0, 200))
def test_serving_yaml_bytes_mangled(tmp_path, junk, at):
    text = yaml.safe_dump(SERVE).encode()
    p = tmp_path / "serve.yaml"
    p.write_bytes(text[:at] + junk + text[at:])
    try:
        ServingConfig.from_yaml(p)
    except TwinInputError:
        pass


# -- profile JSON ----------------------------------------------------------------------------------

PROFILES = {n: load_profile(n).to_dict() for n in ("cpu-tiny",
                                                   "llama31-8b-h100-64gb-first-principles")}


def _comparable(d: dict) -> dict:
    """A profile dict as ``to_dict`` writes it: zero step-time coefficients are left out."""
    d = json.loads(json.dumps(d))
    for part in ("base", "memory", "compute"):
        if isinstance(d["step_time"].get(part), dict):
            d["step_time"][part] = {k: v for k, v in d["step_time"][part].items() if v}
            if part != "base" and not d["step_time"][part]:
                del d["step_time"][part]
        elif part in d["step_time"]:
            del d["step_time"][part]
    if d["model"].get("max_position_embeddings", 0) is None:
        del d["model"]["max_position_embeddings"]
    d.setdefault("provenance", {})
    return d


@FUZZ
@given(st.sampled_from(sorted(PROFILES)).flatmap(lambda n: mangled(PROFILES[n])))
def test_profile_json_mangled(tmp_path, d):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(d))
    try:
        prof = load_profile(p)
    except TwinInputError:
        return
    assert prof.to_dict() == _comparable(d)      # success: every value as written


@FUZZ
@given(st.binary(max_size=40), st.integers(0, 2000))
def test_profile_json_bytes_mangled(tmp_path, junk, at):
    text = json.dumps(PROFILES["cpu-tiny"]).encode()
    p = tmp_path / "p.json"
    p.write_bytes(text[:at] + junk + text[at + len(junk) // 2:])
    try:
        load_profile(p)
    except TwinInputError:
        pass


@FUZZ
@given(values)
def test_profile_any_json_value(d):
    try:
        Profile.from_dict(d, source="p.json")
    except TwinInputError:
        pass


# -- workload specs ------------------------------------------------------------------------------

SPECS = [
    {"family": "rate_classes", "n_adapters": 16, "rates": [1.6, 0.8], "ranks": [8, 16],
     "duration_s": 600.0, "lengths": {"kind": "uniform", "lo": 8, "hi": 256},
     "arrival": "gamma", "cv": 2.0, "seed": 3},
    {"family": "powerlaw", "n_adapters": 32, "total_rate": 10.0, "alpha": 0.5, "cv": 1.0,
     "ranks": [16], "duration_s": 60.0, "lengths": {"kind": "sharegpt", "means": [200.0, 100.0]},
     "seed": 0},
    {"family": "trace", "path": "t.parquet", "catalog": None, "default_rank": 16},
]
_SPEC_TYPES = {"n_adapters": int, "seed": int, "duration_s": float, "cv": float,
               "total_rate": float, "alpha": float, "default_rank": int, "arrival": str,
               "path": str}


@FUZZ
@given(st.sampled_from(range(len(SPECS))).flatmap(lambda i: mangled(SPECS[i])))
def test_workload_spec_mangled(tmp_path, d):
    from twin.ml.spec import WorkloadSpec

    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump(d))
    try:
        spec = WorkloadSpec.from_yaml(p)
    except TwinInputError:
        return
    for k, v in d.items():
        if type(v) is _SPEC_TYPES.get(k):
            assert spec.params[k] == v, k
    assert WorkloadSpec.from_dict(spec.to_dict()).key == spec.key


# -- bench sidecars ------------------------------------------------------------------------------

BENCH = {"request_rate": 4.0, "completed": 1000, "total_input_tokens": 223000,
         "total_output_tokens": 196000, "duration": 300.0, "mean_ttft_ms": 40.0,
         "mean_tpot_ms": 20.0, "mean_itl_ms": 20.5, "max_lora_rank": 16}
SIDECAR = {"max_loras": 4, "max_cpu_loras": 8, "adapter_ranks": {8: 4, 16: 4},
           "preload_adapters": True,
           "runs": {"bench.json": {"adapter_rates_rps": [1.0, 1.0] + [1 / 3] * 6}}}


@FUZZ
@given(mangled(SIDECAR))
def test_sidecar_mangled(tmp_path, side):
    from twin.calibrate.vllm_runs import read_bench_results

    b = tmp_path / "bench.json"
    b.write_text(json.dumps(BENCH))
    p = tmp_path / "side.yaml"
    p.write_text(yaml.safe_dump(side))
    try:
        (spec,) = read_bench_results([b], p)
    except TwinInputError:
        return
    for k in ("max_loras", "max_cpu_loras"):
        if type(side.get(k)) is int:
            assert getattr(spec.config, k) == side[k]


# -- recommender model JSON ----------------------------------------------------------------------

def _small_model() -> dict:
    d = json.loads((resources.files("twin.ml") / "recommender.json").read_text())
    for m in d["models"].values():
        m["trees"] = m["trees"][:2]
    return d


MODEL = _small_model()


@FUZZ
@given(mangled(MODEL))
def test_model_json_mangled(tmp_path, d):
    import numpy as np
    import pandas as pd

    from twin.ml.recommender import MODEL_FEATURES, Recommender

    p = tmp_path / "model.json"
    p.write_text(json.dumps(d))
    try:
        model = Recommender.load(p)
    except TwinInputError:
        return
    X = pd.DataFrame(np.ones((2, len(MODEL_FEATURES))), columns=list(MODEL_FEATURES))
    model.predict_rows(X)   # a model that loads predicts without an exception


@FUZZ
@given(mangled(BENCH))
def test_bench_json_mangled(tmp_path, bench):
    from twin.calibrate.vllm_runs import read_bench_results

    b = tmp_path / "bench.json"
    b.write_text(json.dumps(bench))
    try:
        (spec,) = read_bench_results([b], SIDECAR)
    except TwinInputError:
        return
    if type(bench.get("duration")) in (int, float):
        assert spec.duration_s == bench["duration"]
