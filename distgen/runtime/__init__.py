"""Per-rank runtime: process groups, device mesh, request runners."""
