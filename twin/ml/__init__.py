"""Sweeps and recommendation, one idea per module, each importing only those listed before it:

- :mod:`twin.ml.spec` (workload specs and the configuration grid), :mod:`twin.ml.features`,
  :mod:`twin.ml.ensemble` (the shipped tree ensemble, evaluated in numpy);
- :mod:`twin.ml.store` (a sweep's Parquet dataset), :mod:`twin.ml.backends` (local pool,
  Ray), :mod:`twin.ml.sweep` (workload x configuration grids through the twin);
- :mod:`twin.ml.dataset` (learning tables), :mod:`twin.ml.estimators` (interpretable and
  boosted estimators, held-out evaluation);
- :mod:`twin.ml.recommender` (the shipped model: load, check, predict candidates),
  :mod:`twin.ml.verify` (twin runs of candidates), :mod:`twin.ml.report` (what a
  recommendation or placement returns, and its explanation), :mod:`twin.ml.recommend`
  (predict, verify, local search), :mod:`twin.ml.placement` (adapters on the fewest GPUs);
- :mod:`twin.ml.export` (files for ``vllm serve``), :mod:`twin.ml.train` and
  :mod:`twin.ml.pipeline` (retraining).

Nothing here is imported by the simulator; heavy optional libraries (scikit-learn,
xgboost, interpret, ray, matplotlib, tqdm) are imported lazily.
"""
