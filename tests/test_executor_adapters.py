"""PEFT adapter I/O: synthetic adapters, the catalog, and every way a bad adapter is refused."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from twin.errors import TwinInputError  # noqa: E402
from twin.executor.adapters import (AdapterError, adapter_catalog, load_adapter,  # noqa: E402
                                    pack_adapter, read_adapter, write_adapter_catalog,
                                    write_synthetic_adapters)
from twin.executor.model import LlamaShape  # noqa: E402
from twin.executor.weights import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def good(model_dir, tmp_path):
    """A fresh copy of one valid rank-8 adapter, to be broken by each test."""
    write_synthetic_adapters(model_dir, tmp_path / "src", 1, ranks=(8,), catalog_csv=None)
    dst = tmp_path / "bad"
    shutil.copytree(tmp_path / "src" / "lora-0000", dst)
    return dst


def edit_config(d, **changes):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    p = d / "adapter_model.safetensors"
    sd = fn(load_file(str(p)))
    save_file(sd, str(p))


# ---------------------------------------------------------------------------------------------
# synthetic adapters and catalog
# ---------------------------------------------------------------------------------------------
def test_write_synthetic_adapters(model_dir, tmp_path):
    df = write_synthetic_adapters(model_dir, tmp_path / "a", 5, ranks=(8, 16, 32), seed=3)
    assert list(df.columns) == ["adapter", "rank", "path", "bytes"]
    assert list(df.adapter) == [f"lora-{i:04d}" for i in range(5)]
    assert list(df["rank"]) == [8, 16, 32, 8, 16]
    for row in df.itertuples():
        w = os.path.join(row.path, "adapter_model.safetensors")
        assert os.path.getsize(w) == row.bytes
        cfg = json.loads(open(os.path.join(row.path, "adapter_config.json")).read())
        assert cfg["r"] == row.rank and cfg["peft_type"] == "LORA"
        assert len(cfg["target_modules"]) == 7
        sd = load_file(w)
        assert len(sd) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
        assert all(float(t.abs().sum()) > 0 for k, t in sd.items() if "lora_B" in k)
    # deterministic in the seed, different across adapters and seeds
    again = write_synthetic_adapters(model_dir, tmp_path / "b", 2, ranks=(8, 16, 32), seed=3)
    other = write_synthetic_adapters(model_dir, tmp_path / "c", 1, ranks=(8,), seed=4)
    read = lambda p: (open(os.path.join(p, "adapter_model.safetensors"), "rb").read())  # noqa
    assert read(df.path[1]) == read(again.path[1])
    assert read(df.path[0]) != read(other.path[0])
    # the catalog CSV written alongside, and rebuilt by scanning
    import pandas as pd

    csv = pd.read_csv(tmp_path / "a" / "catalog.csv")
    assert list(csv.columns) == ["adapter", "rank", "path", "bytes"]
    assert list(csv.adapter) == list(df.adapter) and list(csv["bytes"]) == list(df["bytes"])
    scanned = adapter_catalog(tmp_path / "a")
    pd.testing.assert_frame_equal(scanned, df)
    out = write_adapter_catalog(scanned.to_dict("records"), tmp_path / "x" / "cat.csv")
    assert pd.read_csv(out).shape == (5, 4)


def test_targets_subset_and_alpha(model_dir, tmp_path):
    df = write_synthetic_adapters(model_dir, tmp_path, 1, ranks=(16,),
                                  target_modules=["q_proj", "down_proj"], alpha=None)
    p = load_adapter(df.path[0], model_dir, 16)
    assert p.target_modules == ("q_proj", "down_proj") and p.scaling == 1.0
    assert set(p.a) == {"qkv", "down"}
    shape = LlamaShape.from_dir(model_dir)
    assert p.a["qkv"].shape == (2, 3, 16, shape.hidden)
    assert float(p.a["qkv"][:, 1:].abs().sum()) == 0.0  # k, v slices zero
    with pytest.raises(ValueError, match="unknown target modules"):
        write_synthetic_adapters(model_dir, tmp_path / "z", 1, target_modules=["lm_head"])


def test_load_timings_and_scaling_folded(model_dir, tmp_path):
    df = write_synthetic_adapters(model_dir, tmp_path, 1, ranks=(8,), alpha=32)
    raw = read_adapter(df.path[0])
    assert raw.adapter_id == "lora-0000" and raw.read_s > 0 and raw.disk_bytes == df["bytes"][0]
    packed = pack_adapter(raw, model_dir, 16)
    assert packed.scaling == 4.0 and packed.pack_s > 0 and packed.read_s == raw.read_s
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    shape = LlamaShape.from_dir(model_dir)
    k0 = shape.q_size
    torch.testing.assert_close(packed.b["qkv"][1, k0:k0 + shape.kv_size], raw.tensors[key] * 4.0)
    assert packed.nbytes > 0 and packed.timings["copy_s"] is None


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def expect(path, model_dir, match, max_rank=16, adapter_id=None):
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(path, model_dir, max_rank, adapter_id=adapter_id)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TwinInputError)
    assert info.value.adapter_id == (adapter_id or path.name)
    return info.value


def test_missing_directory_and_files(model_dir, good, tmp_path):
    e = expect(tmp_path / "nope", model_dir, "adapter directory not found", adapter_id="sql")
    assert str(e).startswith("adapter 'sql': ")
    (good / "adapter_config.json").unlink()
    expect(good, model_dir, "missing adapter_config.json")


def test_missing_weights(model_dir, good):
    (good / "adapter_model.safetensors").unlink()
    expect(good, model_dir, "missing adapter_model.safetensors")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_adapters_are_refused_unread(model_dir, good, name):
    (good / "adapter_model.safetensors").unlink()
    # not even valid pickle: proves the file is never opened by torch.load
    (good / name).write_bytes(b"\x80\x04 this would run code if unpickled")
    expect(good, model_dir, rf"{name} is a pickle checkpoint.*never loads.*convert it to "
                            "adapter_model.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(model_dir, good, damage):
    p = good / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes({"garbage": b"not a safetensors file at all",
                   "truncated": data[:len(data) // 2], "empty": b""}[damage])
    expect(good, model_dir, "corrupt safetensors file")


def test_bad_json(model_dir, good):
    (good / "adapter_config.json").write_text("{not json")
    expect(good, model_dir, "is not valid JSON")


def test_rank_above_max_lora_rank(model_dir, tmp_path):
    df = write_synthetic_adapters(model_dir, tmp_path, 1, ranks=(32,))
    from pathlib import Path

    expect(Path(df.path[0]), model_dir, "rank 32 > max_lora_rank 16", max_rank=16)


@pytest.mark.parametrize("changes,match", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"r": 0}, "'r' must be a positive integer"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
])
def test_unsupported_config(model_dir, good, changes, match):
    edit_config(good, **changes)
    expect(good, model_dir, match)


def test_adapter_for_another_model(model_dir, tmp_path):
    other = make_tiny_llama(tmp_path / "other", hidden=32, heads=2, kv_heads=1)
    df = write_synthetic_adapters(other, tmp_path / "a", 1, ranks=(8,))
    from pathlib import Path

    expect(Path(df.path[0]), model_dir, r"has shape \(32, 8\), expected \(64, 8\).*does not match this model")


def test_config_rank_disagrees_with_tensors(model_dir, good):
    edit_config(good, r=4)
    expect(good, model_dir, r"has rank 8 \(shape .*\) but adapter_config.json says r=4")


def test_layer_out_of_range(model_dir, good):
    def add_layer(sd):
        for k in list(sd):
            if ".layers.1." in k:
                sd[k.replace(".layers.1.", ".layers.7.")] = sd[k].clone()
        return sd

    edit_tensors(good, add_layer)
    expect(good, model_dir, "layer 7 but the model has 2 layers")


@pytest.mark.parametrize("key,match", [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings/lm_head"),
    ("base_model.model.lm_head.lora_A.weight", "embeddings/lm_head"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias tensor"),
    ("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight", "unsupported target module"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "unexpected tensor"),
])
def test_unsupported_tensors(model_dir, good, key, match):
    edit_tensors(good, lambda sd: {**sd, key: torch.zeros(8, 64)})
    expect(good, model_dir, match)


def test_half_pair_and_no_weights(model_dir, good):
    edit_tensors(good, lambda sd: {k: v for k, v in sd.items()
                                   if k != "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"})
    expect(good, model_dir, r"layers.0.up_proj: lora_B missing")
    edit_tensors(good, lambda sd: {})
    expect(good, model_dir, "no LoRA weights")


def test_load_slot_refuses_rank_above_its_max(model_dir, tmp_path):
    from twin.executor.lora import LoRASlots

    df = write_synthetic_adapters(model_dir, tmp_path, 1, ranks=(32,))
    packed = load_adapter(df.path[0], model_dir, 64)
    slots = LoRASlots(LlamaShape.from_dir(model_dir), max_loras=2, max_lora_rank=16)
    with pytest.raises(AdapterError, match="rank 32 > max_lora_rank 16"):
        slots.load_slot(0, packed)
