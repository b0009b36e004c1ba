"""Per-layer router statistics of LoRA-expert models, as logged: the train step returns them per
segment ([layers, experts] usage, [layers] entropy); the log flattens them to one row per layer."""

from __future__ import annotations

import numpy as np

ROUTER_SERIES = ("expert_usage", "router_entropy")


def router_log(router: dict) -> dict:
    """{"expert_usage": [per layer: each expert's share of the top-k assignments],
    "router_entropy": [per layer: entropy of the mean routing distribution, in nats]}."""
    usage = [row.tolist() for segment in router["expert_usage"] for row in np.asarray(segment)]
    entropy = [float(v) for segment in router["router_entropy"] for v in np.asarray(segment)]
    return {"expert_usage": usage, "router_entropy": entropy}
