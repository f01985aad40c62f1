"""The engine: one resident worker group for one model and parallel plan, and its requests.

``Engine.start()`` starts the group with a launcher (local processes, Ray actors, or this process
under torchrun) and loads the model once; ``submit()`` hands requests to the group's leader and
returns a :class:`Handle` whose events (queued, started, progress, result, error, cancelled)
arrive as the group works; ``cancel()``, ``health()``, ``stop()``. A rank that dies fails the
requests it was running at once (naming the rank), and the group is rebuilt up to
``max_restarts`` times; requests that were only waiting are kept and run on the new group.

Layers: the HTTP server (``distgen.serve``) and the CLI sit above this; launchers
(``distgen.launch``) and the resident worker loop (``distgen.runtime.resident``) below.
"""

from distgen.engine.core import Engine, EngineConfig, EngineUnavailable, Handle, QueueFull, run_once

__all__ = ["Engine", "EngineConfig", "EngineUnavailable", "Handle", "QueueFull", "run_once"]
