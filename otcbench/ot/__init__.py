"""Batched entropic optimal transport (Sinkhorn) and OT distances between token sets; see ``docs/ot.md``."""

from otcbench.ot.sinkhorn import (
    SCALED_MAX_RANGE,
    OTInputError,
    SolveInfo,
    cosine_cost,
    default_chunk,
    ot_distance,
    ot_distance_matrix,
    sinkhorn_log,
    sinkhorn_potentials,
    token_weights,
    transport_cost,
)

__all__ = [
    "SCALED_MAX_RANGE",
    "OTInputError",
    "SolveInfo",
    "cosine_cost",
    "default_chunk",
    "ot_distance",
    "ot_distance_matrix",
    "sinkhorn_log",
    "sinkhorn_potentials",
    "token_weights",
    "transport_cost",
]
