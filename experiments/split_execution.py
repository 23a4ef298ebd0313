"""Split execution (issue 19): the executor's split mode against the single-process
executor and PEFT, and the twin's ``split`` policy against the executor's split mode.

1. **tokens_identical**: one burst of LoRA and base-model requests served by the
   single-process executor and by the split mode with 3 clients (greedy): same tokens.
2. **peft_methods**: each PEFT kind (LoRA, IA³, prefix tuning, prompt tuning), written by
   PEFT itself, run through ``twin.executor.peft_methods`` (``load_peft`` +
   ``reference_forward``) and compared with ``PeftModel`` on the HF model: the kinds whose
   logits agree within 1e-4.
3. **Calibration**: two runs of the split mode (1 and 2 clients) on their own workloads
   (``twin.calibrate.split_design``, as ``twin calibrate --executor --policy split``);
   ``twin.calibrate.split_fit`` fits the base's per-op batch cost, the link and the
   clients' local cost by regression, then the base's time per request handled by
   simulating the 2-client run (``fit_base_overhead``).
4. **Validation**: four other workloads (1-3 clients, light to busy, short and long
   prompts) served by the split mode and simulated by the twin's ``split`` policy with
   the fitted costs, the clients' KV pools as the executor chose them: SMAPE of
   throughput, mean TTFT, mean ITL per workload, medians.
5. **Fine-tuning**: one workload served by 2 inference clients without and with a LoRA
   training client on the same base (``twin.executor.split.colocated``): inference ITL
   slowdown and training tokens/s; the twin's prediction of the slowdown with a job
   training as fast as the base lets it.

Executor runs take the shared timing lock (``/work/timing.lock``) one at a time; the
rest runs without it. On this 2-core box the base and client processes share two cores
with each other (and with whatever else runs): timings are noisy.

    .venv/bin/python experiments/split_execution.py           # ~6 min on 2 idle cores
    .venv/bin/python experiments/split_execution.py --quick   # fewer, shorter workloads

Writes experiments/split_results.json; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from twin.calibrate.split_design import (CALIBRATION, CONFIG, figures, fit_calibration,
                                         twin_split, workload)
from twin.calibrate.split_fit import save_split_costs
from twin.results import smape
from twin.workload.catalog import AdapterCatalog

HERE = Path(__file__).resolve().parent
LOCK = Path("/work/timing.lock")
TINY = dict(seed=0, initializer_range=0.2, tie_word_embeddings=False,
            max_position_embeddings=512)
PEFT_ATOL = 1e-4
#: as CALIBRATION (twin.calibrate.split_design): name, clients, requests, rate (req/s),
#: prompt range, output range, base-model share, seed
WORKLOADS = [("light-1client", 1, 30, 3.0, (8, 64), (8, 32), 0.2, 21),
             ("busy-2clients", 2, 60, 10.0, (8, 64), (8, 40), 0.1, 22),
             ("long-prompts-2clients", 2, 30, 4.0, (96, 200), (8, 24), 0.2, 23),
             ("three-clients", 3, 45, 6.0, (8, 80), (8, 32), 0.2, 24)]


_HELD = [0]


@contextlib.contextmanager
def timing_lock():
    """The shared lock every timing-sensitive run holds (waits while another holds it);
    re-entrant, so that main can hold it over every executor run at once."""
    if _HELD[0] or not LOCK.parent.exists():
        _HELD[0] += 1
        try:
            yield
        finally:
            _HELD[0] -= 1
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _HELD[0] += 1
        try:
            yield
        finally:
            _HELD[0] -= 1
            fcntl.flock(f, fcntl.LOCK_UN)


def setup(root: Path):
    from twin.executor.adapters import write_synthetic_adapters  # lazy: torch
    from twin.executor.weights import make_tiny_llama  # lazy: torch

    model = make_tiny_llama(root / "model", **TINY)
    cat = AdapterCatalog(write_synthetic_adapters(model, root / "adapters", 4, ranks=(8, 16)))
    return model, cat


CACHE: Path | None = None


def cached(name: str, fn):
    """``fn()``, or what it returned before under ``name`` in ``--cache`` (executor runs
    are minutes of the timing lock; the twin side can be re-run on them)."""
    path = CACHE / f"{name}.pkl" if CACHE is not None else None
    if path is not None and path.exists():
        return pickle.loads(path.read_bytes())
    got = fn()
    if path is not None:
        path.write_bytes(pickle.dumps(got))
    return got


def run_split(trace, model, cat, clients, name: str, **kw):
    from twin.executor.split import execute_split  # lazy: torch

    def run():
        with timing_lock():
            return execute_split(trace, CONFIG, model, cat, clients=clients, timeout_s=600,
                                 **kw)
    return cached(name, run)


def tokens_identical(model, cat) -> bool:
    from twin.executor.engine import execute  # lazy: torch

    tr = workload(cat, "burst", 1, 12, 1000.0, (5, 40), (2, 8), 0.2, 0)

    def single():
        with timing_lock():
            return execute(tr, CONFIG, model, cat, keep_tokens=True, threads=1)
    ref = cached("single-process", single)
    got = run_split(tr, model, cat, 3, "split-3clients", keep_tokens=True)
    return [list(t) for t in ref.requests["output_token_ids"]] == \
        [list(t) for t in got.requests["output_token_ids"]]


def peft_methods(root: Path) -> list[str]:
    """The PEFT kinds whose logits equal PeftModel's (see the module docstring)."""
    import torch  # lazy: torch
    from peft import PeftModel  # lazy: peft is heavy
    from transformers import LlamaForCausalLM  # lazy: transformers is heavy

    from twin.executor.model import LlamaModel  # lazy: torch
    from twin.executor.peft_methods import (load_peft, reference_forward,  # lazy: torch
                                            write_synthetic_peft_adapters)
    from twin.executor.weights import make_tiny_llama  # lazy: torch

    model_dir = make_tiny_llama(root / "peft-model", seed=0, max_position_embeddings=256)
    cat = write_synthetic_peft_adapters(model_dir, root / "peft", virtual_tokens=5, seed=1)
    model = LlamaModel.from_pretrained(model_dir)
    ok = []
    ids = [3, 17, 99, 4, 200, 31, 7]
    for kind, path in zip(cat["kind"], cat["path"]):
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            want = PeftModel.from_pretrained(base, str(path)).eval()(
                torch.tensor([ids])).logits[0, -len(ids):]
            got = reference_forward(model, load_peft(path, model.shape), ids)
        if torch.allclose(got, want, atol=PEFT_ATOL, rtol=0):
            ok.append(str(kind))
    return ok


def validate(model, cat, costs_for, workloads) -> list[dict]:
    """Twin vs executor per workload; ``costs_for(name)``: the costs to simulate it with."""
    rows = []
    for w in workloads:
        trace = workload(cat, *w)
        ex = run_split(trace, model, cat, w[1], w[0])   # cached: run before, under the lock
        kv = ex.summary["kv_cache"]["capacity_tokens"] // w[1]
        tw = twin_split(trace, cat, costs_for(w[0]), w[1], kv)
        f = figures(tw, ex)
        row = {"workload": w[0], "clients": w[1], "requests": w[2]}
        for k, (a, b) in f.items():
            row[f"{k}_twin"], row[f"{k}_executor"] = a, b
            row[f"{k}_smape_pct"] = float(smape(a, b, percent=True))
        row["mean_clients_per_batch"] = ex.summary["split"]["mean_clients_per_batch"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


FINETUNE = dict(batch=2, seq_len=32, rank=8)


def finetune_executor(model, cat, w) -> dict:
    """The executor's co-located fine-tuning figures (``finetune_interference``)."""
    from twin.executor.split import TrainerSpec  # lazy: torch
    from twin.executor.split.colocated import finetune_interference  # lazy: torch

    def run():
        with timing_lock():
            return finetune_interference(workload(cat, *w), CONFIG, model, cat, clients=w[1],
                                         trainer=TrainerSpec(**FINETUNE), timeout_s=600)
    return dict(cached("finetune", run))


def finetune(model, cat, costs, w) -> dict:
    """The executor's figures and the twin's: the same clients without and with a job
    training as fast as the base lets it (the executor's trainer runs back to back)."""
    trace = workload(cat, *w)
    got = finetune_executor(model, cat, w)
    tokens = FINETUNE["batch"] * FINETUNE["seq_len"]
    alone = twin_split(trace, cat, costs, w[1])
    shared = twin_split(trace, cat, costs, w[1], finetune_tokens_per_s=float("inf"),
                        finetune_tokens_per_step=tokens)
    got["twin_itl_slowdown_pct"] = float(100 * (shared.summary["itl_ms"]["mean"]
                                                / alone.summary["itl_ms"]["mean"] - 1))
    got["twin_train_tokens_per_s"] = shared.summary["split"]["finetune_tokens_per_s"]
    return got


def medians(rows: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    return {k: float(df[f"{k}_smape_pct"].median()) for k in ("throughput", "ttft", "itl")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two validation workloads")
    ap.add_argument("--out", type=Path, default=HERE / "split_results.json")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep the executor's runs here and reuse them on the next run")
    args = ap.parse_args(argv)
    global CACHE
    CACHE = args.cache
    if CACHE is not None:
        CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="split-exp-") as tmp:
        root = Path(tmp)
        model, cat = setup(root)
        valid = WORKLOADS[:2] if args.quick else WORKLOADS
        with timing_lock():   # every executor run at once (each one cached)
            same = tokens_identical(model, cat)
            cal = [run_split(workload(cat, *w), model, cat, w[1], w[0]) for w in CALIBRATION]
            for w in valid:
                run_split(workload(cat, *w), model, cat, w[1], w[0])
            finetune_executor(model, cat, WORKLOADS[1])
        print(f"tokens_identical: {same}", flush=True)
        kinds = peft_methods(root)
        print(f"peft_methods: {kinds}", flush=True)
        costs = fit_calibration(cat, list(zip(CALIBRATION, cal)))
        save_split_costs(costs, args.out.with_suffix(".costs.json"))
        print("fitted:", json.dumps(costs.notes, default=float), flush=True)
        rows_cal = validate(model, cat, lambda name: costs, valid)
        # leave one workload out: fitted on the other validation runs, taken minutes apart
        # at most (the box's speed drifts far more between the calibration runs and these)
        exs = {w[0]: run_split(workload(cat, *w), model, cat, w[1], w[0]) for w in valid}
        loo = {w[0]: fit_calibration(cat, [(v, exs[v[0]]) for v in valid if v is not w])
               for w in valid}
        rows = validate(model, cat, loo.get, valid)
        every = fit_calibration(cat, [(v, exs[v[0]]) for v in valid])
        fine = finetune(model, cat, every, WORKLOADS[1])
    m, m_cal = medians(rows), medians(rows_cal)
    out = {
        "tokens_identical": bool(same), "peft_methods": len(kinds), "peft_kinds": kinds,
        "twin_vs_executor_throughput_smape_median": m["throughput"],
        "twin_vs_executor_ttft_smape_median": m["ttft"],
        "twin_vs_executor_itl_smape_median": m["itl"],
        "validation": "leave one workload out (fitted on the other validation runs)",
        "calibration_runs_smape_medians": m_cal,
        "finetune_inference_itl_slowdown_pct": fine["itl_slowdown_pct"],
        "finetune_train_tokens_per_s": fine["train_tokens_per_s"],
        "twin_finetune_itl_slowdown_pct": fine["twin_itl_slowdown_pct"],
        "twin_finetune_train_tokens_per_s": fine["twin_train_tokens_per_s"],
        "workloads": len(rows), "wall_s": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps({"summary": out, "workloads": rows,
                                    "workloads_calibration_runs": rows_cal, "finetune": fine},
                                   indent=2, default=float) + "\n")
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
