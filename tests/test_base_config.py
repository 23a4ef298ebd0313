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
