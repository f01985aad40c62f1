"""The exchange engine: the one place where activations cross ranks."""

from distgen.comm.engine import CommStats, ExchangeEngine, Pending, StepStats

__all__ = ["CommStats", "ExchangeEngine", "Pending", "StepStats"]
