"""Batched entropic optimal transport: the Sinkhorn solver (:mod:`.sinkhorn`) and OT distances between token sets
(:mod:`.distance`); see ``docs/ot.md``."""

from otcbench.ot.distance import cosine_cost, ot_distance, ot_distance_matrix, token_weights
from otcbench.ot.sinkhorn import (
    SCALED_MAX_RANGE,
    OTInputError,
    SolveInfo,
    default_chunk,
    sinkhorn_log,
    sinkhorn_potentials,
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
