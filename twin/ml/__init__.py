"""Sweeps and recommendation: run workload x configuration grids through the twin
(:mod:`twin.ml.sweep`), turn them into learning tables (:mod:`twin.ml.dataset`), fit
interpretable and boosted estimators (:mod:`twin.ml.estimators`), and recommend or place verified
vLLM configurations (:mod:`twin.ml.recommender`). Nothing here is imported by the
simulator; heavy optional libraries (xgboost, interpret, ray) are imported lazily.
"""
