"""``distgen plan`` (issue 18, in progress): pick the parallel plan from a cost model fitted on published
measurements.

- :mod:`distgen.planner.models`: model descriptions from configs (ops, FLOPs, bytes, heads, tokens).
- :mod:`distgen.planner.hardware`: accelerators and links, peak numbers from the spec sheets.
- :mod:`distgen.planner.catalog`: configs of the models the published measurements ran.
- :mod:`distgen.planner.costs`: one cost model per strategy (compute per rank, bytes per link,
  hidden vs blocking, memory per GPU, feasibility).
- :mod:`distgen.planner.factors` / :mod:`distgen.planner.fitted`: the efficiency factors, fitted by
  :mod:`distgen.planner.fit` on the fitting split of :mod:`distgen.planner.published`.
"""
