"""The split-mode calibration (issue 19): which executor runs the split costs are fitted to,
and the fit's sequence, shared by ``twin calibrate --executor --policy split`` and
``experiments/split_execution.py``.

The design is one run of the executor's split mode per client count, 1 to ``clients_max``
(default 2), each on its own Poisson workload of LoRA and base-model requests
(:data:`CALIBRATION`; ``quick``: a quarter of the requests, for tests and quick looks).
:func:`fit_calibration` fits ``twin.calibrate.split_fit``'s regressions to the runs, then
the base's time per request handled by simulating the several-client ones with the twin's
``split`` policy (``fit_base_overhead``): one-client runs cannot tell it from the pipe's
latency.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from twin.calibrate.executor import m_name
from twin.calibrate.split_fit import fit_base_overhead, fit_split_costs
from twin.config import ServingConfig
from twin.costs.profile import load_profile
from twin.errors import TwinInputError
from twin.policies import get_policy
from twin.results import smape
from twin.workload.catalog import AdapterCatalog

CONFIG = ServingConfig(enable_lora=True, max_loras=4, max_lora_rank=16, max_model_len=256)
#: name, clients, requests, rate (req/s), prompt range, output range, base-model share, seed
CALIBRATION = [("cal-1client", 1, 40, 6.0, (8, 96), (8, 48), 0.2, 11),
               ("cal-2clients", 2, 48, 8.0, (8, 96), (8, 48), 0.2, 12)]
#: the profile whose memory model the twin's side runs with (its shape: the model's)
PROFILE = "cpu-tiny"


def calibration_workloads(clients_max: int = 2, quick: bool = False) -> list[tuple]:
    """One workload per client count 1..``clients_max`` (:data:`CALIBRATION`'s, and more
    like them past 2 clients); ``quick``: a quarter of the requests, shorter outputs."""
    if int(clients_max) < 1:
        raise TwinInputError(f"must be >= 1, got {clients_max}", field="--clients-max")
    out = list(CALIBRATION[:clients_max])
    for c in range(len(CALIBRATION) + 1, int(clients_max) + 1):
        out.append((f"cal-{c}clients", c, 24 * c, 4.0 * c, (8, 96), (8, 48), 0.2, 10 + c))
    if quick:
        out = [(w[0], w[1], max(4 * w[1], w[2] // 4), w[3], w[4], (4, 16), *w[6:])
               for w in out]
    return out


def workload(cat: AdapterCatalog, name, clients, n, rate, prompt, output, base, seed):
    """Poisson arrivals; adapters in turn (a ``base`` share of base-model requests)."""
    rng = np.random.default_rng(seed)
    names = cat.adapters
    ad = [None if rng.random() < base else names[i % len(names)] for i in range(n)]
    return pd.DataFrame({
        "request_id": np.arange(n), "arrival_s": np.cumsum(rng.exponential(1 / rate, n)),
        "adapter": pd.array(ad, dtype="string"),
        "prompt_tokens": rng.integers(*prompt, n), "output_tokens": rng.integers(*output, n)})


def twin_split(trace, cat, costs, clients, kv=None, profile=None, **opts):
    """The twin's ``split`` run of a workload the executor served (its catalog, so the
    same adapter -> client assignment; ``kv``: its clients' KV pools). The executor's
    processes (base, clients, trainer) share the machine's cores with each other, so the
    twin runs the clients' local work on the base's queue (``shared_compute``: one
    processor), as for clients on the base's own GPU."""
    pol = get_policy("split", clients=clients, costs=costs, layer_groups=None,
                     client_kv_tokens=kv, shared_compute=True, **opts)
    profile = profile if profile is not None else load_profile(PROFILE)
    return pol.simulate(trace, CONFIG.replace(policy="split"), profile, cat).result


def figures(twin, ex) -> dict:
    """``{metric: (twin, executor)}``: total throughput, mean TTFT, mean ITL."""
    t, e = twin.summary, ex.summary
    return {"throughput": (t["total_throughput"], e["total_throughput"]),
            "ttft": (t["ttft_ms"]["mean"], e["ttft_ms"]["mean"]),
            "itl": (t["itl_ms"]["mean"], e["itl_ms"]["mean"])}


def fit_calibration(cat, pairs, profile=None, log=None):
    """The regression fit on ``pairs`` of (workload, executor result), then the base's
    per-request time by simulating the several-client ones (``fit_base_overhead``; the
    TTFT and ITL SMAPEs summed). ``profile``: the twin's (default :data:`PROFILE`)."""
    profile = profile if profile is not None else load_profile(PROFILE)
    costs = fit_split_costs([ex for _, ex in pairs], profile.model)
    tried = [0]

    def score(c) -> float:
        err = 0.0
        for w, ex in pairs:
            if w[1] > 1:
                tw = twin_split(workload(cat, *w), cat, c, w[1],
                                ex.summary["kv_cache"]["capacity_tokens"] // w[1], profile)
                err += sum(float(smape(a, b)) for k, (a, b) in figures(tw, ex).items()
                           if k != "throughput")
        tried[0] += 1
        if log is not None:
            log(f"  base time per request {1e3 * c.base.per_request:.3f} ms: "
                f"error {err:.4f} ({tried[0]} tried)")
        return err
    return fit_base_overhead(costs, score)


def model_profile(model_dir: Path, name: str):
    """:data:`PROFILE` with the shape of the model in ``model_dir`` (float32, as the split
    mode runs it)."""
    from twin.executor.model import LlamaModel   # lazy: needs torch

    shape = LlamaModel.from_pretrained(model_dir).cost_shape(name)
    return replace(load_profile(PROFILE), model=shape)


def run_calibration(model_dir: Path, cat, workloads, *, timeout_s: float = 600.0,
                    log=print) -> list:
    """(workload, executor result) of each workload served by the split mode."""
    from twin.executor.split import execute_split   # lazy: torch

    pairs = []
    for i, w in enumerate(workloads):
        t0 = time.perf_counter()
        log(f"run {i + 1}/{len(workloads)}: {w[0]} ({w[1]} client(s), {w[2]} requests)")
        ex = execute_split(workload(cat, *w), CONFIG, model_dir, cat, clients=w[1],
                           timeout_s=timeout_s)
        log(f"  done in {time.perf_counter() - t0:.1f} s "
            f"({ex.summary['total_throughput']:.0f} tok/s)")
        pairs.append((w, ex))
    return pairs


def calibrate_split(model: str = "tiny", *, clients_max: int = 2, quick: bool = False,
                    adapters: int = 4, log=print):
    """``twin calibrate --executor --policy split``: the model (``tiny``, ``smollm2`` or an
    HF Llama directory) served by the split mode on :func:`calibration_workloads` with
    ``adapters`` synthetic LoRA adapters (ranks 8 and 16), and the costs fitted to it
    (:func:`fit_calibration`); the notes record the model and the runs."""
    from twin.executor.adapters import write_synthetic_adapters   # lazy: torch
    from twin.executor.weights import resolve_model   # lazy: torch

    t0 = time.perf_counter()
    model_dir = resolve_model(model)
    workloads = calibration_workloads(clients_max, quick)
    with tempfile.TemporaryDirectory(prefix="twin-split-cal-") as tmp:
        cat = AdapterCatalog(write_synthetic_adapters(model_dir, Path(tmp) / "adapters",
                                                      adapters, ranks=(8, 16)))
        profile = model_profile(model_dir, m_name(model, model_dir))
        pairs = run_calibration(model_dir, cat, workloads, log=log)
        log("fitting the split costs"
            + (" and the base's time per request" if clients_max > 1 else ""))
        costs = fit_calibration(cat, pairs, profile, log=log)
    costs.notes.update({"model": profile.model.name, "model_dir": str(model_dir),
                        "workloads": [w[0] for w in workloads], "quick": bool(quick),
                        "calibration_s": round(time.perf_counter() - t0, 1)})
    return costs
