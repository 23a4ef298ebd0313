#!/usr/bin/env python
"""Rebuild the shipped recommender (twin/ml/recommender.json) and report on held-out workloads.

    .venv/bin/python experiments/train_recommender.py            # 5-20 min on 2 cores
    .venv/bin/python experiments/train_recommender.py --profile my-h100.json

Same as `twin train`. Reduced against the paper: 600-s windows instead of one hour, the
slot grid up to each workload's adapter count, 100 training families (2-3 adapter counts
each, ~250 workloads, ~2,100 points) and 20 held-out families instead of 840 workloads x 66
points, plus the latency heads' sweep (the same workloads at 10 sampled max_loras x
max_num_batched_tokens x max_num_seqs configurations, 120-s and 600-s windows: 2,480 points,
~15 min at load; --no-latency-sweep skips it); sweeps are resumable (runs/train/sweep-*), so an interrupted training continues
where it stopped, and they are keyed by the profile's content, so a new profile re-runs
them. The last line printed is one JSON object:
gap_to_exhaustive_median_pct, gap_to_exhaustive_max_pct, starving_recommendations,
heldout_workloads, predict_ms (and more). See experiments/README_ml.md.
"""

import argparse
import sys

from twin.cli.ml import add_train_args
from twin.ml.pipeline import train_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    return train_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
