"""Split execution in simulated time: N clients sharing one base executor (Symbiosis).

Each client is a server of its own (``_Clock``: its requests, the shared scheduler, its KV
pool; its adapters always resident) whose step is a forward pass through the base: one
request per stage (``twin.costs.split_costs``: embed, per layer group qkv / o / gate_up /
down, lm_head), each sent over the client's link, served by the base, answered, followed by
a share of the client's local compute (``shared_compute``: a client on the base's own
device runs its local work on the base's queue, in its stages' batches, since one device
does both). The base executor is one server with a FIFO queue:
when it is free it takes the oldest request and every queued request for the *same* stage
(rows of several clients in one batch, the const of the stage paid once) and runs them as
one batch. Fine-tuning jobs (:class:`TrainJob`) load the base with forward and
input-gradient passes at a target rate.

The loop is a tight heap of events (a client's request reaching the base, a base batch
ending, a step ending, an idle client's next arrival), about ``stages`` events per client
step, no SimPy. With one client, a free link and no jobs every step lasts exactly its
local plus its base time, which is the profile's step time: the run is ``twin.sim.simulate``'s
with ``jump=False`` (tests/test_split_policy.py).
"""

from __future__ import annotations

import heapq


from twin.costs.step_time import FEATURES, after_idle
from twin.sim.engine import _Clock, _result

WAKE, SUBMIT, START, BASE_DONE, STEP_DONE = range(5)


class _Pass:
    """The stages of one pass an actor is walking through (shared by clients and jobs):
    ``order`` of (stage, direction) keys, per-stage base contributions and transfer times
    (lists), the local compute before, between and after the stages (``gap`` each)."""

    __slots__ = ("order", "pos", "contrib", "x_in", "x_out", "gap", "start", "transfer",
                 "local", "own", "rows")

    def __init__(self, order, costs: tuple, gap, start, local, passes: int = 1,
                 rows: tuple = (0, 0)):
        self.order, self.pos, self.rows = order, 0, rows     # rows: (tokens, logits rows)
        self.contrib, self.x_in, self.x_out, transfer, own = costs
        self.gap, self.start, self.local = gap, start, local
        self.transfer, self.own = transfer * passes, own * passes


class SplitClient(_Clock):
    """One client: a server of its own whose steps go through the base (see the module)."""

    def __init__(self, cid: int, trace, catalog, server, profile, costs, *, window_s,
                 record_steps: bool, sample_dt, shared_compute: bool = False):
        super().__init__(trace, catalog, server, profile, window_s=window_s,
                         max_in_flight=None, record_steps=record_steps, sample_dt=sample_dt,
                         jump=False)
        self.cid, self.costs = cid, costs
        self.shared_compute = shared_compute
        self.order = [(s, 0) for s in range(len(costs.base.stages))]
        self.next_row = 0
        self.idle = False
        self.cur: _Pass | None = None
        self.plan = self.was_idle = None
        self.end = 0.0
        self.log: list[tuple] = []

    def wake_time(self, now: float) -> float | None:
        """When an idle client looks again: its next arrival (None: no more)."""
        if self.next_row >= self.n or (self.window_s is not None and now >= self.window_s):
            return None
        return now + (self.arrival[self.next_row] - now)   # as SimPy's timeout adds it

    def begin(self, now: float) -> bool:
        """Admit what has arrived and schedule a step; False when there is nothing to run."""
        sched = self.sched
        while self.next_row < self.n and self.arrival[self.next_row] <= now:
            self.arrive(self.next_row)
            self.next_row += 1
        self.end = now
        if self.window_s is not None and now >= self.window_s:
            return False
        if not sched.has_work():
            self.rec.sample(now, sched)
            self.idle = True
            return False
        plan = sched.schedule(now)
        if not plan.num_tokens and not plan.preempted:
            self.idle = True
            return False
        f = self.server.featurize(plan)
        self.was_idle, self.idle = self.idle, False
        if self.was_idle:
            f = after_idle(f)
        self.plan = plan
        c = self.costs
        local = max(c.local(f), 0.0)
        rows = (plan.num_tokens, plan.decode_n + plan.prefill_n)
        costs = c.pass_costs(plan.prefill_tokens, plan.decode_n, rows[1])
        if self.shared_compute:   # on the base's device: its local work queues there too
            share = local / len(self.order)
            costs = ([x + share for x in costs[0]],) + costs[1:]
            self.cur = _Pass(self.order, costs, 0.0, now, local, rows=rows)
        else:
            self.cur = _Pass(self.order, costs, local / (len(self.order) + 1), now, local,
                             rows=rows)
        return True

    def finish(self, now: float) -> None:
        """The step's pass is over at ``now``: record it as the engine does."""
        plan, p = self.plan, self.cur
        dur = now - p.start
        rec, sched = self.rec, self.sched
        rec.step(plan, p.start, dur, 1, self.was_idle)
        if plan.decode_n:
            rec.itl.add(dur, plan.decode_n)
        for r in sched.finish_step(plan, now, 1):
            self.out.record(r)
        if now >= rec.next_sample:
            rec.sample(now, sched)
        self.log.append((self.cid, len(self.log), p.start, now, plan.num_tokens, plan.decode_n,
                         plan.prefill_tokens, plan.decode_ctx, p.transfer,
                         dur - p.transfer - p.local, p.local, p.own))
        self.cur = None
        self.end = now

    def result(self, config, profile, window_s):
        self.rec.sample(self.end, self.sched)
        duration = window_s if window_s is not None else self.end
        return _result(self, config, profile, duration, window_s)


class TrainJob:
    """A fine-tuning job on the base: a step of ``tokens`` rows is a forward pass and an
    input-gradient pass (stages in reverse; ``W^T`` GEMMs of the forward's cost, batched
    only with each other), started every ``tokens / tokens_per_s`` seconds (at once when
    behind; ``inf``: back to back, as fast as the base lets it), until ``until`` (the
    window's end) or until every client of ``clients`` is done, as a trainer stops when
    inference is over."""

    def __init__(self, costs, tokens_per_s: float, tokens: int, until: float | None,
                 clients: list, start_s: float = 0.0):
        self.costs, self.rate, self.tokens, self.until = costs, tokens_per_s, tokens, until
        self.clients = clients
        k = len(costs.base.stages)
        self.order = [(s, 0) for s in range(k)] + [(s, 1) for s in reversed(range(k))]
        self.next_start = start_s
        self.cur: _Pass | None = None
        self.done_tokens = 0
        self.steps: list[tuple[float, float]] = []

    def over(self, now: float) -> bool:
        if self.until is not None and max(now, self.next_start) >= self.until:
            return True
        return not any(c.cur is not None or c.sched.has_work() or c.next_row < c.n
                       for c in self.clients)

    def wake_time(self, now: float) -> float | None:
        return None if self.over(now) else max(self.next_start, now)

    def begin(self, now: float) -> bool:
        if now < self.next_start or self.over(now):
            return False
        c, t = self.costs, self.tokens
        f = dict.fromkeys(FEATURES, 0.0)                       # a prefill of t tokens
        f.update(const=1.0, prefill_tokens=t, prefill_context=t * t, prefill_seqs=1)
        local = 2.0 * max(c.local(tuple(f.values())), 0.0)     # forward + backward
        self.cur = _Pass(self.order, c.pass_costs(t, 0, t), local / (len(self.order) + 1),
                         now, local, passes=2, rows=(t, t))
        self.next_start = max(self.next_start + t / self.rate, now)
        return True

    def finish(self, now: float) -> None:
        self.steps.append((self.cur.start, now))
        self.done_tokens += self.tokens
        self.cur = None


class SplitLoop:
    """The event loop over clients and jobs sharing one base executor."""

    def __init__(self, actors: list, base, *, log_batches: bool = False):
        self.actors, self.const, self.per_req = actors, base.const.tolist(), base.per_request
        self.per_seq = [int(s.per_seq) for s in base.stages]
        self.heap: list = []
        self.seq = 0
        self.queue: list[tuple[float, int]] = []     # (time reached the base, actor)
        self.busy = False
        self.batches: list[tuple] | None = [] if log_batches else None
        self.busy_s = 0.0
        self.n_batches = self.n_requests = 0     # base batches, and requests in them

    def push(self, t: float, kind: int, who) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, who))

    def run(self) -> None:
        for i in range(len(self.actors)):
            self.try_start(i, 0.0)
        heap, actors, pop = self.heap, self.actors, heapq.heappop
        while heap:
            t, _, kind, who = pop(heap)
            if kind == SUBMIT:
                self.queue.append((t, who))
                if not self.busy:
                    self.busy = True
                    if heap and heap[0][0] <= t:
                        self.push(t, START, None)   # after every request reaching it now
                    else:
                        self.start_batch(t)
            elif kind == START:
                self.start_batch(t)
            elif kind == BASE_DONE:
                self.base_done(t, who)
            elif kind == STEP_DONE:
                actors[who].finish(t)
                self.try_start(who, t)
            else:
                self.try_start(who, t)

    def try_start(self, i: int, now: float) -> None:
        a = self.actors[i]
        if a.begin(now):
            p = a.cur
            self.push(now + p.gap + p.x_in[p.order[0][0]], SUBMIT, i)
            return
        w = a.wake_time(now)
        if w is not None:
            self.push(w, WAKE, i)

    def start_batch(self, t: float) -> None:
        """The base is free: the oldest request and all queued for its stage, as one batch."""
        queue, actors = self.queue, self.actors
        if not queue:
            self.busy = False
            return
        if len(queue) == 1:
            members = queue
            self.queue = []
            p = actors[queue[0][1]].cur
            key = p.order[p.pos]
            cost = self.const[key[0]] + p.contrib[key[0]] + self.per_req
        else:
            p = actors[queue[0][1]].cur
            key = p.order[p.pos]
            members, rest = [], []
            for q in queue:
                p = actors[q[1]].cur
                (members if p.order[p.pos] == key else rest).append(q)
            self.queue = rest
            cost = self.const[key[0]] + self.per_req * len(members)
            for _, i in members:
                cost += actors[i].cur.contrib[key[0]]
        self.busy_s += cost
        self.n_batches += 1
        self.n_requests += len(members)
        if self.batches is not None:
            rows = sum(actors[i].cur.rows[self.per_seq[key[0]]] for _, i in members)
            self.batches.append((key[0], key[1], rows, len(members), t - members[0][0], cost, t))
        self.push(t + cost, BASE_DONE, [i for _, i in members])

    def base_done(self, t: float, members: list[int]) -> None:
        actors = self.actors
        if len(members) == 1 and not self.queue:
            t = self._alone(t, members[0])
            if t is None:
                return
        for i in members:
            p = actors[i].cur
            s = p.order[p.pos][0]
            p.pos += 1
            back = t + p.x_out[s] + p.gap
            if p.pos == len(p.order):
                self.push(back, STEP_DONE, i)
            else:
                self.push(back + p.x_in[p.order[p.pos][0]], SUBMIT, i)
        self.start_batch(t)

    def _alone(self, t: float, i: int) -> float | None:
        """Fast path: actor ``i``'s batch ended at ``t`` with nothing else queued. While its
        next request would reach an idle base before any other event, run that batch at
        once (the same arithmetic as the events). Returns the time its last batch here
        ended (the caller goes on from there), or None when it was all handled."""
        p = self.actors[i].cur
        heap, const, contrib, order = self.heap, self.const, p.contrib, p.order
        x_in, x_out, gap, n = p.x_in, p.x_out, p.gap, len(order)
        log = self.batches
        while p.pos + 1 < n:
            s_next = order[p.pos + 1][0]
            sub = t + x_out[order[p.pos][0]] + gap + x_in[s_next]
            if heap and heap[0][0] <= sub:
                return t
            p.pos += 1
            cost = const[s_next] + contrib[s_next] + self.per_req
            self.busy_s += cost
            self.n_batches += 1
            self.n_requests += 1
            if log is not None:
                log.append((s_next, order[p.pos][1], p.rows[self.per_seq[s_next]], 1, 0.0,
                            cost, sub))
            t = sub + cost
        return t
