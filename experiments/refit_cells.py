"""A calibrated executor profile refitted on its own measurements without some cells (and,
optionally, without some step features): what another calibration design would have fitted
on the same minutes of the same machine.

An A/B of two designs then needs one calibration run (the larger design), not two at
different times: the box's speed drifts by 10-30% over minutes, a design change by less.
Only the step-time model is refitted (``twin.calibrate.executor_fit.fit_measurements``);
memory, load times and provenance are the profile's, the provenance noting the cells left
out (``refit_without``).

    # issue 17: the design before the cached-prefix cells beside running decodes
    .venv/bin/python experiments/refit_cells.py runs/cal/cpu-tiny.json \\
        --drop g0.02-c --out runs/cal/cpu-tiny-before.json
    # the design and the features before the short chunks beside decodes (issue 17)
    .venv/bin/python experiments/refit_cells.py runs/cal/cpu-tiny.json --drop g0.02 \\
        --zero-features prefill_ctx_seqs --out runs/cal/cpu-tiny-before.json

Last line: one JSON object (cells dropped, steps kept, the fit's coefficients and its
median relative error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

from twin.calibrate.executor_fit import fit_measurements
from twin.costs.profile import load_profile
from twin.costs.step_time import FEATURES, StepTimeModel


def refit_without(profile_path: Path, drop: list[str], zero=()):
    """(profile refitted without the cells whose key contains any of ``drop`` and without
    the step features ``zero`` (their column zeroed: coefficient 0), the fit, the dropped
    cell keys)."""
    prof = load_profile(str(profile_path))
    df = pd.read_parquet(str(profile_path) + ".measurements.parquet")
    gone = df["key"].astype(str).map(lambda k: any(s in k for s in drop))
    steps = df[(df["kind"] == "step") & ~gone].assign(**{k: 0.0 for k in zero})
    fit = fit_measurements(steps, df[df["kind"] == "load"], prof.model,
                           prof.provenance.get("step_time_statistic", "mean"))
    prov = {**prof.provenance, "refit_without": drop, "refit_without_features": list(zero)}
    out = dataclasses.replace(prof, step_time=StepTimeModel(base=fit.coef), provenance=prov)
    return out, fit, sorted(df.loc[gone, "key"].astype(str).unique())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", type=Path, help="a `twin calibrate --executor` profile "
                    "(its PROFILE.measurements.parquet beside it)")
    ap.add_argument("--drop", nargs="+", required=True,
                    help="leave out every cell whose key contains one of these strings")
    ap.add_argument("--zero-features", nargs="+", default=[], metavar="FEATURE",
                    help="also fit without these step features (their coefficient 0)")
    ap.add_argument("--out", type=Path, required=True, help="the refitted profile")
    args = ap.parse_args(argv)
    unknown = set(args.zero_features) - set(FEATURES)
    if unknown:
        print(f"unknown step feature(s) {sorted(unknown)}; known: {FEATURES}", file=sys.stderr)
        return 2
    prof, fit, gone = refit_without(args.profile, args.drop, args.zero_features)
    if not gone:
        print(f"no cell key contains any of {args.drop}", file=sys.stderr)
        return 2
    prof.save(args.out)
    print(f"left out {len(gone)} cells: {', '.join(gone)}")
    print(json.dumps({"dropped": gone, "zero_features": args.zero_features,
                      "steps": int(fit.residuals["n"]),
                      "rel_abs_median": round(fit.residuals["rel_abs_median"], 4),
                      "coef": {k: v for k, v in fit.coef.items() if v}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
