"""The latency heads' training sweep: the training workloads at sampled latency knobs and
window lengths, on top of the recommender's sweep.

Why: the recommender's sweep (:func:`twin.ml.sweep.plan` over :class:`twin.ml.spec.ConfigGrid`)
runs every point at the paper's ``max_num_batched_tokens`` = ``max_num_seqs`` = 2048 and one
window length (600 s). The goodput search (``recommend --objective goodput``, and the SLO
evaluation that scores it on 120-s windows) varies ``max_loras`` and both latency knobs
(:data:`twin.ml.search_space.LATENCY_KNOBS`), so p99 heads fitted on that sweep alone
extrapolate exactly where they are used (SLO evaluation: p99 TTFT SMAPE 35.7 %, against
25 % on held-out training families at the trained knobs).

Design: for every training workload and each window of :data:`WINDOWS`, ``per_window``
configurations drawn without replacement from that workload's space over
:data:`twin.ml.search_space.LATENCY_KNOBS` (the configurations vLLM would start), seeded by
the workload's key, so the design is deterministic and a re-run resumes. Points already
in the recommender's sweep (the paper's latency knobs at its window) are not drawn again.
These rows feed the latency heads only (:func:`twin.ml.train.fit_recommender`): the
achieved-share and starvation models, and every throughput figure, keep the paper's grid.
Held-out (evaluation) workloads come from another seed and are never in this design.
"""

from __future__ import annotations

import numpy as np

from twin.ml.search_space import LATENCY_KNOBS, at_base_latency_knobs, space_configs
from twin.ml.spec import paper_base, profile_digest
from twin.ml.sweep import EarlyExit, Task, point_key, spec_shape

#: window lengths (s) of the latency sweep and configurations drawn per workload at each:
#: the SLO evaluation's short windows and the recommender's own
WINDOWS = {120.0: 8, 600.0: 2}


def latency_plan(specs, *, profile, early_exit: EarlyExit = EarlyExit(), windows=None,
                 paper_window_s: float = 600.0, seed: int = 0) -> list[Task]:
    """The latency sweep's points (see the module doc), grouped by (workload, window).
    ``windows``: {window_s: configurations per workload} (default :data:`WINDOWS`, the
    windows no longer than ``paper_window_s``: a workload is sampled for that long);
    ``paper_window_s``: the recommender sweep's window, whose paper-knob points it runs."""
    base = paper_base()
    psha = profile_digest(profile)
    if windows is None:
        windows = {w: k for w, k in WINDOWS.items() if w <= paper_window_s}
    tasks = []
    for spec in specs:
        n, r = spec_shape(spec)
        cfgs = space_configs(n, r, base, profile, LATENCY_KNOBS)
        ident = spec.identity()
        for w, k in sorted(windows.items()):
            pool = [c for c in cfgs if not (w == paper_window_s and at_base_latency_knobs(c, base))]
            rng = np.random.default_rng([seed, int(spec.key[:12], 16), int(w)])
            pick = sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))
            tasks += [Task(spec, pool[i], w, point_key(spec, pool[i], w, psha, early_exit,
                                                       spec_identity=ident)) for i in pick]
    return tasks
