"""The OT distance between token sets with OTCCLIP's options (marginals, Sinkhorn settings, text masks)."""

from __future__ import annotations

from typing import Any

import torch

from otcbench.defenses.otcclip.options import OTCCLIPOptions

__all__ = ["TokenOT"]


class TokenOT:
    """Mixin of the OTCCLIP defense: OT distances between image and caption token sets under ``self.options``."""

    options: OTCCLIPOptions

    def ot_distance(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None,
        y_mask: torch.Tensor | None,
        x_global: torch.Tensor | None = None,
        y_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d_OT [B] between token sets x [B, n, d] and y [B, m, d] with this defense's OT options."""
        from otcbench import ot  # imported on use: the defense registry must import without OT deps

        o = self.options
        a, b = self._marginals(ot, x, x_mask, x_global, y, y_mask, y_global)
        return ot.ot_distance(x, y, x_mask, y_mask, a=a, b=b, eps=o.eps, n_iters=o.sinkhorn_iters, tol=o.sinkhorn_tol)

    def ot_distance_matrix(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None,
        y_mask: torch.Tensor | None,
        x_global: torch.Tensor | None = None,
        y_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d_OT [P, Q] between every token set of x [P, n, d] and every one of y [Q, m, d]."""
        from otcbench import ot

        o = self.options
        a, b = self._marginals(ot, x, x_mask, x_global, y, y_mask, y_global)
        return ot.ot_distance_matrix(x, y, x_mask, y_mask, a=a, b=b, eps=o.eps, n_iters=o.sinkhorn_iters,
                                     tol=o.sinkhorn_tol)

    def _marginals(self, ot: Any, x: torch.Tensor, x_mask: torch.Tensor | None, x_global: torch.Tensor | None,
                   y: torch.Tensor, y_mask: torch.Tensor | None, y_global: torch.Tensor | None,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.options.marginals == "uniform" or x_global is None or y_global is None:
            return None, None
        # marginals are constants of the transport problem: no gradient through the token weights
        return (ot.token_weights(x, x_global, x_mask).detach(), ot.token_weights(y, y_global, y_mask).detach())

    def _text_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.options.drop_sot:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

