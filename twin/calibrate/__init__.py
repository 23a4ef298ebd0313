"""Calibration: fit a :class:`twin.costs.profile.Profile` from measurements.

From real vLLM runs (``twin calibrate --from-vllm-runs``, :mod:`~twin.calibrate.vllm`):
``tables`` reads the CSV tables, ``run_spec`` / ``run_table`` / ``bench_json`` turn runs
into :class:`~twin.calibrate.run_spec.RunSpec` (``vllm_runs`` loads any mix of them),
``reconstruct`` rebuilds a run's workload, ``vllm_fits`` fits memory, adapter loads and the
client cap directly, ``step_fit`` fits the step time by simulating the runs in the loop;
``run_model`` checks the runs are of the base profile's model, ``modes`` which
``twin calibrate`` flags each mode reads.

From the reference executor (``twin calibrate --executor``, :mod:`~twin.calibrate.executor`):
``executor_design`` (the cells), ``executor_measure`` (serving them, the only torch part),
``executor_fit`` (the fit of a measurements log).

Both drive an engine, so they sit above ``twin.sim`` and ``twin.executor``, apart from the
cost models in ``twin.costs`` that the engines use. Nothing is imported here, and torch only
when the executor is measured.
"""
