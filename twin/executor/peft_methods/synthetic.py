"""Synthetic PEFT adapters of every kind, written by PEFT itself.

Each adapter is made with ``get_peft_model(base, config)``, given seeded random weights
that really change the outputs (PEFT initialises LoRA's B to zero and IA³'s vectors to
one, i.e. the identity), and saved with ``save_pretrained``: the directories are what
PEFT users have on disk, so loading them tests the reader against the real format.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch

from twin.costs.peft_costs import (IA3, IA3_DEFAULT_TARGETS, IA3_FEEDFORWARD, LORA,
                                   PEFT_KINDS, PREFIX_TUNING, PROMPT_TUNING)
from twin.executor.adapters import CATALOG_COLUMNS, WEIGHTS_NAME
from twin.executor.shape import LORA_MODULES

SHORT_NAME = {LORA: "lora", IA3: "ia3", PREFIX_TUNING: "prefix", PROMPT_TUNING: "prompt"}
PEFT_CATALOG_COLUMNS = (*CATALOG_COLUMNS, "kind", "virtual_tokens")


def peft_config(kind: str, *, rank: int = 8, virtual_tokens: int = 8,
                prefix_projection: bool = False):
    """The PEFT config of a synthetic adapter of ``kind`` (LoRA on every linear module,
    IA³ on PEFT's Llama defaults k/v/down)."""
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig,  # lazy: peft is heavy
                      PromptTuningConfig)

    if kind == LORA:
        return LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=16, lora_dropout=0.0,
                          target_modules=list(LORA_MODULES))
    if kind == IA3:
        return IA3Config(task_type="CAUSAL_LM", target_modules=list(IA3_DEFAULT_TARGETS),
                         feedforward_modules=list(IA3_FEEDFORWARD))
    if kind == PREFIX_TUNING:
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens,
                                  prefix_projection=prefix_projection)
    if kind == PROMPT_TUNING:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    raise ValueError(f"unknown PEFT kind {kind!r}; choose from {list(PEFT_KINDS)}")


@torch.no_grad()
def randomise(pm, kind: str, g: torch.Generator, *, b_std: float = 0.1,
              ia3_std: float = 0.3, prefix_std: float = 1.0) -> None:
    """Seeded weights for the PEFT model ``pm`` that make it differ from the base model:
    LoRA as ``write_synthetic_adapters`` (A ~ U(+-1/sqrt(in)), B ~ N(0, b_std^2/r));
    IA³ vectors ~ 1 + N(0, ia3_std^2); prefix keys/values ~ N(0, prefix_std^2) (PEFT's own
    init is N(0, 1)); prompt embeddings ~ N(0, std of the token embeddings)."""
    params = dict(pm.named_parameters())
    if kind in (PREFIX_TUNING, PROMPT_TUNING):
        enc = pm.prompt_encoder[pm.active_adapter]
        std = prefix_std if kind == PREFIX_TUNING else float(
            pm.get_input_embeddings().weight.std())
        for name, w in sorted(enc.named_parameters()):
            # the embedding: N(0, std^2); a prefix projection's MLP: N(0, 1/fan_in), no bias
            scale = (std if name.startswith("embedding") else 1 / math.sqrt(w.shape[-1])
                     if w.ndim == 2 else 0.0)
            w.copy_(torch.randn(w.shape, generator=g) * scale)
        return
    for name, p in sorted(params.items()):
        if "lora_A" in name:
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[1]))
        elif "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * (b_std / math.sqrt(p.shape[1])))
        elif "ia3_l" in name:
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * ia3_std)


def write_synthetic_peft_adapters(model_dir, out_dir, n: int | None = None,
                                  kinds: Iterable[str] = PEFT_KINDS, *, seed: int = 0,
                                  rank: int = 8, virtual_tokens: int = 8,
                                  prefix_projection: bool = False,
                                  catalog_csv: str | None = "catalog.csv") -> pd.DataFrame:
    """Write ``n`` PEFT adapters (default: one per kind) for the model in ``model_dir``:
    adapter i has kind ``kinds[i % len(kinds)]`` and is named ``<kind>-<i>`` (``lora-0000``,
    ``ia3-0001``, ``prefix-0002``, ``prompt-0003``). Deterministic in ``seed``. Returns the
    catalog (adapter, rank, path, bytes, kind, virtual_tokens; rank 0 for non-LoRA kinds),
    also written to ``out_dir/catalog_csv`` unless that is None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import get_peft_model  # lazy: peft and transformers are heavy
    from transformers import LlamaForCausalLM  # lazy: transformers is heavy

    kinds = [str(k).upper() for k in kinds]
    bad = [k for k in kinds if k not in PEFT_KINDS]
    if not kinds or bad:
        raise ValueError(f"unknown PEFT kinds {bad}; choose from {list(PEFT_KINDS)}")
    n = len(kinds) if n is None else int(n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(max(n - 1, 0))))
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        name = f"{SHORT_NAME[kind]}-{i:0{width}d}"
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = peft_config(kind, rank=rank, virtual_tokens=virtual_tokens,
                          prefix_projection=prefix_projection)
        pm = get_peft_model(base, cfg)
        randomise(pm, kind, torch.Generator().manual_seed(seed * 1_000_003 + i))
        d = out / name
        pm.save_pretrained(d, safe_serialization=True)
        is_prompt = kind in (PREFIX_TUNING, PROMPT_TUNING)
        rows.append({"adapter": name, "rank": rank if kind == LORA else 0, "path": str(d),
                     "bytes": (d / WEIGHTS_NAME).stat().st_size, "kind": kind,
                     "virtual_tokens": virtual_tokens if is_prompt else 0})
    df = pd.DataFrame(rows, columns=list(PEFT_CATALOG_COLUMNS)).astype(
        {"adapter": "string", "rank": "int64", "path": "string", "bytes": "int64",
         "kind": "string", "virtual_tokens": "int64"})
    if catalog_csv is not None:
        df.to_csv(out / catalog_csv, index=False)
    return df
