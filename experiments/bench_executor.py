"""Throughput of the batched multi-LoRA engine vs HF PEFT's own multi-adapter path.

The same trace — every request on one of 16 synthetic adapters (ranks 8/16), all arriving
at once, prompt and output lengths uniform as in S-LoRA's workload (scaled down) — is
served by

- the executor (``twin.executor.execute``): vLLM V1 continuous batching, chunked prefill,
  paged KV cache, adapters in ``max_loras = 16`` slots (preloaded), one mixed batch per
  step computed segment-wise by adapter;
- PEFT: one ``PeftModel`` with the 16 adapters loaded, requests in static batches of the
  same size (``max_num_seqs``) in arrival order, left-padded, ``generate(...,
  adapter_names=[...])`` per batch (PEFT's mixed-adapter batch inference). HF generation
  cannot stop a sequence at its own length without EOS, so each batch runs to its longest
  output; only each request's own tokens are counted.

Throughput = (prompt + output tokens of the requests) / wall time; the median of repeats,
one CPU thread (``torch.set_num_threads(1)``), fp32. Adapter loading is outside the timed
region for both. Run on CUDA with ``--device cuda`` (both sides on the GPU).

Ends with one JSON line: speedup_vs_peft_tiny, speedup_vs_peft_smollm2, device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from twin.config import ServingConfig  # noqa: E402
from twin.executor.adapters import write_synthetic_adapters  # noqa: E402
from twin.executor.engine import execute  # noqa: E402
from twin.executor.inputs import prompt_token_ids  # noqa: E402
from twin.executor.model import LlamaModel  # noqa: E402
from twin.executor.weights import make_tiny_llama, smollm2_dir  # noqa: E402
from twin.workload.catalog import AdapterCatalog  # noqa: E402

N_ADAPTERS = 16
# per model: requests, prompt and output length ranges (uniform, S-LoRA's [8, 512) scaled
# down to CPU sizes), batch size (max_num_seqs = PEFT's static batch), repeats
SETUPS = {
    "tiny": dict(n=64, prompt=(8, 127), output=(8, 127), batch=16, repeats=3),
    "smollm2": dict(n=16, prompt=(8, 47), output=(8, 47), batch=8, repeats=3),
}


def make_trace(n, prompt, output, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "request_id": np.arange(n), "arrival_s": np.zeros(n),
        "adapter": pd.array([f"lora-{i % N_ADAPTERS:04d}" for i in rng.permutation(n)],
                            dtype="string"),
        "prompt_tokens": rng.integers(prompt[0], prompt[1] + 1, n),
        "output_tokens": rng.integers(output[0], output[1] + 1, n)})


def run_engine(model, trace, catalog, batch) -> float:
    cfg = ServingConfig(max_loras=N_ADAPTERS, max_cpu_loras=N_ADAPTERS, max_lora_rank=16,
                        max_num_seqs=batch, max_num_batched_tokens=2048, max_model_len=512,
                        preload_adapters=True)
    res = execute(trace, cfg, model, catalog)
    assert res.summary["completed"] == len(trace), res.summary
    return res.summary["duration_s"]


def load_peft(model_dir, catalog, device):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    names, paths = list(catalog.table["adapter"]), list(catalog.table["path"])
    peft = PeftModel.from_pretrained(base, paths[0], adapter_name=names[0])
    for a, p in zip(names[1:], paths[1:]):
        peft.load_adapter(p, adapter_name=a)
    return peft.eval()


def run_peft(peft, trace, batch, vocab, device) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for b0 in range(0, len(trace), batch):
        rows = trace.iloc[b0:b0 + batch]
        prompts = [prompt_token_ids(int(r.request_id), int(r.prompt_tokens), vocab)
                   for r in rows.itertuples()]
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):          # left padding, as generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        steps = int(rows["output_tokens"].max())
        with torch.no_grad():
            peft.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                          adapter_names=list(rows["adapter"]), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    sync()
    return time.perf_counter() - t0


def bench(name, model_dir, workdir, device, repeats=None) -> dict:
    s = SETUPS[name]
    repeats = repeats or s["repeats"]
    catalog = AdapterCatalog(write_synthetic_adapters(model_dir, workdir / f"ad-{name}",
                                                      N_ADAPTERS, ranks=(8, 16)))
    trace = make_trace(s["n"], s["prompt"], s["output"])
    tokens = int(trace["prompt_tokens"].sum() + trace["output_tokens"].sum())
    model = LlamaModel.from_pretrained(model_dir, device=device)
    peft = load_peft(model_dir, catalog, device)
    vocab = model.shape.vocab
    run_engine(model, trace.iloc[:4], catalog, s["batch"])        # warm-up
    run_peft(peft, trace.iloc[:4], s["batch"], vocab, device)
    eng, pft = [], []
    for _ in range(repeats):
        eng.append(run_engine(model, trace, catalog, s["batch"]))
        pft.append(run_peft(peft, trace, s["batch"], vocab, device))
    e, p = statistics.median(eng), statistics.median(pft)
    return {"model": name, "requests": len(trace), "tokens": tokens, "batch": s["batch"],
            "engine_s": e, "peft_s": p, "engine_tok_s": tokens / e, "peft_tok_s": tokens / p,
            "speedup": p / e, "repeats": repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=None, help="override the repeats")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            if name == "tiny":
                model_dir = make_tiny_llama(tmp / "tiny")
            else:
                model_dir = smollm2_dir()
            r = bench(name, Path(model_dir), tmp, args.device, args.repeats)
            rows.append(r)
            print(f"{name}: engine {r['engine_tok_s']:.0f} tok/s, PEFT {r['peft_tok_s']:.0f} "
                  f"tok/s, speedup {r['speedup']:.2f}x", file=sys.stderr, flush=True)
    device_name = (torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
                   else f"cpu ({args.threads} thread{'s' if args.threads > 1 else ''})")
    print(f"\nmulti-LoRA throughput, {N_ADAPTERS} adapters, {device_name}, median of repeats")
    print(f"{'model':<9}{'requests':>9}{'tokens':>8}{'batch':>6}{'engine tok/s':>14}"
          f"{'PEFT tok/s':>12}{'speedup':>9}")
    for r in rows:
        print(f"{r['model']:<9}{r['requests']:>9}{r['tokens']:>8}{r['batch']:>6}"
              f"{r['engine_tok_s']:>14.0f}{r['peft_tok_s']:>12.0f}{r['speedup']:>8.2f}x")
    by = {r["model"]: r["speedup"] for r in rows}
    print(json.dumps({"speedup_vs_peft_tiny": round(by["tiny"], 3) if "tiny" in by else None,
                      "speedup_vs_peft_smollm2": (round(by["smollm2"], 3) if "smollm2" in by
                                                  else None),
                      "device": device_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
