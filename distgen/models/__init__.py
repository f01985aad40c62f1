"""Model adapters (diffusers pipelines) and embedded default models."""
