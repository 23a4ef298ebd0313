"""A fleet: N replicas, each a whole twin server, behind a router (``twin fleet``).

:func:`simulate_fleet` runs one trace through a router (``twin.fleet.routers``: round
robin, least outstanding requests, a static table, consistent hashing, adapter affinity)
onto replicas that may differ (profile, serving config); it returns a :class:`FleetRun`
whose ``result`` is an ordinary ``RunResult`` with a ``fleet`` section per replica.
Layer: beside ``twin.policies`` (which it reuses to combine results), above ``twin.sim``.
"""

from twin.fleet.fleet import Replica, simulate_fleet
from twin.fleet.report import FleetRun
from twin.fleet.routers import ROUTERS, Router, make_router

__all__ = ["simulate_fleet", "Replica", "FleetRun", "ROUTERS", "Router", "make_router"]
