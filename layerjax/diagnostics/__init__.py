"""Per-layer statistics and evaluations: what the norm-scheme papers measure, layer by layer."""
