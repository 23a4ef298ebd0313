#!/usr/bin/env python
"""Rebuild the shipped recommender (twin/ml/recommender.json) and report on held-out workloads.

    .venv/bin/python experiments/train_recommender.py            # ~15-20 min on 2 cores
    .venv/bin/python experiments/train_recommender.py --profile my-h100.json

Same as `twin train`. Reduced against the paper: 600-s windows instead of one hour, the
slot grid up to each workload's adapter count, ~180 workloads in 2-3 adapter counts per
family instead of 840 x 66 points; sweeps are resumable (runs/train/sweep-*), so an
interrupted training continues where it stopped. The last line printed is one JSON object:
gap_to_exhaustive_median_pct, gap_to_exhaustive_max_pct, starving_recommendations,
heldout_workloads, predict_ms (and more). See experiments/README_ml.md.
"""

import argparse
import sys

from twin.ml.cli import add_train_args
from twin.ml.pipeline import train_main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    return train_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
