"""Expert placement for expert parallelism: routing traces, placement policies, metrics.

``routing`` records / loads / synthesises routing statistics, ``policies`` turns them into a
:class:`Placement` (round-robin, linear, eplb, tuner), ``metrics`` predicts its balancedness
and cross-rank traffic. ``distgen place`` (distgen/cli_place.py) is the command line.
"""

from distgen.placement.metrics import balancedness, cross_rank_floor, cross_rank_fraction, rank_loads, summary
from distgen.placement.policies import POLICIES, Placement, compute, eplb, linear, round_robin, tuner, validate
from distgen.placement.routing import RoutingRecorder, RoutingTrace, synthetic

__all__ = [
    "POLICIES", "Placement", "RoutingRecorder", "RoutingTrace", "balancedness", "compute", "cross_rank_floor", "cross_rank_fraction",
    "eplb", "linear", "rank_loads", "round_robin", "summary", "synthetic", "tuner", "validate",
]
