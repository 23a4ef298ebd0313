"""The recommender's search space (twin.ml.search_space): the grids every search and the
exhaustive evaluation share."""

from __future__ import annotations

import pytest

from twin.ml.search_space import KNOBS, search_space
from twin.ml.spec import paper_base


def test_goodput_space_varies_every_knob_within_vllm_rules():
    s = search_space(12, 24, paper_base(), "goodput")
    assert s.knobs == KNOBS
    g = s.grids
    assert max(g["max_loras"]) == 12 and max(g["max_cpu_loras"]) == 12
    assert min(g["max_lora_rank"]) == 32   # rank 24 padded to vLLM's next allowed value
    assert all(0.8 <= u <= 0.95 for u in g["gpu_memory_utilization"])
    for p in s.points():
        c = s.config(p)
        assert c.max_cpu_loras >= c.max_loras and c.max_lora_rank >= 24
        assert s.point(c) == p


def test_points_are_distinct_and_counted():
    s = search_space(4, 16, paper_base(), "goodput").restrict(
        max_num_batched_tokens=2048, max_num_seqs=(64, 256), gpu_memory_utilization=0.9,
        max_lora_rank=16)
    pts = list(s.points())
    assert len(pts) == len(set(pts)) == s.size()
    # max_cpu_loras below max_loras is raised: fewer points than the raw product
    raw = len(s.grids["max_loras"]) * len(s.grids["max_cpu_loras"]) * 2
    assert s.size() < raw


def test_throughput_space_is_the_papers_max_loras_only():
    base = paper_base()
    s = search_space(32, 16, base, "throughput")
    assert s.knobs == ("max_loras",)
    c = s.config({"max_loras": 8})
    assert (c.max_cpu_loras, c.max_lora_rank, c.max_num_seqs) == (32, 16, base.max_num_seqs)
    with pytest.raises(ValueError, match="unknown knob"):
        s.restrict(max_rank=8)


def test_size_and_membership_agree_with_the_points():
    s = search_space(6, 16, paper_base(), "goodput").restrict(
        max_num_batched_tokens=(2048, 8192), max_num_seqs=256, gpu_memory_utilization=0.9)
    pts = set(s.points())
    assert s.size() == len(pts)
    assert all(s.contains(p) for p in pts)
    p = next(iter(pts))
    assert not s.contains(p[:3] + (4096,) + p[4:])   # a batched-tokens value not searched
