"""The per-request results are columns, kept lean (issue 13: a starving hour's peak RSS).

A starving hour records ~3*10^5 requests: the outcome columns live for the whole run and the
request table is built at its end, beside everything the run still holds, where the peak
memory is. These tests pin the footprint of both and that the table stays what it was.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd

from twin.results.recorder import Outcomes
from twin.sched.request import RequestStatus
from twin.workload.schema import validate_trace

N = 100_000


def _trace(n: int = N) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return validate_trace(pd.DataFrame({
        "arrival_s": np.sort(rng.random(n) * 100),
        "adapter": pd.array([f"lora-{i % 50}" if i % 7 else None for i in range(n)],
                            dtype="string"),
        "prompt_tokens": rng.integers(1, 500, n),
        "output_tokens": rng.integers(1, 500, n)}))


def _outcomes(trace: pd.DataFrame) -> Outcomes:
    """Half the requests finished, some rejected, the rest never scheduled (waiting)."""
    n = len(trace)
    out = Outcomes(trace["output_tokens"].to_numpy())
    done = np.arange(n) % 2 == 0
    out.status[done] = RequestStatus.FINISHED
    out.status[np.arange(n) % 10 == 1] = RequestStatus.REJECTED
    out.generated[done] = out.output[done]
    out.first_scheduled[done] = trace["arrival_s"].to_numpy()[done] + 0.1
    out.first_token[done] = out.first_scheduled[done] + 0.1
    out.finish[done] = out.first_token[done] + 1.0
    out.preemptions[np.arange(n) % 4 == 0] = 2
    return out


def test_outcome_columns_cost_at_most_40_bytes_a_request():
    # three float64 times (24 B) plus output, generated, preemptions and status: int64 each
    # (56 B a request before) held 2.3 MB more per 10^5 requests through the whole run
    out = Outcomes(np.ones(N, dtype=np.int64))
    held = sum(v.nbytes for v in vars(out).values() if isinstance(v, np.ndarray))
    assert held / N <= 40


def test_request_table_takes_its_columns_without_a_second_copy():
    # built from numpy status names and copied by pd.DataFrame, the table peaked at 1.6x
    # its numeric columns (traced allocations; the Arrow string storage is not traced)
    trace = _trace()
    out = _outcomes(trace)
    Outcomes(np.ones(3, dtype=np.int64)).table(trace.iloc[:3])   # first-call set-up
    tracemalloc.start()
    try:
        req = out.table(trace)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    numeric = sum(req[c].to_numpy().nbytes for c in req.columns if req[c].dtype.kind in "if")
    assert peak <= 1.2 * numeric, (peak, numeric)


def test_request_table_columns_and_values_are_unchanged():
    """The lean build gives the table it gave before: int64 counts, float64 times with NaN
    for never, status names, the trace's columns (compared with the plain construction)."""
    trace = _trace(1000)
    out = _outcomes(trace)
    req = out.table(trace)
    names = np.array([RequestStatus.NAMES[s] for s in range(len(RequestStatus.NAMES))])
    want = pd.DataFrame({
        "request_id": trace["request_id"].to_numpy(),
        "arrival_s": trace["arrival_s"].to_numpy(),
        "adapter": trace["adapter"].array,
        "prompt_tokens": trace["prompt_tokens"].to_numpy(),
        "output_tokens": out.output.astype(np.int64),
        "generated_tokens": out.generated.astype(np.int64),
        "first_scheduled_s": out.first_scheduled,
        "first_token_s": out.first_token,
        "finish_s": out.finish,
        "preemptions": out.preemptions.astype(np.int64),
        "status": names[out.status],
    })
    for col in ("first_scheduled_s", "first_token_s", "finish_s"):
        want.loc[want[col] < 0, col] = np.nan
    pd.testing.assert_frame_equal(req, want)
    assert set(req["status"]) == {"finished", "rejected", "waiting"}
    assert req["finish_s"].isna().sum() == 500
