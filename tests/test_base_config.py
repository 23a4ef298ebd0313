"""`--base FILE` puts the file's settings over the paper's base; what the file leaves out
keeps the paper's value, not vLLM's default (the docstring's promise)."""
from __future__ import annotations

from twin.config import ServingConfig
from twin.ml.spec import PAPER_BASE, base_config


def test_settings_the_file_leaves_out_keep_the_papers_base(tmp_path):
    f = tmp_path / "base.yaml"
    f.write_text("max-loras: 4\n")
    cfg = base_config(f)
    assert cfg.max_loras == 4
    paper = ServingConfig.from_dict(dict(PAPER_BASE))
    for name in ("max_num_seqs", "max_num_batched_tokens", "preload_adapters"):
        assert getattr(cfg, name) == getattr(paper, name), name
    # and the paper's base really differs from vLLM's defaults there (else this tests nothing)
    assert (paper.max_num_seqs, paper.max_num_batched_tokens) != (
        ServingConfig().max_num_seqs, ServingConfig().max_num_batched_tokens)


def test_a_setting_the_file_gives_wins(tmp_path):
    f = tmp_path / "base.yaml"
    f.write_text("max_num_seqs: 64\nmax_loras: 2\n")
    assert base_config(f).max_num_seqs == 64


def test_max_model_len_follows_the_models_context_unless_set(tmp_path):
    """vLLM derives max_model_len from the model: a 32k-context model on the paper's base
    gets 32768, not Llama-3.1's 131072 (which vLLM would refuse to start)."""
    assert base_config(None, 32768).max_model_len == 32768
    f = tmp_path / "base.yaml"
    f.write_text("max_loras: 4\n")
    assert base_config(f, 32768).max_model_len == 32768
    f.write_text("max_model_len: 8192\n")
    assert base_config(f, 32768).max_model_len == 8192
    assert base_config(None).max_model_len == PAPER_BASE["max_model_len"]


def test_the_api_base_follows_the_models_context():
    from twin.api import _base
    from twin.costs.profile import load_profile

    qwen = load_profile("llama31-8b-h100-64gb-first-principles")
    qwen.model.max_position_embeddings = 32768   # a model of a 32k context
    assert _base({"max_num_seqs": 256}, qwen).max_model_len == 32768
    assert _base({"max_num_seqs": 256, "max-model-len": 4096}, qwen).max_model_len == 4096
    assert _base({"max_num_seqs": 256}, qwen).max_num_batched_tokens == PAPER_BASE[
        "max_num_batched_tokens"]
