"""Per-tenant traces synthesised from ServeGen's per-client statistics (rate windows and
length quantiles in ``shared/data/traces/``), as ServeGen's own generator does: ServeGen's
clients are real tenants, each served as one adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from twin.errors import TwinInputError
from twin.workload.generate import MAX_REQUESTS
from twin.workload.schema import validate_trace
from twin.workload.values import require_columns

_SERVEGEN_WINDOW_S = 600   # ServeGen's rate windows (s)


def _servegen_windows(rate_csv, model: str, duration_s: float,
                      start_window_s: int | None) -> tuple[pd.DataFrame, int]:
    """The model's 600-s rate windows covering ``[start, start + duration)``."""
    file = str(rate_csv)
    if not Path(rate_csv).exists():
        raise TwinInputError("ServeGen rate file not found", file=file)
    cols = ["model", "client_id", "window_start_s", "rate_rps", "iat_dist", "iat_shape"]
    rates = pd.read_csv(rate_csv, usecols=lambda c: c in cols)
    require_columns(rates, cols, file)
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
    require_columns(q, cols, file)
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
