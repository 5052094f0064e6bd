"""OT distances between token sets: ``<T*, C>`` with the cosine cost, paired or all-pairs, gradient through the cost.

The plan ``T*`` of each problem is Sinkhorn's (:mod:`otcbench.ot.sinkhorn`) and is a constant: OT distances get
gradients through the cost only, via custom autograd functions that store the potentials instead of the plans
and recompute each plan in the backward pass (memory ``O(P Q (n + m))`` instead of ``O(P Q n m)``). The cosine
cost is computed from raw features and their inverse norms on cache-sized chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from otcbench.ot.sinkhorn import (
    Method,
    OTInputError,
    _check_mask,
    _check_params,
    _solve,
    _solve_chunk,
    _validate,
    _weights,
    default_chunk,
)


def _inv_norm(x: Tensor, mask: Tensor | None) -> Tensor:
    """1 / max(|x_i|, 1e-12) per token [B, n] (as F.normalize), 0 on padded tokens."""
    r = torch.linalg.vector_norm(x, dim=-1).clamp_min_(1e-12).reciprocal_()
    return r if mask is None else r.masked_fill_(~mask, 0.0)


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """Paired cost ``C_b = 1 - x_b y_b^T`` [B, n, m] of unit-norm float32 token sets."""
    return torch.bmm(x, y.transpose(1, 2)).neg_().add_(1.0)


def _paired_cost(x: Tensor, y: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
    """``1 - cos`` [c, n, m] of raw features x [c, n, d], y [c, m, d] with inverse norms rx, ry.

    Scaling the [n, m] similarities by the inverse norms is cheaper than normalising the [n + m, d] features
    whenever n m < (n + m) d (always, for token sets), and is done on cache-sized chunks.
    """
    S = torch.bmm(x, y.transpose(1, 2))
    return S.mul_(rx.neg()[:, :, None]).mul_(ry[:, None, :]).add_(1.0)


def _block_cost(x: Tensor, y: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
    """All-pairs ``1 - cos`` of x [p, n, d] vs y [q, m, d] -> [p * q, n, m]: one GEMM, then a layout copy."""
    p, n, d = x.shape
    q, m, _ = y.shape
    S = x.reshape(p * n, d) @ y.reshape(q * m, d).T  # [p*n, q*m]
    S.mul_(rx.reshape(-1, 1).neg()).mul_(ry.reshape(1, -1))
    C = torch.empty(p, q, n, m, device=x.device)
    C.copy_(S.view(p, n, q, m).permute(0, 2, 1, 3))
    return C.add_(1.0).view(p * q, n, m)


def _normalize_backward(gh: Tensor, x: Tensor, r: Tensor) -> Tensor:
    """Gradient w.r.t. x of x_hat = x * r (r = 1/|x|) given the gradient gh w.r.t. x_hat."""
    xh = x * r[..., None]
    return (gh - (gh * xh).sum(-1, keepdim=True) * xh).mul_(r[..., None])


def _plan_from_potentials(C: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """T = exp(f_i + g_j - C_ij / eps), in place in C."""
    return C.div_(-eps).add_(f[:, :, None]).add_(g[:, None, :]).exp_()


class _PairedOT(torch.autograd.Function):
    """d_b = <T_b, C_b> with C_b = 1 - cos(x_b, y_b); T_b constant. Saves potentials, recomputes T in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, am: Tensor | None, bm: Tensor | None, aw: Tensor, bw: Tensor,
                opts: dict) -> Tensor:
        B, n, _ = x.shape
        m = y.shape[1]
        with torch.no_grad():
            rx, ry = _inv_norm(x, am), _inv_norm(y, bm)
            _, dist, f, g = _solve(lambda s, e: _paired_cost(x[s:e], y[s:e], rx[s:e], ry[s:e]), B, n, m, aw, bw,
                                   am, bm, want_plan=False, want_dist=True, device=x.device, **opts)
        ctx.save_for_backward(x, y, rx, ry, f, g)
        ctx.eps, ctx.chunk = opts["eps"], opts["chunk"] or default_chunk(n, m, x.device)
        return dist

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, y, rx, ry, f, g = ctx.saved_tensors
        ghx, ghy = torch.empty_like(x), torch.empty_like(y)
        grad = grad.float()
        for s in range(0, x.shape[0], ctx.chunk):
            e = min(x.shape[0], s + ctx.chunk)
            # dd/dC = T (a constant); C = 1 - x_hat y_hat^T, so dd/dx_hat = -T y_hat and dd/dy_hat = -T^T x_hat.
            G = _plan_from_potentials(_paired_cost(x[s:e], y[s:e], rx[s:e], ry[s:e]), f[s:e], g[s:e], ctx.eps)
            G.mul_(-grad[s:e, None, None])
            torch.bmm(G, y[s:e] * ry[s:e, :, None], out=ghx[s:e])
            torch.bmm(G.transpose(1, 2), x[s:e] * rx[s:e, :, None], out=ghy[s:e])
        gx = _normalize_backward(ghx, x, rx) if ctx.needs_input_grad[0] else None
        gy = _normalize_backward(ghy, y, ry) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None, None


def _pair_blocks(P: int, Q: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """Blocks (p0, p1, q0, q1) of at most ``chunk`` pairs covering the P x Q grid."""
    qb = min(Q, chunk)
    pb = max(1, chunk // max(1, qb))
    return [(p0, min(P, p0 + pb), q0, min(Q, q0 + qb)) for p0 in range(0, P, pb) for q0 in range(0, Q, qb)]


class _MatrixOT(torch.autograd.Function):
    """D_pq = <T_pq, C_pq> for all pairs, C_pq = 1 - cos(x_p, y_q), in blocks of pairs; T constant."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, am: Tensor | None, bm: Tensor | None, aw: Tensor, bw: Tensor,
                opts: dict) -> Tensor:
        P, n, _ = x.shape
        Q, m, _ = y.shape
        opts = dict(opts)
        chunk = opts.pop("chunk") or default_chunk(n, m, x.device)
        D = x.new_empty(P, Q)
        f = x.new_empty(P, Q, n)
        g = x.new_empty(P, Q, m)
        with torch.no_grad():
            rx, ry = _inv_norm(x, am), _inv_norm(y, bm)
            for p0, p1, q0, q1 in _pair_blocks(P, Q, chunk):
                p, q = p1 - p0, q1 - q0
                C = _block_cost(x[p0:p1], y[q0:q1], rx[p0:p1], ry[q0:q1])
                rm = None if am is None else am[p0:p1, None, :].expand(p, q, n).reshape(p * q, n)
                cm = None if bm is None else bm[None, q0:q1, :].expand(p, q, m).reshape(p * q, m)
                a_ = aw[p0:p1, None, :].expand(p, q, n).reshape(p * q, n)
                b_ = bw[None, q0:q1, :].expand(p, q, m).reshape(p * q, m)
                _, dist, fb, gb, _, _ = _solve_chunk(C, a_, b_, rm, cm, want_plan=False, want_dist=True, **opts)
                D[p0:p1, q0:q1] = dist.view(p, q)
                f[p0:p1, q0:q1] = fb.view(p, q, n)
                g[p0:p1, q0:q1] = gb.view(p, q, m)
        ctx.save_for_backward(x, y, rx, ry, f, g)
        ctx.eps, ctx.chunk = opts["eps"], chunk
        return D

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, y, rx, ry, f, g = ctx.saved_tensors
        P, n, d = x.shape
        Q, m, _ = y.shape
        ghx, ghy = torch.zeros_like(x), torch.zeros_like(y)
        xh, yh = x * rx[..., None], y * ry[..., None]
        grad = grad.float()
        for p0, p1, q0, q1 in _pair_blocks(P, Q, ctx.chunk):
            p, q = p1 - p0, q1 - q0
            C = _block_cost(x[p0:p1], y[q0:q1], rx[p0:p1], ry[q0:q1])
            G = _plan_from_potentials(C, f[p0:p1, q0:q1].reshape(p * q, n), g[p0:p1, q0:q1].reshape(p * q, m),
                                      ctx.eps).view(p, q, n, m)
            G.mul_(-grad[p0:p1, q0:q1, None, None])
            Gp = G.permute(0, 2, 1, 3).reshape(p * n, q * m)  # rows (p, i), cols (q, j)
            ghx[p0:p1] += (Gp @ yh[q0:q1].reshape(q * m, d)).view(p, n, d)
            ghy[q0:q1] += (Gp.T @ xh[p0:p1].reshape(p * n, d)).view(q, m, d)
        gx = _normalize_backward(ghx, x, rx) if ctx.needs_input_grad[0] else None
        gy = _normalize_backward(ghy, y, ry) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None, None


def _features(x: Tensor, name: str) -> None:
    if x.dim() != 3:
        raise OTInputError(f"{name} must be a [batch, tokens, dim] tensor, got shape {tuple(x.shape)}")


def ot_distance(x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None, *,
                a: Tensor | None = None, b: Tensor | None = None, eps: float = 0.05, n_iters: int = 50,
                tol: float | None = None, check_every: int = 10, method: Method = "auto",
                chunk: int | None = None) -> Tensor:
    """OT distances ``d_b = <T*_b, C_b>`` between paired token sets x [B, n, d] and y [B, m, d] -> [B] float32.

    ``C = 1 - cos(x_i, y_j)`` (computed in float32; features need not be normalised), ``T*`` =
    :func:`sinkhorn_log` of ``C`` treated as a constant: gradients flow through the cost only, to ``x`` and
    ``y`` (in their own dtype). Masks, marginals and solver options as in :func:`sinkhorn_log`; ``chunk``
    bounds the number of cost matrices materialised at once (default :func:`default_chunk`). Only the
    potentials are kept for the backward pass, which rebuilds the plans chunk by chunk.
    """
    _features(x, "x")
    _features(y, "y")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise OTInputError(f"x {tuple(x.shape)} and y {tuple(y.shape)} need the same batch size and feature dim")
    _check_params(eps, n_iters, tol, check_every, method)
    B, n, _ = x.shape
    m = y.shape[1]
    dev = x.device
    with torch.autocast(dev.type, enabled=False):
        am = _check_mask(x_mask, (B, n), "x_mask", dev)
        bm = _check_mask(y_mask, (B, m), "y_mask", dev)
        aw = _weights(a, am, (B, n), "a", dev)
        bw = _weights(b, bm, (B, m), "b", dev)
        _validate(aw, bw, a is not None, b is not None, am, bm)
        opts = dict(eps=eps, n_iters=n_iters, tol=tol, check_every=check_every, method=method, chunk=chunk)
        return _PairedOT.apply(x.float(), y.float(), am, bm, aw, bw, opts)


def ot_distance_matrix(x: Tensor, y: Tensor, x_mask: Tensor | None = None, y_mask: Tensor | None = None, *,
                       chunk: int | None = None, a: Tensor | None = None, b: Tensor | None = None,
                       eps: float = 0.05, n_iters: int = 50, tol: float | None = None, check_every: int = 10,
                       method: Method = "auto") -> Tensor:
    """OT distances between all pairs: x [P, n, d] vs y [Q, m, d] -> [P, Q] float32.

    Equal to ``ot_distance`` on every pair (p, q) (``a`` [P, n] and ``b`` [Q, m] are per-set marginals), with
    the gradient through the cost only. Cost matrices are built block by block (``chunk`` pairs at a time,
    default :func:`default_chunk`) with one GEMM per block and solved right away, so memory stays bounded;
    only the potentials (P Q (n + m) floats) are kept for the backward pass, which rebuilds each block's plan.
    """
    _features(x, "x")
    _features(y, "y")
    if x.shape[2] != y.shape[2]:
        raise OTInputError(f"x {tuple(x.shape)} and y {tuple(y.shape)} need the same feature dim")
    _check_params(eps, n_iters, tol, check_every, method)
    P, n, _ = x.shape
    Q, m, _ = y.shape
    dev = x.device
    with torch.autocast(dev.type, enabled=False):
        am = _check_mask(x_mask, (P, n), "x_mask", dev)
        bm = _check_mask(y_mask, (Q, m), "y_mask", dev)
        aw = _weights(a, am, (P, n), "a", dev)
        bw = _weights(b, bm, (Q, m), "b", dev)
        _validate(aw, bw, a is not None, b is not None, am, bm)
        opts = dict(eps=eps, n_iters=n_iters, tol=tol, check_every=check_every, method=method, chunk=chunk)
        return _MatrixOT.apply(x.float(), y.float(), am, bm, aw, bw, opts)


@torch.no_grad()
def token_weights(tokens: Tensor, global_feat: Tensor, mask: Tensor | None = None, *,
                  temperature: float = 0.1) -> Tensor:
    """Marginal weights [B, n] from token-to-global similarity: ``softmax_i(cos(t_i, g) / temperature)`` over
    the real tokens (zero on padding), detached float32 — the option to uniform marginals for OTCCLIP's OT distance.

    ``temperature`` is otcbench's choice (the paper's value is not public): 0.1 spreads weights over the
    tokens that agree with the global embedding without collapsing onto one.
    """
    if tokens.dim() != 3 or global_feat.dim() != 2 or global_feat.shape != (tokens.shape[0], tokens.shape[2]):
        raise OTInputError(f"tokens must be [B, n, d] and global_feat [B, d]; got {tuple(tokens.shape)} and "
                           f"{tuple(global_feat.shape)}")
    if not temperature > 0:
        raise OTInputError(f"temperature must be positive, got {temperature}")
    sim = torch.einsum("bnd,bd->bn", F.normalize(tokens.float(), dim=-1), F.normalize(global_feat.float(), dim=-1))
    if mask is not None:
        mask = _check_mask(mask, tuple(tokens.shape[:2]), "mask", tokens.device)
        sim = sim.masked_fill(~mask, -math.inf)
    return torch.softmax(sim / temperature, dim=-1)


__all__ = ["cosine_cost", "ot_distance", "ot_distance_matrix", "token_weights"]
