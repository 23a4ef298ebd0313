"""Fit vLLM's first-request delay per adapter (``frontend.first_lora_request_s``) on the real
H100 runs, and write a profile that carries it (issue 15, README_validate "the frontend's
first-request delay").

The estimator (``twin.calibrate.frontend_fit``) reads the mean TTFT's excess over the median
that the twin without the delay lacks, per first request, on light runs. It runs on the
``digital_twin_modelling`` (calibration) runs; the ``ml_modelling_test`` runs are shown
beside, as a check only (``reproduce_vllm_h100.py`` scores on them). The p99 route
(``ttft_tail_first_use.py``: p99 - median of the light runs where first requests are > 1%)
needs runs that only the test set has.

    python experiments/fit_first_request_delay.py
    python experiments/fit_first_request_delay.py --delay 0.316 \\
        --profile-out experiments/figures/llama31-8b-h100-64gb-firstreq.json

``--delay`` sets the written profile's delay (default: the calibration runs' estimate).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from twin.calibrate.frontend_fit import fit_first_lora_request
from twin.calibrate.vllm_runs import read_run_table
from twin.costs.frontend import Frontend
from twin.costs.profile import load_profile
from twin.workload.public import shared_data_dir

FIT_SET, TEST_SET = "digital_twin_modelling", "ml_modelling_test"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="llama31-8b-h100-64gb",
                    help="the step and load times to simulate with (default: shipped)")
    ap.add_argument("--max-running", type=float, default=6.0,
                    help="light load: mean running requests below this (default %(default)s)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--delay", type=float, metavar="S",
                    help="the delay the written profile carries (default: the fit's)")
    ap.add_argument("--source", default="",
                    help="where --delay comes from, recorded in the profile's provenance")
    ap.add_argument("--profile-out", type=Path, metavar="JSON",
                    help="write --profile with the delay here")
    args = ap.parse_args(argv)
    runs = read_run_table(shared_data_dir() / "vllm-h100" / "real_runs_llama31_8b.csv")
    profile = load_profile(args.profile)
    out = {}
    for name in (FIT_SET, TEST_SET):
        sub = [r for r in runs if r.extra.get("experiment_set") == name]
        _, rep = fit_first_lora_request(sub, profile, max_running=args.max_running,
                                        processes=args.processes)
        print(f"{name}: {rep['runs']} light runs, delay {rep['first_lora_request_s']:.3f} s "
              f"(quartiles {rep['quartiles_s']})")
        for p in rep["per_run"]:
            print(f"  first share {100 * p['share']:.2f}%  mean-median real "
                  f"{p['real_excess_ms']:6.2f} ms  twin {p['twin_excess_ms']:6.2f} ms  -> "
                  f"{p['delay_s']:+.3f} s  {p['key'][-48:]}")
        out[name] = {k: rep[k] for k in ("runs", "first_lora_request_s", "quartiles_s")}
    if args.profile_out:
        d = out[FIT_SET]["first_lora_request_s"] if args.delay is None else args.delay
        prov = dict(profile.provenance)
        prov["frontend"] = {"first_lora_request_s": d, "source": args.source or
                            f"twin.calibrate.frontend_fit on the {FIT_SET} runs",
                            "estimates": out}
        new = dataclasses.replace(profile, name=args.profile_out.stem, provenance=prov,
                                  frontend=Frontend(first_lora_request_s=d))
        new.save(args.profile_out)
        print(f"wrote {args.profile_out} (frontend.first_lora_request_s = {d})")
    print(json.dumps({"fit_set": out[FIT_SET], "test_set_check": out[TEST_SET]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
