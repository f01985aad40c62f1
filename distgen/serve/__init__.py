"""The HTTP layer (``distgen serve``): FastAPI app, request checks, metrics.

:mod:`distgen.serve.service` checks requests against the model; :mod:`distgen.serve.app` maps
the OpenAI-compatible endpoints onto the engine; :mod:`distgen.serve.metrics` exports Prometheus
metrics.
"""
