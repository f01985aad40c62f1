"""``distgen bench <workload>``: one module per workload, each printing one JSON object.

Benchmarks prepare their jobs through :mod:`distgen.workloads` (the same validation as the
CLI) and run them through :func:`distgen.launch.run_job`; they never import the CLI.
"""
