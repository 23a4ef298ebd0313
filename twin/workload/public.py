"""Loaders that map the public traces in ``shared/data/traces/`` onto the trace contract.

Each loader returns a validated trace (:func:`twin.workload.schema.validate_trace`) and raises
:class:`~twin.errors.TwinInputError` naming the file, the 0-based data row and the *source*
column on bad input, so a user can open the file and find the problem. Sources, licences and
provenance: ``shared/data/traces/README.md``; bundled derivatives: ``traces/README.md``.

None of Azure 2023 or Mooncake names a tenant or adapter, so their traces come back with
``adapter`` null (base model); :func:`assign_adapters` tags them. ServeGen's per-client
statistics carry real tenants and are synthesised per tenant by :func:`servegen_tenants`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.schema import INT32_MAX, exact_ints, validate_trace

__all__ = [
    "shared_data_dir", "shared_trace_path", "load_azure2023", "load_mooncake",
    "servegen_tenants", "assign_adapters", "powerlaw_shares", "sharegpt_length_pool",
    "AZURE_FILES", "MOONCAKE_FILES", "SERVEGEN_RATE_FILE", "SERVEGEN_LENGTH_FILE",
    "SHAREGPT_FILE", "VLLM_H100_POOL_MEANS",
]

AZURE_FILES = {"conv": "azure2023_conv.csv", "code": "azure2023_code.csv"}
MOONCAKE_FILES = {"conversation": "mooncake_conversation_trace.jsonl",
                  "synthetic": "mooncake_synthetic_trace.jsonl"}
SERVEGEN_RATE_FILE = "servegen_client_rate_windows.csv.gz"
SERVEGEN_LENGTH_FILE = "servegen_client_length_quantiles.csv.gz"
SHAREGPT_FILE = "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
#: ShareGPT pool means (prompt, output) of the real vLLM-H100 runs of arXiv 2508.08343
#: (Llama-3.1-8B tokenizer; ``shared/data/vllm-h100/lengths_summary.csv``).
VLLM_H100_POOL_MEANS = (223.0, 196.0)

_SERVEGEN_WINDOW_S = 600
# A generated trace is held in memory (~60 bytes a request, several arrays while drawn):
# past this size a generator would exhaust memory or run for hours, not make a trace.
MAX_REQUESTS = 50_000_000


# -- locating the shared data ----------------------------------------------------------------

def shared_data_dir() -> Path:
    """The shared data folder (holding ``traces/`` and ``vllm-h100/``).

    ``$TWIN_SHARED_DATA`` if set, else ``../shared/data`` next to the repository root. The
    public traces are not part of the package (licences, size), hence the lookup.
    """
    env = os.environ.get("TWIN_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        hint = "$TWIN_SHARED_DATA points there"
    else:
        path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
        hint = "set TWIN_SHARED_DATA to the folder holding traces/ (e.g. shared/data)"
    if not path.is_dir():
        raise TwinInputError(f"shared data folder not found ({hint})", file=str(path))
    return path


def shared_trace_path(name: str) -> Path:
    """Path of one public trace file under ``<shared data>/traces/``; clear error if absent."""
    path = shared_data_dir() / "traces" / name
    if not path.exists():
        raise TwinInputError("public trace file not found (see shared/data/traces/README.md)",
                             file=str(path))
    return path


# -- checks that name the source file, row and column ------------------------------------------

def _require_columns(df: pd.DataFrame, cols, file: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise TwinInputError(f"missing column(s) {missing}; expected {list(cols)}",
                             file=file, field=missing[0])


def _tokens(df: pd.DataFrame, col: str, file: str) -> tuple[np.ndarray, int]:
    """A token-count column as exact int64 (never through float64; booleans, fractions,
    negatives and counts above int32 refused, naming the original value).

    Zeros are clipped to 1 (a request still takes one step); returns (values, n_clipped).
    """
    vals = exact_ints(df[col], file, col, 0, INT32_MAX, unit="token")
    zero = vals < 1
    return np.maximum(vals, 1), int(zero.sum())


def _check_arrivals(t: np.ndarray, file: str, field: str) -> None:
    """Non-negative, finite, non-decreasing: checked before any ``limit_s`` cut so that row
    numbers are the file's own."""
    bad = ~np.isfinite(t)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError("missing or unparsable timestamp", file=file, row=row, field=field)
    if len(t) and (t < 0).any():
        row = int(np.flatnonzero(t < 0)[0])
        raise TwinInputError(f"timestamp must be >= 0, got {t[row]}", file=file, row=row,
                             field=field)
    if len(t) > 1 and (np.diff(t) < 0).any():
        row = int(np.flatnonzero(np.diff(t) < 0)[0]) + 1
        raise TwinInputError("timestamps must be non-decreasing (this row is earlier than the "
                             "one before it; sort the file by time)", file=file, row=row,
                             field=field)


def _finish(df: pd.DataFrame, file: str, limit_s: float | None) -> pd.DataFrame:
    if limit_s is not None:
        df = df[df["arrival_s"].to_numpy() < float(limit_s)].reset_index(drop=True)
    return validate_trace(df, source=file)


# -- Azure 2023 -------------------------------------------------------------------------------

def load_azure2023(path: str | Path, *, limit_s: float | None = None) -> pd.DataFrame:
    """Azure LLM inference trace 2023 (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``).

    ``arrival_s`` is seconds since the first timestamp; ``adapter`` is null (the trace names
    no tenant). Token counts of 0 are clipped to 1 (the shared copies of conv and code have
    none; a zero-token request still costs one step, and the contract needs >= 1); negative
    or fractional counts are errors. ``limit_s`` keeps arrivals in ``[0, limit_s)``.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("trace file not found", file=file)
    try:
        raw = pd.read_csv(path, dtype={"TIMESTAMP": "string"})
    except Exception as exc:
        raise TwinInputError(f"cannot be read as CSV: {exc}", file=file) from exc
    _require_columns(raw, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), file)
    ts = pd.to_datetime(raw["TIMESTAMP"], errors="coerce", format="ISO8601")
    nat = ts.isna().to_numpy()
    if nat.any():
        row = int(np.flatnonzero(nat)[0])
        raise TwinInputError(f"cannot parse timestamp {raw['TIMESTAMP'].iloc[row]!r}",
                             file=file, row=row, field="TIMESTAMP")
    ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    t = (ns - ns[0]) / 1e9 if len(ns) else np.zeros(0)
    _check_arrivals(t, file, "TIMESTAMP")
    prompt, _ = _tokens(raw, "ContextTokens", file)
    output, _ = _tokens(raw, "GeneratedTokens", file)
    df = pd.DataFrame({"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output})
    return _finish(df, file, limit_s)


# -- Mooncake ---------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> pd.DataFrame:
    """Fast path via pandas; on failure, find the bad line so the error can name it."""
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except ValueError as exc:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TwinInputError(f"not valid JSON: {e.msg}", file=str(path),
                                         row=i) from exc
                if not isinstance(obj, dict):
                    raise TwinInputError("expected a JSON object per line", file=str(path),
                                         row=i) from exc
        raise TwinInputError(f"cannot be read as JSON lines: {exc}", file=str(path)) from exc


def load_mooncake(path: str | Path, *, limit_s: float | None = None,
                  hash_ids: bool = False) -> pd.DataFrame:
    """Mooncake (FAST'25) JSONL trace: ``timestamp`` (ms), ``input_length``, ``output_length``.

    ``arrival_s`` is seconds since the first timestamp (the conversation trace is bucketed to
    3 s ticks, so many arrivals tie). ``hash_ids`` keeps the 512-token prefix-block ids as an
    annotation column (for prefix-caching studies); off by default to keep traces small.
    Zero token counts are clipped to 1 as in :func:`load_azure2023`.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("trace file not found", file=file)
    raw = _read_jsonl(Path(path))
    need = ("timestamp", "input_length", "output_length") + (("hash_ids",) if hash_ids else ())
    _require_columns(raw, need, file)
    ms = pd.to_numeric(raw["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(ms)
    if bad.any():  # report the raw value, not the shifted one
        row = int(np.flatnonzero(bad)[0])
        raise TwinInputError(f"expected milliseconds, got {raw['timestamp'].iloc[row]!r}",
                             file=file, row=row, field="timestamp")
    if len(ms) and (ms < 0).any():
        row = int(np.flatnonzero(ms < 0)[0])
        raise TwinInputError(f"timestamp must be >= 0, got {ms[row]}", file=file, row=row,
                             field="timestamp")
    t = (ms - ms[0]) / 1000.0 if len(ms) else ms
    _check_arrivals(t, file, "timestamp")
    prompt, _ = _tokens(raw, "input_length", file)
    output, _ = _tokens(raw, "output_length", file)
    df = pd.DataFrame({"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output})
    if hash_ids:
        df["hash_ids"] = raw["hash_ids"].to_numpy()
    return _finish(df, file, limit_s)


# -- adapter tagging --------------------------------------------------------------------------

def powerlaw_shares(n_adapters: int, alpha: float) -> np.ndarray:
    """P(adapter i) under ``floor(n * X)``, ``X ~ power(alpha)``: ((i+1)/n)^a - (i/n)^a."""
    edges = (np.arange(n_adapters + 1) / n_adapters) ** alpha
    return np.diff(edges)


def _powerlaw_index(rng: np.random.Generator, n_adapters: int, alpha: float,
                    size: int) -> np.ndarray:
    x = rng.power(alpha, size=size)
    return np.minimum((n_adapters * x).astype(np.int64), n_adapters - 1)


def assign_adapters(df: pd.DataFrame, n_adapters: int, *, popularity: str = "uniform",
                    alpha: float = 1.0, seed: int = 0, prefix: str = "lora") -> pd.DataFrame:
    """Tag each request of a trace with one of ``n_adapters`` adapters ``{prefix}-{i}``.

    ``uniform``: every adapter equally likely. ``powerlaw`` (S-LoRA's popularity model):
    adapter = floor(n * X) with X ~ power(alpha), so adapter 0 is the hottest and
    P(i) = ((i+1)/n)^alpha - (i/n)^alpha; alpha = 1 is uniform, smaller alpha is more skewed.
    Arrivals and lengths are untouched, so the aggregate load stays the real trace's.
    """
    if n_adapters < 1:
        raise TwinInputError(f"need at least one adapter, got {n_adapters}", field="n_adapters")
    if popularity not in ("uniform", "powerlaw"):
        raise TwinInputError(f"popularity must be 'uniform' or 'powerlaw', got {popularity!r}",
                             field="popularity")
    if popularity == "powerlaw" and not alpha > 0:
        raise TwinInputError(f"alpha must be > 0, got {alpha}", field="alpha")
    rng = np.random.default_rng(seed)
    n = len(df)
    idx = (rng.integers(0, n_adapters, size=n) if popularity == "uniform"
           else _powerlaw_index(rng, n_adapters, alpha, n))
    names = np.array([f"{prefix}-{i}" for i in range(n_adapters)], dtype=object)
    out = df.copy()
    out["adapter"] = pd.array(names[idx], dtype="string")
    return validate_trace(out, source="assign_adapters")


# -- ServeGen per-tenant synthesis ------------------------------------------------------------

def _servegen_windows(rate_csv, model: str, duration_s: float,
                      start_window_s: int | None) -> tuple[pd.DataFrame, int]:
    """The model's 600-s rate windows covering ``[start, start + duration)``."""
    file = str(rate_csv)
    if not Path(rate_csv).exists():
        raise TwinInputError("ServeGen rate file not found", file=file)
    cols = ["model", "client_id", "window_start_s", "rate_rps", "iat_dist", "iat_shape"]
    rates = pd.read_csv(rate_csv, usecols=lambda c: c in cols)
    _require_columns(rates, cols, file)
    rates = rates.loc[rates["model"] == model, cols]
    if rates.empty:
        raise TwinInputError(f"no rows for model {model!r}", file=file, field="model")
    n_win = int(np.ceil(duration_s / _SERVEGEN_WINDOW_S))
    if start_window_s is None:
        # the busiest span of the model: the peak hour is what capacity is planned for
        tot = rates.groupby("window_start_s")["rate_rps"].sum().sort_index()
        grid = np.arange(tot.index.min(), tot.index.max() + 1, _SERVEGEN_WINDOW_S)
        tot = tot.reindex(grid, fill_value=0.0).to_numpy()
        span = np.convolve(tot, np.ones(n_win), mode="valid") if len(tot) >= n_win else tot
        start_window_s = int(grid[int(np.argmax(span))])
    elif start_window_s % _SERVEGEN_WINDOW_S:
        raise TwinInputError(f"must be a multiple of {_SERVEGEN_WINDOW_S} s, got "
                             f"{start_window_s}", field="start_window_s")
    end = start_window_s + n_win * _SERVEGEN_WINDOW_S
    span = rates[(rates["window_start_s"] >= start_window_s) & (rates["window_start_s"] < end)]
    if span.empty:
        raise TwinInputError(f"no windows for {model!r} in [{start_window_s}, {end}) s",
                             file=file, field="window_start_s")
    return span, int(start_window_s)


def _servegen_quantiles(length_csv, model: str) -> tuple[pd.DataFrame, np.ndarray, list]:
    """Length quantile rows for input/output tokens and the probability knots they sit at."""
    file = str(length_csv)
    if not Path(length_csv).exists():
        raise TwinInputError("ServeGen length file not found", file=file)
    # q0..q100 at 1% steps plus the tail points q99.5 and q99.9, in probability order
    probs = np.r_[np.arange(100) / 100, 0.995, 0.999, 1.0]
    qcols = [f"q{i}" for i in range(100)] + ["q99_5", "q99_9", "q100"]
    cols = ["model", "client_id", "window_start_s", "field"] + qcols
    q = pd.read_csv(length_csv, usecols=lambda c: c in cols)
    _require_columns(q, cols, file)
    q = q[(q["model"] == model) & q["field"].isin(["input_tokens", "output_tokens"])]
    return q, probs, qcols


def _inverse_cdf(knots: np.ndarray, row: np.ndarray, probs: np.ndarray,
                 u: np.ndarray) -> np.ndarray:
    """Inverse CDF, linear between quantile knots: request k reads row ``row[k]`` of
    ``knots`` at probability ``u[k]`` (vectorised, no per-request copy of the row)."""
    j = np.clip(np.searchsorted(probs, u, side="right"), 1, len(probs) - 1)
    p0, p1 = probs[j - 1], probs[j]
    v0, v1 = knots[row, j - 1], knots[row, j]
    return v0 + (v1 - v0) * (u - p0) / (p1 - p0)


def servegen_tenants(rate_csv, length_csv, *, model: str = "m-large", n_tenants: int = 32,
                     duration_s: float = 3600, start_window_s: int | None = None,
                     total_rate: float | None = None, seed: int = 0) -> pd.DataFrame:
    """Per-tenant trace synthesised from ServeGen's per-client statistics, as ServeGen does.

    Tenants are the ``n_tenants`` clients of ``model`` with the most requests in the span
    (clients without length data are skipped); each becomes adapter
    ``f"{model}/client{client_id}"``. For each client and 600-s window with
    ``rate_rps > 0``, the gaps come from that window's Gamma/Weibull fit (``iat_shape``) and
    are rescaled to fill the window (as ServeGen's ``generate_workload``), so the window holds
    ``rate_rps * 600`` requests in expectation (stochastic rounding; ServeGen uses
    ``ceil - 1``). The fit's ``iat_scale`` cancels in that rescaling. Prompt/output lengths
    are drawn by inverse CDF, linear between the client's quantiles (q0..q100 plus q99.5 and
    q99.9) for the 6-h length window covering the arrival (nearest window when the client has
    none there); input and output are drawn independently (ServeGen reuses one uniform for
    both, which makes them comonotonic), rounded and clipped to >= 1.

    ``start_window_s`` (a multiple of 600) picks the span; None takes the model's busiest
    ``duration_s`` span. ``total_rate`` rescales all tenant rates by one factor so the
    tenants' mean aggregate rate is ``total_rate`` req/s (ServeGen's target-rate knob; the
    tenants' shares and the rate's shape over time are kept); None keeps the real rates
    (hundreds of req/s for ``m-large``). Annotation columns: ``client_id``, ``rate_rps`` (the
    tenant's rate in that window, after rescaling).
    """
    if n_tenants < 1:
        raise TwinInputError(f"need at least one tenant, got {n_tenants}", field="n_tenants")
    if not duration_s > 0:
        raise TwinInputError(f"duration must be > 0 s, got {duration_s}", field="duration_s")
    span, start = _servegen_windows(rate_csv, model, duration_s, start_window_s)
    q, probs, qcols = _servegen_quantiles(length_csv, model)
    has_len = set(q.loc[q["field"] == "input_tokens", "client_id"]) & set(
        q.loc[q["field"] == "output_tokens", "client_id"])
    traffic = span.groupby("client_id")["rate_rps"].sum()
    traffic = traffic[(traffic > 0) & traffic.index.isin(list(has_len))]
    traffic = traffic.sort_values(ascending=False, kind="stable")
    if len(traffic) < n_tenants:
        warnings.warn(f"only {len(traffic)} clients of {model!r} have traffic and lengths in "
                      f"this span; using them all instead of {n_tenants}", stacklevel=2)
    tenants = traffic.index[:n_tenants].to_numpy()
    win = span[span["client_id"].isin(tenants) & (span["rate_rps"] > 0)]
    win = win.sort_values(["client_id", "window_start_s"], kind="stable").reset_index(drop=True)
    scale = 1.0
    if total_rate is not None:
        n_win = np.ceil(duration_s / _SERVEGEN_WINDOW_S)
        scale = float(total_rate) / (win["rate_rps"].sum() / n_win)
    rate = win["rate_rps"].to_numpy() * scale
    rng = np.random.default_rng(seed)

    # requests per window: floor(rate * W) + Bernoulli(frac), unbiased for any rate
    expect = rate * _SERVEGEN_WINDOW_S
    if expect.sum() > MAX_REQUESTS:
        raise TwinInputError(f"{expect.sum():.3g} requests expected; at most "
                             f"{MAX_REQUESTS:,} fit in memory (lower --total-rate or "
                             f"--duration-s)", field="duration_s")
    count = (np.floor(expect) + (rng.random(len(win)) < expect % 1)).astype(np.int64)
    gaps_per = count + 1  # n arrivals need n+1 gaps to place them strictly inside the window
    shape = np.repeat(win["iat_shape"].to_numpy(dtype=np.float64), gaps_per)
    is_weibull = np.repeat((win["iat_dist"] == "Weibull").to_numpy(), gaps_per)
    gaps = np.empty(len(shape))
    gaps[~is_weibull] = rng.gamma(shape[~is_weibull])
    gaps[is_weibull] = rng.weibull(shape[is_weibull])
    w_id = np.repeat(np.arange(len(win)), gaps_per)
    first = np.r_[0, np.cumsum(gaps_per)[:-1]]
    sums = np.add.reduceat(gaps, first) if len(gaps) else np.zeros(0)
    sums = np.where(sums > 0, sums, 1.0)  # all-zero gaps (tiny Gamma shape): a single burst
    csum = np.cumsum(gaps)
    before = np.r_[0.0, csum][first]  # cumsum up to the window's first gap
    pos = (csum - np.repeat(before, gaps_per)) / np.repeat(sums, gaps_per)
    is_arrival = np.arange(len(gaps)) - np.repeat(first, gaps_per) < np.repeat(count, gaps_per)
    w_id, pos = w_id[is_arrival], np.minimum(pos[is_arrival], 1.0)
    t = (win["window_start_s"].to_numpy()[w_id] - start) + pos * _SERVEGEN_WINDOW_S
    keep = t < duration_s
    w_id, t = w_id[keep], t[keep]
    client = win["client_id"].to_numpy()[w_id]

    # lengths: the client's 6-h quantile window covering (or nearest to) the arrival's window
    need = pd.DataFrame({"client_id": client,
                         "window_start_s": win["window_start_s"].to_numpy()[w_id],
                         "i": np.arange(len(t))})
    lengths = {}
    for fld in ("input_tokens", "output_tokens"):
        tab = q[q["field"] == fld].sort_values("window_start_s", kind="stable")
        tab = tab.reset_index(drop=True)
        key = need.sort_values("window_start_s", kind="stable")
        m = pd.merge_asof(key, tab[["client_id", "window_start_s"]].assign(row=tab.index),
                          on="window_start_s", by="client_id", direction="backward")
        if m["row"].isna().any():  # no earlier window: take the client's nearest one
            near = pd.merge_asof(key, tab[["client_id", "window_start_s"]].assign(
                row=tab.index), on="window_start_s", by="client_id", direction="nearest")
            m["row"] = m["row"].fillna(near["row"])
        row = np.empty(len(t), dtype=np.int64)
        row[m["i"].to_numpy()] = m["row"].to_numpy(dtype=np.int64)
        knots = np.maximum.accumulate(tab[qcols].to_numpy(dtype=np.float64), axis=1)
        lengths[fld] = _inverse_cdf(knots, row, probs, rng.random(len(t)))
    order = np.argsort(t, kind="stable")
    names = np.array([f"{model}/client{c}" for c in tenants], dtype=object)
    code = pd.Index(tenants).get_indexer(client)
    df = pd.DataFrame({
        "arrival_s": t[order],
        "adapter": pd.array(names[code[order]], dtype="string"),
        "prompt_tokens": np.maximum(np.rint(lengths["input_tokens"][order]), 1),
        "output_tokens": np.maximum(np.rint(lengths["output_tokens"][order]), 1),
        "client_id": client[order].astype(np.int64),
        "rate_rps": rate[w_id][order],
    })
    return validate_trace(df, source=f"servegen:{model}")


# -- ShareGPT length pool ---------------------------------------------------------------------

def _clip_pool(p: np.ndarray, o: np.ndarray, max_prompt: int, max_total: int):
    p = np.clip(p, 4, max_prompt)
    o = np.clip(o, 4, np.maximum(max_total - p, 4))
    return p, o


def sharegpt_length_pool(path: str | Path, *, max_prompt: int = 1024, max_total: int = 2048,
                         target_means: tuple[float, float] | None = None) -> np.ndarray:
    """ShareGPT (prompt, output) pairs under vLLM's benchmark filter, as an int array (n, 2).

    Filter (vLLM ``benchmark_serving`` ShareGPT): 4 <= prompt <= ``max_prompt``,
    output >= 4, prompt + output <= ``max_total``. The shared stats file is whole
    conversations in the Llama-2 tokenizer (the filter leaves 11,035 pairs averaging
    378 / 419 tokens), while the vLLM-H100 runs used first-two-turn pools in the Llama-3
    tokenizer averaging 223 / 196 (:data:`VLLM_H100_POOL_MEANS`). ``target_means=(p, o)``
    keeps the file's *shape* and moves its means: each column is multiplied by one factor,
    rounded and clipped back into the filter (prompt in [4, max_prompt], output in
    [4, max_total - prompt]); since clipping moves the mean, the factors are refined by a few
    fixed-point steps (factor *= target / achieved) until both means are within 0.5 token.
    Row order is the file's, so pools are deterministic.
    """
    file = str(path)
    if not Path(path).exists():
        raise TwinInputError("ShareGPT stats file not found", file=file)
    raw = pd.read_csv(path)
    _require_columns(raw, ("num_prefill_tokens", "num_decode_tokens"), file)
    p, _ = _tokens(raw, "num_prefill_tokens", file)
    o, _ = _tokens(raw, "num_decode_tokens", file)
    keep = (p >= 4) & (p <= max_prompt) & (o >= 4) & (p + o <= max_total)
    p, o = p[keep].astype(np.float64), o[keep].astype(np.float64)
    if not len(p):
        raise TwinInputError("no request survives the length filter", file=file)
    if target_means is not None:
        tp, to = map(float, target_means)
        if not (4 <= tp <= max_prompt and 4 <= to <= max_total - 4):
            raise TwinInputError(f"target means {target_means} outside the filter's range",
                                 field="target_means")
        sp, so = tp / p.mean(), to / o.mean()
        for _ in range(50):
            pp, oo = _clip_pool(np.rint(p * sp), np.rint(o * so), max_prompt, max_total)
            ep, eo = tp / pp.mean(), to / oo.mean()
            if abs(pp.mean() - tp) < 0.5 and abs(oo.mean() - to) < 0.5:
                break
            sp, so = sp * ep, so * eo
        p, o = pp, oo
    return np.column_stack([p, o]).astype(np.int64)
