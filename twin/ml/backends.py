"""Where a sweep's chunks run: a local process pool (default) or Ray (``backend="ray"``,
optional extra ``pip install 'twin[ray]'``). Both map the same picklable payloads through
the same function (:func:`twin.ml.sweep.run_chunk`), so their rows are equal. ``payloads``: a
list, or any iterable with a length, iterated once as tasks are submitted (a fleet cuts
each replica's share of the trace as the pool takes it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

from twin.errors import TwinInputError


class LocalBackend:
    """A local process pool (``workers=1``: in this process, serially)."""

    def __init__(self, workers: int | None = None):
        self.workers = int(workers or os.cpu_count() or 1)

    def map_unordered(self, fn: Callable, payloads: list):
        if self.workers <= 1 or len(payloads) <= 1:
            for p in payloads:
                yield fn(p)
            return
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(payloads)),
                                 mp_context=ctx) as ex:
            futures = [ex.submit(fn, p) for p in payloads]
            try:
                for f in as_completed(futures):
                    yield f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


class RayBackend:
    """Ray tasks, one per chunk, on a local instance or a cluster (``address``)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray  # noqa: F401  # lazy: optional extra, checked when chosen
        except ImportError:
            raise TwinInputError("the Ray backend needs Ray: pip install 'twin[ray]' "
                                 "(or pip install 'ray[default]')", field="--backend") from None
        self.address, self.num_cpus = address, num_cpus

    def map_unordered(self, fn: Callable, payloads: list):
        import ray  # lazy: optional extra

        started = False
        if not ray.is_initialized():
            kw = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
            ray.init(ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, **kw)
            started = True
        try:
            remote = ray.remote(fn)
            pending = [remote.remote(p) for p in payloads]
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)
        finally:
            if started:
                ray.shutdown()


def make_backend(backend: str = "local", *, workers: int | None = None,
                 address: str | None = None):
    if backend == "local":
        return LocalBackend(workers)
    if backend == "ray":
        return RayBackend(address, num_cpus=workers)
    raise TwinInputError(f"unknown backend {backend!r}; use local or ray", field="--backend")
