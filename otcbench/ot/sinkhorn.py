"""Batched entropic optimal transport between sets: Sinkhorn solver and OT distances.

Every problem ``b`` of a batch is the entropic OT problem

    T* = argmin_T <T, C_b> - eps * H(T)   s.t.  T 1 = a_b,  T^T 1 = b_b,  T >= 0

between ``n`` source points (weights ``a_b``) and ``m`` target points (weights ``b_b``), solved by Sinkhorn's
alternating projections: ``u <- a / (K v)``, ``v <- b / (K^T u)`` with ``K = exp(-C / eps)`` (one iteration =
one ``u`` update followed by one ``v`` update, like POT's batch solver). The plan is
``T_ij = exp(f_i + g_j - C_ij / eps)`` for the log-potentials ``f, g`` the solver returns.

Two exact implementations of these iterations, chosen per chunk of problems:

* **scaled** (fast path): the kernel ``K`` is materialised once per chunk (row-shifted so that every row's
  largest entry is 1) together with its transpose, and every half-iteration is one batched vector-matrix
  product plus one division — no ``exp``/``log`` inside the loop. It is used when the kernel cannot
  underflow in float32: the range of each row of ``C`` divided by ``eps`` is at most
  ``SCALED_MAX_RANGE`` (cosine costs lie in [0, 2], so eps >= 0.04 always qualifies).
* **log** (fallback): the classic log-domain updates ``u <- log a - LSE_j(K_ij + v_j)``, stable for any
  ``eps``, written with preallocated buffers and reductions over contiguous memory.

On CPU the problems are processed in cache-sized chunks (each chunk runs all its iterations while its
kernel stays in L2), which is what makes the loop fast there; on CUDA a chunk is as large as memory allows.
Everything is computed in float32 whatever the input dtype, under disabled autocast, and the returned plans
and potentials carry no autograd history. OT distances between token sets, with gradients through the cost,
are in :mod:`otcbench.ot.distance`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from otcbench.errors import UserError

Method = Literal["auto", "scaled", "log"]

#: Largest ``(max_j C_ij - min_j C_ij) / eps`` over the rows of a chunk for which the scaled-domain path is used
#: (``exp(-50) ~ 2e-22``: the kernel, the scalings and their products stay far from float32's limits).
SCALED_MAX_RANGE = 50.0

#: Problems per chunk on CPU are chosen so that one kernel (and its transpose) stays in L2 cache:
#: 2**17 float32 entries = 512 KiB each (measured on 2 MiB-L2 cores: 2**16..2**18 are within noise).
_CPU_CHUNK_ELEMS = 1 << 17
#: On CUDA one chunk holds up to 2**26 entries (256 MiB per [chunk, n, m] float32 tensor, ~4 of them live).
_CUDA_CHUNK_ELEMS = 1 << 26


class OTInputError(UserError, ValueError):
    """Inconsistent shapes, masks or weights given to an OT function (a ``UserError`` and a ``ValueError``)."""


@dataclass
class SolveInfo:
    """What the solver did: iterations run per chunk (fewer than ``n_iters`` when ``tol`` stopped it early),
    and the path each chunk took."""

    iterations: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def default_chunk(n: int, m: int, device: torch.device | str) -> int:
    """Problems per solver chunk: cache-sized on CPU, memory-sized on CUDA."""
    elems = _CUDA_CHUNK_ELEMS if torch.device(device).type == "cuda" else _CPU_CHUNK_ELEMS
    return max(1, elems // max(1, n * m))


def _check_mask(mask: Tensor | None, shape: tuple[int, int], name: str, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != shape:
        raise OTInputError(f"{name} has shape {tuple(mask.shape)}, expected {shape}")
    return mask.to(device=device, dtype=torch.bool)


def _weights(w: Tensor | None, mask: Tensor | None, shape: tuple[int, int], name: str,
             device: torch.device) -> Tensor:
    """Marginal weights [B, k] float32: uniform over real points or the given ones, zero on padding,
    renormalised to sum 1 per problem."""
    if w is None:
        if mask is None:
            return torch.full(shape, 1.0 / shape[1], device=device)
        w = mask.float()
    else:
        if tuple(w.shape) != shape:
            raise OTInputError(f"{name} has shape {tuple(w.shape)}, expected {shape}")
        w = w.detach().to(device=device, dtype=torch.float32)
        if mask is not None:
            w = w * mask
    return w / w.sum(-1, keepdim=True)


def _validate(a: Tensor, b: Tensor, a_given: bool, b_given: bool, a_mask: Tensor | None,
              b_mask: Tensor | None) -> None:
    """One host sync (only when masks or weights were given): every problem needs mass on both sides."""
    checks = []
    if a_given or a_mask is not None:
        checks.append((a.sum(-1) > 0.5).all() & (a >= 0).all() & a.isfinite().all())
    if b_given or b_mask is not None:
        checks.append((b.sum(-1) > 0.5).all() & (b >= 0).all() & b.isfinite().all())
    if checks and not bool(torch.stack(checks).all()):
        raise OTInputError(
            "every OT problem needs at least one real point with positive weight on each side, and weights "
            "must be finite and non-negative; check the masks (True = real token) and the marginals a/b"
        )


def _chunk_pad(c: int, n: int, m: int, rmask: Tensor | None, cmask: Tensor | None) -> Tensor | None:
    if rmask is None and cmask is None:
        return None
    r = rmask[:, :, None] if rmask is not None else torch.ones(c, n, 1, dtype=torch.bool, device=cmask.device)
    k = cmask[:, None, :] if cmask is not None else torch.ones(c, 1, m, dtype=torch.bool, device=rmask.device)
    return ~(r & k)


def _blas_pad_cols(n: int, m: int, device: torch.device) -> int:
    """Zero-mass columns to add so that torch's CPU bmm uses BLAS instead of its naive small-matrix kernel.

    torch (ATen ``bmm_out_or_baddbmm_``) multiplies matrices with ``contraction * rows * cols < 400`` with a
    plain loop; for our vector-matrix products that is ``n * m < 400``. Measured on 16x24 (torch 2.15, 1
    thread): 830 ns per problem and iteration unpadded, 130 ns padded to 16x25. Padding is used when it at most
    doubles the kernel; tiny problems (say 6x9) are faster with the loop.
    """
    if device.type != "cpu" or n * m >= 400:
        return 0
    m2 = -(-400 // n)
    return m2 - m if n * m2 <= 2 * n * m else 0


def _scaled_chunk(K: Tensor, a: Tensor, b: Tensor, v0: Tensor, n_iters: int, tol: float | None,
                  check_every: int) -> tuple[Tensor, Tensor, int]:
    """Sinkhorn in the scaled domain on a ready kernel K [c, n, m] (padded entries 1, real entries in (0, 1]).

    Returns scalings u [c, n], v [c, m] (0 on padding) and the number of completed iterations.
    """
    c, n, m = K.shape
    extra = _blas_pad_cols(n, m, K.device)
    if extra:  # padded columns: kernel 1, weight 0 -> scaling exactly 0, like masked columns
        K, b, v0 = F.pad(K, (0, extra), value=1.0), F.pad(b, (0, extra)), F.pad(v0, (0, extra))
    mm = m + extra
    Kt = K.transpose(1, 2).contiguous()
    # Row-vector-times-matrix products (v^T K^T and u^T K) over contiguous rows: the fastest batched
    # matrix-vector form on CPU (measured 2-6x faster than K @ v with a column vector).
    a3, b3 = a[:, None, :], b[:, None, :]
    v = v0[:, None, :].clone()
    u = torch.empty(c, 1, n, device=K.device)
    kv = torch.empty(c, 1, n, device=K.device)
    ku = torch.empty(c, 1, mm, device=K.device)
    done = 0
    for it in range(n_iters):
        torch.bmm(v, Kt, out=kv)
        if tol is not None and it > 0 and it % check_every == 0:
            # Row marginals of the plan after the previous iteration (its columns are exact): free here.
            err = (u * kv - a3).abs_().sum(-1).amax()
            if float(err) < tol:
                break
        torch.div(a3, kv, out=u)
        torch.bmm(u, K, out=ku)
        torch.div(b3, ku, out=v)
        done = it + 1
    return u[:, 0], v[:, 0, :m], done


def _lse_last(x: Tensor, buf: Tensor, add: Tensor) -> Tensor:
    """log-sum-exp over the last dim of ``x + add`` (broadcast), computed in place in ``buf``."""
    torch.add(x, add, out=buf)
    mx = buf.amax(-1, keepdim=True)
    buf.sub_(mx).exp_()
    return buf.sum(-1).log_().add_(mx[..., 0])


def _log_chunk(L: Tensor, loga: Tensor, logb: Tensor, g0: Tensor, n_iters: int, tol: float | None,
               check_every: int, a: Tensor) -> tuple[Tensor, Tensor, int]:
    """Log-domain Sinkhorn on L = log K [c, n, m] (finite everywhere; padding is carried by -inf potentials).

    Returns log-scalings f [c, n], g [c, m] (-inf on padding) and the number of completed iterations.
    """
    c, n, m = L.shape
    Lt = L.transpose(1, 2).contiguous()
    buf_u = torch.empty_like(L)
    buf_v = torch.empty_like(Lt)
    g = g0.clone()
    f = torch.zeros(c, n, device=L.device)
    done = 0
    for it in range(n_iters):
        lse = _lse_last(L, buf_u, g[:, None, :])
        if tol is not None and it > 0 and it % check_every == 0:
            err = ((f + lse).exp() - a).abs_().sum(-1).amax()
            if float(err) < tol:
                break
        f = loga - lse
        g = logb - _lse_last(Lt, buf_v, f[:, None, :])
        done = it + 1
    return f, g, done


def _solve_chunk(C: Tensor, a: Tensor, b: Tensor, rmask: Tensor | None, cmask: Tensor | None, eps: float,
                 n_iters: int, tol: float | None, check_every: int, method: Method, want_plan: bool,
                 want_dist: bool) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, int, str]:
    """Solve one chunk; returns (plan, distance, f, g, iterations, path) with T = exp(f_i + g_j - C_ij / eps)."""
    c, n, m = C.shape
    pad = _chunk_pad(c, n, m, rmask, cmask)
    # Per-row range of the real costs (amin + amax: 2.6x faster than torch.aminmax on CPU, measured).
    if pad is None:
        cmin, cmax = C.amin(2), C.amax(2)
    else:
        cmin = C.masked_fill(pad, math.inf).amin(2)
        cmax = C.masked_fill(pad, -math.inf).amax(2)
        real = torch.isfinite(cmin)
        zero = torch.zeros((), device=C.device)
        cmin, cmax = torch.where(real, cmin, zero), torch.where(real, cmax, zero)
    path = method
    if method == "auto":
        # Smallest real kernel entry is exp(-max row range / eps): the scaled path is exact while it is normal.
        path = "scaled" if float((cmax - cmin).amax()) <= SCALED_MAX_RANGE * eps else "log"
    # Row-shifted log-kernel L_ij = (min_j C_ij - C_ij) / eps <= 0 (one fused pass); padding set to 0 (finite,
    # and exp(0) = 1 > 0 in the scaled kernel): padded points enter only through zero scalings / -inf potentials.
    L = torch.add((cmin / eps)[:, :, None], C, alpha=-1.0 / eps)
    if pad is not None:
        L.masked_fill_(pad, 0.0)
    Cz = C if pad is None or not want_dist else C.masked_fill(pad, 0.0)  # padded costs may be garbage
    dist = None
    if path == "scaled":
        K = L.exp_()
        v0 = cmask.float() if cmask is not None else torch.ones(c, m, device=C.device)
        u, v, done = _scaled_chunk(K, a, b, v0, n_iters, tol, check_every)
        if want_plan:
            plan = K.mul_(u[:, :, None]).mul_(v[:, None, :])
            if want_dist:
                dist = (plan * Cz).sum((1, 2))
        else:
            plan = None
            if want_dist:  # u^T (K o C) v without materialising the plan
                dist = (torch.bmm(u[:, None, :], K.mul_(Cz))[:, 0] * v).sum(-1)
        f = u.log().add_(cmin / eps)
        g = v.log()
    else:
        loga, logb = a.log(), b.log()
        g0 = torch.zeros(c, m, device=C.device)
        if cmask is not None:
            g0.masked_fill_(~cmask, -math.inf)
        fl, g, done = _log_chunk(L, loga, logb, g0, n_iters, tol, check_every, a)
        plan = L.add_(fl[:, :, None]).add_(g[:, None, :]).exp_() if (want_plan or want_dist) else None
        if want_dist:
            dist = (plan * Cz).sum((1, 2))
        f = fl + cmin / eps
    return (plan if want_plan else None), dist, f, g, done, path


def _solve(get_cost: Callable[[int, int], Tensor], B: int, n: int, m: int, a: Tensor, b: Tensor,
           rmask: Tensor | None, cmask: Tensor | None, *, eps: float, n_iters: int, tol: float | None,
           check_every: int, method: Method, chunk: int | None, want_plan: bool, want_dist: bool,
           device: torch.device, info: SolveInfo | None = None) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Solve B problems chunk by chunk (no grad); ``get_cost(s, e)`` gives the float32 costs of problems s..e-1,
    built just before they are solved so that on CPU they are still in cache. Returns (plan, dist, f, g)."""
    if B == 0:
        z = functools.partial(torch.zeros, device=device)
        return (z(0, n, m) if want_plan else None), (z(0) if want_dist else None), z(0, n), z(0, m)
    chunk = chunk or default_chunk(n, m, device)
    plans, dists, fs, gs = [], [], [], []
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        plan, dist, f, g, done, path = _solve_chunk(
            get_cost(s, e), a[s:e], b[s:e], None if rmask is None else rmask[s:e],
            None if cmask is None else cmask[s:e], eps, n_iters, tol, check_every, method, want_plan, want_dist)
        plans.append(plan)
        dists.append(dist)
        fs.append(f)
        gs.append(g)
        if info is not None:
            info.iterations.append(done)
            info.paths.append(path)

    def cat(xs: list) -> Tensor | None:
        return None if xs[0] is None else (xs[0] if len(xs) == 1 else torch.cat(xs))

    return cat(plans), cat(dists), cat(fs), cat(gs)  # type: ignore[return-value]


def _slicer(C: Tensor) -> Callable[[int, int], Tensor]:
    return lambda s, e: C[s:e]


def _check_params(eps: float, n_iters: int, tol: float | None, check_every: int, method: str) -> None:
    if not eps > 0 or not math.isfinite(eps):
        raise OTInputError(f"eps must be a positive number, got {eps}")
    if n_iters < 1:
        raise OTInputError(f"n_iters must be at least 1, got {n_iters}")
    if tol is not None and not tol > 0:
        raise OTInputError(f"tol must be positive (or None for a fixed number of iterations), got {tol}")
    if check_every < 1:
        raise OTInputError(f"check_every must be at least 1, got {check_every}")
    if method not in ("auto", "scaled", "log"):
        raise OTInputError(f"method must be 'auto', 'scaled' or 'log', got {method!r}")


def sinkhorn_potentials(cost: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None,
                        a: Tensor | None = None, b: Tensor | None = None, eps: float = 0.05, n_iters: int = 50,
                        tol: float | None = None, *, check_every: int = 10, method: Method = "auto",
                        chunk: int | None = None, info: SolveInfo | None = None) -> tuple[Tensor, Tensor]:
    """Log-potentials ``(f [B, n], g [B, m])`` of the entropic plans: ``T_ij = exp(f_i + g_j - C_ij / eps)``.

    Same arguments as :func:`sinkhorn_log`; padded points get ``-inf``. Cheaper than the plan when only
    potentials are needed (re-ranking scores, warm starts).
    """
    C, am, bm, aw, bw = _prepare(cost, a_mask, b_mask, a, b, eps, n_iters, tol, check_every, method)
    with torch.no_grad(), torch.autocast(C.device.type, enabled=False):
        _, _, f, g = _solve(_slicer(C), *C.shape, aw, bw, am, bm, eps=eps, n_iters=n_iters, tol=tol,
                            check_every=check_every, method=method, chunk=chunk, want_plan=False, want_dist=False,
                            device=C.device, info=info)
    return f, g


def _prepare(cost: Tensor, a_mask: Tensor | None, b_mask: Tensor | None, a: Tensor | None, b: Tensor | None,
             eps: float, n_iters: int, tol: float | None, check_every: int, method: str
             ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor]:
    _check_params(eps, n_iters, tol, check_every, method)
    if cost.dim() != 3:
        raise OTInputError(f"cost must be [B, n, m], got shape {tuple(cost.shape)}")
    B, n, m = cost.shape
    dev = cost.device
    C = cost.detach().to(torch.float32).contiguous()
    am = _check_mask(a_mask, (B, n), "a_mask", dev)
    bm = _check_mask(b_mask, (B, m), "b_mask", dev)
    aw = _weights(a, am, (B, n), "a", dev)
    bw = _weights(b, bm, (B, m), "b", dev)
    _validate(aw, bw, a is not None, b is not None, am, bm)
    return C, am, bm, aw, bw


def sinkhorn_log(cost: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None, a: Tensor | None = None,
                 b: Tensor | None = None, eps: float = 0.05, n_iters: int = 50, tol: float | None = None, *,
                 check_every: int = 10, method: Method = "auto", chunk: int | None = None,
                 info: SolveInfo | None = None) -> Tensor:
    """Entropic OT plans of a batch of problems (log-domain Sinkhorn semantics; see the module docstring).

    Args:
        cost: [B, n, m] costs, any float dtype (computed in float32; no gradient flows through the plan).
        a_mask, b_mask: [B, n] / [B, m] bool, True = real point; padded rows/columns get exactly zero mass.
        a, b: [B, n] / [B, m] marginal weights (default uniform over real points); renormalised to sum 1.
        eps: entropic regularisation (in cost units).
        n_iters: iterations (one = a row update then a column update); the maximum when ``tol`` is set.
        tol: stop when the row-marginal violation ``max_b sum_i |T_b 1 - a_b|_i`` (columns are exact after each
            iteration) is below ``tol``; checked every ``check_every`` iterations, per chunk, so that the loop
            does not synchronise with the device at every step.
        method: ``"auto"`` (scaled domain when safe, else log domain), or force ``"scaled"``/``"log"``.
        chunk: problems per chunk (default: cache-sized on CPU, memory-sized on CUDA).
        info: a :class:`SolveInfo` to fill with the iterations and path of every chunk.

    Returns:
        Plans [B, n, m], float32, detached, each summing to 1.
    """
    C, am, bm, aw, bw = _prepare(cost, a_mask, b_mask, a, b, eps, n_iters, tol, check_every, method)
    with torch.no_grad(), torch.autocast(C.device.type, enabled=False):
        plan, _, _, _ = _solve(_slicer(C), *C.shape, aw, bw, am, bm, eps=eps, n_iters=n_iters, tol=tol,
                               check_every=check_every, method=method, chunk=chunk, want_plan=True,
                               want_dist=False, device=C.device, info=info)
    return plan  # type: ignore[return-value]


def transport_cost(cost: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None,
                   a: Tensor | None = None, b: Tensor | None = None, eps: float = 0.05, n_iters: int = 50,
                   tol: float | None = None, *, check_every: int = 10, method: Method = "auto",
                   chunk: int | None = None, info: SolveInfo | None = None) -> Tensor:
    """``<T*_b, C_b>`` [B] float32 for given costs (arguments as in :func:`sinkhorn_log`).

    Without autograd the plan is never materialised (``u^T (K o C) v`` per chunk); when ``cost`` requires grad,
    the result is ``sum(T*.detach() * C)`` so the gradient flows through the cost only.
    """
    C, am, bm, aw, bw = _prepare(cost, a_mask, b_mask, a, b, eps, n_iters, tol, check_every, method)
    with torch.autocast(C.device.type, enabled=False):
        grad = cost.requires_grad and torch.is_grad_enabled()
        with torch.no_grad():
            plan, dist, _, _ = _solve(_slicer(C), *C.shape, aw, bw, am, bm, eps=eps, n_iters=n_iters, tol=tol,
                                      check_every=check_every, method=method, chunk=chunk, want_plan=grad,
                                      want_dist=not grad, device=C.device, info=info)
        if not grad:
            return dist  # type: ignore[return-value]
        Cg = cost.float()
        if am is not None or bm is not None:
            B, n, m = C.shape
            pad = _chunk_pad(B, n, m, am, bm)
            Cg = Cg.masked_fill(pad, 0.0)
        return (plan * Cg).sum((1, 2))


__all__ = ["OTInputError", "SCALED_MAX_RANGE", "SolveInfo", "default_chunk", "sinkhorn_log", "sinkhorn_potentials",
           "transport_cost"]
