"""The adapter a run held back most: what the starvation verdict cannot see.

The verdict (``load_spans``) asks whether the server keeps up with the whole offered
load. A server can keep up in total while one adapter's requests sit in the queue for
tens of seconds: ``max_loras`` slots all held by busier adapters (vLLM's scheduler skips
a request whose adapter would need a slot none frees), or a long prompt waiting for KV
blocks. Each request's wait to be scheduled (its first scheduling, else the run's end:
a lower bound) is averaged per adapter; the adapter with the longest mean wait is
reported beside the others' mean, and called *held back* when it waited at least
``HELD_RATIO`` times as long and ``HELD_MIN_S`` longer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from twin.sched.request import BASE_MODEL

#: an adapter whose requests waited this many times the others' mean ...
HELD_RATIO = 5.0
#: ... and at least this many seconds more is held back (a few ms apart is noise)
HELD_MIN_S = 1.0
#: fewer requests than this say too little about an adapter (one unlucky arrival)
MIN_REQUESTS = 3
#: statuses of requests no server queued
NOT_RECEIVED = ("rejected", "failed", "unserved")


def slowest_adapter(req: pd.DataFrame, end_s: float) -> dict | None:
    """The adapter whose offered requests waited longest on average to be scheduled
    (``requests``, ``wait_mean_s``), the other adapters' mean wait over their requests
    (``others_wait_mean_s``) and whether it was ``held_back``; None with fewer than two
    adapters (the base model counts as one) of ``MIN_REQUESTS`` requests or more."""
    # the requests a server received: not those vLLM refused, a client's cap failed, or no
    # server of a deployment served (they never waited in a queue). Worked on whole
    # columns, in place: a run's table has 10^6 rows, held while its summary is made
    codes, names = pd.factorize(req["adapter"], use_na_sentinel=True)
    base, skip = len(names), len(names) + 1   # the base model's bucket; the not received
    codes[codes < 0] = base
    status, kinds = pd.factorize(req["status"])
    codes[np.isin(status, [i for i, k in enumerate(kinds) if k in NOT_RECEIVED])] = skip
    del status
    wait = req["first_scheduled_s"].to_numpy(dtype=float, copy=True)
    np.copyto(wait, end_s, where=np.isnan(wait))
    np.subtract(wait, req["arrival_s"].to_numpy(dtype=float), out=wait)
    np.maximum(wait, 0.0, out=wait)
    n = np.bincount(codes, minlength=skip + 1)[:skip]
    total = np.bincount(codes, weights=wait, minlength=skip + 1)[:skip]
    if n.sum() == 0:
        return None
    ok = n >= MIN_REQUESTS
    if ok.sum() < 2:
        return None
    mean = np.where(ok, total / np.maximum(n, 1), -np.inf)
    k = int(np.argmax(mean))
    others = (total.sum() - total[k]) / max(n.sum() - n[k], 1)
    name = BASE_MODEL if k == base else str(names[k])
    return {"adapter": name, "requests": int(n[k]), "wait_mean_s": float(mean[k]),
            "others_wait_mean_s": float(others),
            "held_back": bool(mean[k] >= HELD_RATIO * others and
                              mean[k] - others >= HELD_MIN_S)}


def held_back_note(s: dict) -> str | None:
    """The summary's note when one adapter was held back in a run that keeps up (None
    otherwise: a starving run's verdict already says its queue waits)."""
    a = s.get("slowest_adapter")
    if not a or not a["held_back"] or s.get("starving"):
        return None
    return (f"adapter {a['adapter']}'s {a['requests']} requests waited {a['wait_mean_s']:.1f} s "
            f"on average to be scheduled, the other adapters' {a['others_wait_mean_s']:.2f} s: "
            "the verdict is over the whole load and does not see one adapter held back "
            "(adapter slots held by busier adapters, or its prompts' KV blocks); its "
            "requests' times are in requests.parquet")
