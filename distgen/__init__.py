"""distgen: a distributed multi-GPU inference runtime for generative models.

Subpackages: ``distgen.comm`` (the exchange engine), ``distgen.runtime`` (workers, process
groups, the diffusion runner), ``distgen.models`` (model adapters and embedded defaults),
``distgen.parallel`` (one module per strategy, from the top-level ``parallel/`` folder) and
``distgen.launch`` (torchrun / local spawn / Ray launchers, from ``launch/``).
"""

__version__ = "0.1.0"
