"""The waiting queue's answers against a plain FCFS list (vLLM's ``waiting`` scanned in
order): random arrivals, preemptions put back at the head and admissions, and after each
operation the head over all, the head among an adapter set (the LoRA skip rule), the
count the skip rule passes over and the waiting adapters' set key (the metrics label)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from twin.sched.adapter_cache import SET_SALT
from twin.sched.request import Request
from twin.sched.waiting_queue import WaitingQueue

ADAPTERS = st.integers(min_value=-1, max_value=5)
OPS = st.lists(st.tuples(st.sampled_from(["arrive", "preempt", "admit", "admit_among"]),
                         ADAPTERS, st.frozensets(st.integers(0, 5), max_size=4)),
               max_size=60)


def _reference_first(order, allowed=None):
    for r in order:   # FCFS: the list is kept in the queue's order
        if allowed is None or r.adapter < 0 or r.adapter in allowed:
            return r
    return None


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_waiting_queue_matches_a_scanned_fcfs_list(ops):
    q, order, idx = WaitingQueue(), [], 0
    for op, adapter, allowed in ops:
        if op == "arrive":
            r = Request(idx, idx, 0.0, adapter, 8, 8)
            idx += 1
            q.append(r)
            order.append(r)
        elif op == "preempt":   # a request back from running: the head of everything
            r = Request(idx, idx, 0.0, adapter, 8, 8)
            idx += 1
            q.prepend(r)
            order.insert(0, r)
        else:
            pick = q.first() if op == "admit" else q.first_among(allowed)
            want = _reference_first(order, None if op == "admit" else allowed)
            assert pick is want
            if pick is not None:
                q.pop(pick)
                order.remove(pick)
        assert len(q) == len(order)
        assert q.first() is _reference_first(order)
        assert q.first_among(allowed) is _reference_first(order, allowed)
        gate = len(allowed)   # a full set: every other adapter's request is passed over
        skipped = sum(1 for r in order if r.adapter >= 0 and r.adapter not in allowed)
        assert q.passed_over(allowed, gate) == skipped
        assert q.passed_over(allowed, gate + 1) == 0
        key = 0   # the waiting adapters' set key: the XOR of their members' hashes
        for a in {r.adapter for r in order if r.adapter >= 0}:
            key ^= hash((a, SET_SALT))
        assert q.adapters_key == key
    assert list(q) == order
