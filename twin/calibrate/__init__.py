"""Calibration: fit a :class:`twin.costs.profile.Profile` from measurements.

``vllm`` fits a profile from real vLLM runs (``vllm_runs`` reads and rebuilds them) with the
twin simulating each run in the loop; ``executor`` fits one from microbenchmarks of the
reference executor. Both drive an engine, so they sit above ``twin.sim`` and
``twin.executor``, apart from the cost models in ``twin.costs`` that the engines use.
Nothing is imported here: ``executor`` needs torch, ``vllm`` does not.
"""
