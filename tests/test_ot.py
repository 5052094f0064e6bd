"""Tests for otcbench.ot: batched entropic OT against POT, masks, marginals, tolerance, precision, gradients."""

from __future__ import annotations

import math

import numpy as np
import ot
import ot.batch
import pytest
import torch
import torch.nn.functional as F

from otcbench.errors import UserError
from otcbench.ot import (
    SCALED_MAX_RANGE,
    OTInputError,
    SolveInfo,
    ot_distance,
    ot_distance_matrix,
    sinkhorn_log,
    sinkhorn_potentials,
    token_weights,
    transport_cost,
)


def cos_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(-1, -2)


def feats(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pot_batch(C: torch.Tensor, eps: float, n_iters: int, a=None, b=None) -> torch.Tensor:
    """POT's batch log-Sinkhorn with exactly ``n_iters`` iterations (tol=0 never stops early)."""
    res = ot.batch.solve_batch(M=C, reg=eps, a=a, b=b, max_iter=n_iters, tol=0.0, method="log_sinkhorn",
                               grad="detach")
    return res.plan


# --------------------------------------------------------------------------------------------------
# parity with POT


@pytest.mark.parametrize("method", ["auto", "log", "scaled"])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_matches_pot_solve_batch_fixed_iterations(method: str, eps: float) -> None:
    C = cos_cost(feats(12, 7, 16, seed=1), feats(12, 9, 16, seed=2))
    ref = pot_batch(C, eps, 30)
    plan = sinkhorn_log(C, eps=eps, n_iters=30, method=method)
    assert plan.dtype == torch.float32 and plan.shape == (12, 7, 9)
    assert (plan - ref).abs().max() < 1e-5
    # Same iteration order as POT's batch solver: after a full iteration the column marginals are exact.
    assert torch.allclose(plan.sum(1), torch.full((12, 9), 1 / 9), atol=1e-6)


def test_small_problems_padded_for_blas_still_match_pot() -> None:
    """16x24 problems get one zero-mass column so torch's CPU bmm uses BLAS (see _blas_pad_cols)."""
    from otcbench.ot.sinkhorn import _blas_pad_cols

    cpu = torch.device("cpu")
    assert _blas_pad_cols(16, 24, cpu) == 1 and _blas_pad_cols(6, 9, cpu) == 0 and _blas_pad_cols(49, 77, cpu) == 0
    C = cos_cost(feats(10, 16, 16, seed=44), feats(10, 24, 16, seed=45))
    ref = pot_batch(C, 0.05, 50)
    plan = sinkhorn_log(C, eps=0.05, n_iters=50)
    assert plan.shape == (10, 16, 24) and (plan - ref).abs().max() < 1e-5
    mask = torch.arange(24)[None] < torch.tensor([24, 20, 3, 1, 24, 7, 9, 24, 12, 5])[:, None]
    masked = sinkhorn_log(C, b_mask=mask, eps=0.05, n_iters=50)
    for k in (1, 2, 3):
        sub = sinkhorn_log(C[k:k + 1, :, :int(mask[k].sum())], eps=0.05, n_iters=50, method="log")[0]
        assert (masked[k, :, :sub.shape[1]] - sub).abs().max() < 1e-6
    tol_info = SolveInfo()
    converged = sinkhorn_log(C, eps=0.05, n_iters=500, tol=1e-5, info=tol_info)
    assert tol_info.iterations[0] < 500 and (converged.sum(2) - 1 / 16).abs().sum(1).max() < 1e-5


def test_uses_log_path_when_kernel_would_underflow_and_still_matches_pot() -> None:
    C = torch.rand(6, 5, 8, generator=torch.Generator().manual_seed(3)) * 2
    eps = 0.01  # range / eps up to 200 > SCALED_MAX_RANGE
    info = SolveInfo()
    plan = sinkhorn_log(C, eps=eps, n_iters=40, info=info)
    assert info.paths == ["log"]
    assert (plan - pot_batch(C.double(), eps, 40)).abs().max() < 1e-5
    info = SolveInfo()
    sinkhorn_log(C, eps=1.0, n_iters=5, info=info)
    assert info.paths == ["scaled"] and info.iterations == [5]


def test_converged_plan_matches_pot_per_pair_solver() -> None:
    """Run both to convergence: the order of updates (POT's per-pair solver starts with v) no longer matters."""
    C = cos_cost(feats(3, 6, 8, seed=4), feats(3, 10, 8, seed=5))
    plan = sinkhorn_log(C, eps=0.1, n_iters=3000)
    for k in range(3):
        M = C[k].double().numpy()
        ref = ot.sinkhorn(np.full(6, 1 / 6), np.full(10, 1 / 10), M, 0.1, method="sinkhorn_log",
                          numItermax=20000, stopThr=1e-13)
        assert np.abs(plan[k].numpy() - ref).max() < 1e-5
        res = ot.solve(torch.from_numpy(M), reg=0.1, method="sinkhorn_log", max_iter=20000, tol=1e-13)
        assert (plan[k].double() - res.plan).abs().max() < 1e-5


def test_given_marginals_are_renormalised_and_match_pot() -> None:
    g = torch.Generator().manual_seed(6)
    C = torch.rand(5, 6, 7, generator=g)
    a = torch.rand(5, 6, generator=g) + 0.1
    b = torch.rand(5, 7, generator=g) + 0.1
    an, bn = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    for method in ("scaled", "log"):
        plan = sinkhorn_log(C, a=3 * a, b=b / 7, eps=0.05, n_iters=200, method=method)  # unnormalised on purpose
        ref = pot_batch(C.double(), 0.05, 200, a=an.double(), b=bn.double())
        assert (plan.double() - ref).abs().max() < 1e-5
        assert torch.allclose(plan.sum(1), bn, atol=1e-6)
        assert torch.allclose(plan.sum(2), an, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# masks, tolerance, precision


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_padded_problem_equals_unpadded_problem(method: str) -> None:
    g = torch.Generator().manual_seed(7)
    B, n, m = 4, 9, 11
    C = torch.rand(B, n, m, generator=g) * 1.5
    rows, cols = [9, 5, 1, 7], [11, 3, 8, 1]
    a_mask = torch.arange(n)[None] < torch.tensor(rows)[:, None]
    b_mask = torch.arange(m)[None] < torch.tensor(cols)[:, None]
    garbage = C.clone()
    garbage[~(a_mask[:, :, None] & b_mask[:, None, :])] = float("nan")  # padding must never be read
    plan = sinkhorn_log(garbage, a_mask, b_mask, eps=0.05, n_iters=60, method=method)
    assert torch.isfinite(plan).all()
    for k in range(B):
        sub = sinkhorn_log(C[k:k + 1, :rows[k], :cols[k]], eps=0.05, n_iters=60, method=method)[0]
        assert (plan[k, :rows[k], :cols[k]] - sub).abs().max() < 1e-6
        # Exactly zero mass outside the real block.
        assert plan[k, rows[k]:].abs().sum() == 0 and plan[k, :, cols[k]:].abs().sum() == 0
        assert abs(plan[k].sum().item() - 1) < 1e-5


def test_masks_with_given_weights_ignore_weights_on_padding() -> None:
    g = torch.Generator().manual_seed(8)
    C = torch.rand(2, 5, 6, generator=g)
    a = torch.rand(2, 5, generator=g) + 0.5
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    plan = sinkhorn_log(C, a_mask=mask, a=a, eps=0.1, n_iters=500)
    ref = sinkhorn_log(C[:1, :3], a=a[:1, :3], eps=0.1, n_iters=500)
    assert (plan[0, :3] - ref[0]).abs().max() < 1e-6 and plan[0, 3:].sum() == 0
    assert torch.allclose(plan[0].sum(1)[:3], a[0, :3] / a[0, :3].sum(), atol=1e-5)


@pytest.mark.parametrize("method", ["scaled", "log"])
def test_tolerance_stops_early_with_small_marginal_violation(method: str) -> None:
    C = cos_cost(feats(40, 8, 16, seed=9), feats(40, 12, 16, seed=10))
    info = SolveInfo()
    plan = sinkhorn_log(C, eps=0.1, n_iters=1000, tol=1e-4, method=method, info=info, check_every=5)
    (done,) = info.iterations
    assert 0 < done < 1000 and done % 5 == 0
    violation = (plan.sum(2) - 1 / 8).abs().sum(1).max().item()
    assert violation < 1e-4
    assert torch.allclose(plan.sum(1), torch.full((40, 12), 1 / 12), atol=1e-6)
    # It stopped at the first check below tol: the previous check was still above it.
    fixed = sinkhorn_log(C, eps=0.1, n_iters=done - 5, method=method)
    assert (fixed.sum(2) - 1 / 8).abs().sum(1).max().item() >= 1e-4
    # Without tol the same count runs exactly.
    assert torch.allclose(sinkhorn_log(C, eps=0.1, n_iters=done, method=method), plan, atol=1e-7)


def test_tolerance_is_per_chunk() -> None:
    easy = torch.zeros(4, 6, 6)  # uniform cost: converged after one iteration
    hard = cos_cost(feats(4, 6, 8, seed=11), feats(4, 6, 8, seed=12)) * 3
    info = SolveInfo()
    sinkhorn_log(torch.cat([easy, hard]), eps=0.05, n_iters=400, tol=1e-5, chunk=4, info=info)
    assert info.iterations[0] < info.iterations[1]


def test_bf16_and_fp16_costs_are_solved_in_float32() -> None:
    C = cos_cost(feats(6, 7, 16, seed=13), feats(6, 5, 16, seed=14))
    for dtype in (torch.bfloat16, torch.float16):
        low = C.to(dtype)
        plan = sinkhorn_log(low, eps=0.05, n_iters=50)
        assert plan.dtype == torch.float32
        assert torch.equal(plan, sinkhorn_log(low.float(), eps=0.05, n_iters=50))
        assert (plan - pot_batch(low.double(), 0.05, 50)).abs().max() < 1e-5


def test_scaled_and_log_paths_agree_up_to_the_range_threshold() -> None:
    """Adversarial ranges: one far-away column and per-row ranges right at SCALED_MAX_RANGE * eps."""
    g = torch.Generator().manual_seed(15)
    eps = 0.02
    C = torch.rand(8, 10, 12, generator=g) * SCALED_MAX_RANGE * eps
    C[:, :, 0] = SCALED_MAX_RANGE * eps  # a column far from every row
    C[:, 0, :] = 0.3
    info = SolveInfo()
    auto = sinkhorn_log(C, eps=eps, n_iters=300, info=info)
    assert info.paths == ["scaled"]
    log = sinkhorn_log(C, eps=eps, n_iters=300, method="log")
    assert torch.isfinite(auto).all()
    assert (auto - log).abs().max() < 1e-6
    info = SolveInfo()
    sinkhorn_log(C * 1.01, eps=eps, n_iters=3, info=info)
    assert info.paths == ["log"]


def test_potentials_reconstruct_the_plan() -> None:
    C = cos_cost(feats(5, 6, 8, seed=16), feats(5, 7, 8, seed=17))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2, 4:] = False
    for method in ("scaled", "log"):
        f, g = sinkhorn_potentials(C, b_mask=mask, eps=0.05, n_iters=50, method=method)
        plan = sinkhorn_log(C, b_mask=mask, eps=0.05, n_iters=50, method=method)
        assert torch.isneginf(g[2, 4:]).all()
        assert torch.allclose(torch.exp(f[:, :, None] + g[:, None, :] - C / 0.05), plan, atol=1e-6)


def test_chunking_does_not_change_results() -> None:
    C = cos_cost(feats(23, 5, 8, seed=18), feats(23, 6, 8, seed=19))
    whole = sinkhorn_log(C, eps=0.05, n_iters=50, chunk=1000)
    for chunk in (1, 4, 7):
        assert torch.allclose(sinkhorn_log(C, eps=0.05, n_iters=50, chunk=chunk), whole, atol=1e-7)


def test_transport_cost_without_and_with_grad() -> None:
    C = cos_cost(feats(4, 5, 8, seed=20), feats(4, 6, 8, seed=21))
    plan = sinkhorn_log(C, eps=0.05, n_iters=50)
    ref = (plan * C).sum((1, 2))
    assert torch.allclose(transport_cost(C, eps=0.05, n_iters=50), ref, atol=1e-6)
    Cg = C.clone().requires_grad_(True)
    d = transport_cost(Cg, eps=0.05, n_iters=50)
    d.sum().backward()
    assert torch.allclose(d, ref, atol=1e-6) and torch.allclose(Cg.grad, plan)


def test_empty_batch() -> None:
    assert sinkhorn_log(torch.zeros(0, 3, 4)).shape == (0, 3, 4)
    assert ot_distance(torch.zeros(0, 3, 8), torch.zeros(0, 4, 8)).shape == (0,)


# --------------------------------------------------------------------------------------------------
# distances and gradients


def reference_distance(x, y, x_mask=None, y_mask=None, a=None, b=None, eps=0.05, n_iters=50):
    """<T.detach(), C> with plain autograd: the semantics ot_distance must reproduce."""
    C = cos_cost(x, y)
    T = sinkhorn_log(C.detach(), x_mask, y_mask, a, b, eps=eps, n_iters=n_iters)
    if x_mask is not None or y_mask is not None:
        xm = x_mask if x_mask is not None else torch.ones(C.shape[:2], dtype=torch.bool)
        ym = y_mask if y_mask is not None else torch.ones(C.shape[0], C.shape[2], dtype=torch.bool)
        C = C.masked_fill(~(xm[:, :, None] & ym[:, None, :]), 0.0)
    return (T * C).sum((1, 2))


@pytest.mark.parametrize("masked", [False, True])
def test_ot_distance_value_and_gradient_through_cost_only(masked: bool) -> None:
    x = feats(6, 7, 16, seed=22).requires_grad_(True)
    y = feats(6, 9, 16, seed=23).requires_grad_(True)
    xm = ym = None
    if masked:
        ym = torch.arange(9)[None] < torch.tensor([9, 3, 5, 1, 8, 6])[:, None]
        xm = torch.arange(7)[None] < torch.tensor([7, 7, 2, 5, 1, 4])[:, None]
    d = ot_distance(x, y, xm, ym, eps=0.05, n_iters=50)
    w = torch.linspace(-1, 2, 6)
    gx, gy = torch.autograd.grad((d * w).sum(), (x, y))
    x2, y2 = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    ref = reference_distance(x2, y2, xm, ym)
    rx, ry = torch.autograd.grad((ref * w).sum(), (x2, y2))
    assert torch.allclose(d, ref, atol=1e-6)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gy, ry, atol=1e-5)
    if masked:
        assert gy[~ym].abs().sum() == 0 and gx[~xm].abs().sum() == 0
    # A gradient through the plan would differ: check this one is not zero and not the full derivative.
    assert gx.abs().sum() > 0


def test_ot_distance_with_given_marginals_and_small_chunks() -> None:
    x, y = feats(9, 5, 8, seed=24), feats(9, 6, 8, seed=25)
    a = torch.rand(9, 5, generator=torch.Generator().manual_seed(26)) + 0.1
    ref = reference_distance(x, y, a=a)
    assert torch.allclose(ot_distance(x, y, a=a, chunk=2), ref, atol=1e-6)
    assert torch.allclose(ot_distance(x, y, a=a, method="log"), ref, atol=1e-6)


def test_ot_distance_identical_sets_is_small_and_orthogonal_sets_is_one() -> None:
    x = F.normalize(feats(1, 4, 8, seed=27), dim=-1)
    assert ot_distance(x, x, eps=0.01, n_iters=500).item() < 0.02
    e = torch.eye(8)
    assert abs(ot_distance(e[None, :4], e[None, 4:]).item() - 1) < 1e-6


def test_ot_distance_bf16_features() -> None:
    x = feats(5, 6, 16, seed=28).bfloat16().requires_grad_(True)
    y = feats(5, 8, 16, seed=29).bfloat16().requires_grad_(True)
    d = ot_distance(x, y)
    assert d.dtype == torch.float32
    assert torch.allclose(d, ot_distance(x.detach().float(), y.detach().float()), atol=1e-6)
    d.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_ot_distance_under_autocast_stays_float32() -> None:
    x, y = feats(4, 6, 16, seed=30), feats(4, 7, 16, seed=31)
    plain = ot_distance(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ot_distance(x, y)
        D = ot_distance_matrix(x, y)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert D.dtype == torch.float32 and torch.allclose(D.diagonal(), plain, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 1, 3, 5])
def test_ot_distance_matrix_equals_loop_of_ot_distance(chunk: int | None) -> None:
    P, Q, n, m, d = 5, 4, 6, 7, 16
    x = feats(P, n, d, seed=32).requires_grad_(True)
    y = feats(Q, m, d, seed=33).requires_grad_(True)
    xm = torch.arange(n)[None] < torch.tensor([6, 2, 4, 6, 1])[:, None]
    ym = torch.arange(m)[None] < torch.tensor([7, 3, 1, 5])[:, None]
    a = torch.rand(P, n, generator=torch.Generator().manual_seed(34)) + 0.2
    D = ot_distance_matrix(x, y, xm, ym, a=a, chunk=chunk, eps=0.05, n_iters=40)
    assert D.shape == (P, Q) and D.dtype == torch.float32
    W = torch.randn(P, Q, generator=torch.Generator().manual_seed(35))
    gx, gy = torch.autograd.grad((D * W).sum(), (x, y))

    x2, y2 = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    pi, qi = torch.meshgrid(torch.arange(P), torch.arange(Q), indexing="ij")
    pi, qi = pi.reshape(-1), qi.reshape(-1)
    loop = ot_distance(x2[pi], y2[qi], xm[pi], ym[qi], a=a[pi], eps=0.05, n_iters=40).view(P, Q)
    rx, ry = torch.autograd.grad((loop * W).sum(), (x2, y2))
    assert torch.allclose(D, loop, atol=1e-6)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gy, ry, atol=1e-5)


def test_ot_distance_matrix_tolerance_mode() -> None:
    x, y = feats(4, 5, 8, seed=36), feats(3, 6, 8, seed=37)
    D = ot_distance_matrix(x, y, eps=0.1, n_iters=2000, tol=1e-6)
    ref = ot_distance_matrix(x, y, eps=0.1, n_iters=2000)
    assert torch.allclose(D, ref, atol=1e-5)


def test_token_weights() -> None:
    g = torch.Generator().manual_seed(38)
    tokens = torch.randn(3, 5, 8, generator=g)
    glob = tokens[:, 1] * 4  # token 1 is aligned with the global feature
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [False, True, False, False, False]])
    w = token_weights(tokens, glob, mask)
    assert w.shape == (3, 5) and w.dtype == torch.float32 and not w.requires_grad
    assert torch.allclose(w.sum(1), torch.ones(3)) and (w[~mask] == 0).all()
    assert (w.argmax(1) == 1).all()
    assert w[2, 1] == 1
    sim = F.cosine_similarity(tokens[0], glob[0][None], dim=-1)
    assert torch.allclose(w[0], torch.softmax(sim / 0.1, 0), atol=1e-6)
    # As marginals: the aligned token carries more mass.
    plan = sinkhorn_log(torch.rand(3, 5, 4, generator=g), a_mask=mask, a=w)
    assert torch.allclose(plan.sum(2), w, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_one_clear_error() -> None:
    C = torch.rand(2, 3, 4)
    cases = [
        (lambda: sinkhorn_log(C[0]), "cost must be [B, n, m]"),
        (lambda: sinkhorn_log(C, a_mask=torch.ones(2, 4, dtype=torch.bool)), "a_mask has shape"),
        (lambda: sinkhorn_log(C, b=torch.ones(2, 3)), "b has shape"),
        (lambda: sinkhorn_log(C, eps=0.0), "eps must be a positive"),
        (lambda: sinkhorn_log(C, n_iters=0), "n_iters must be"),
        (lambda: sinkhorn_log(C, tol=-1.0), "tol must be positive"),
        (lambda: sinkhorn_log(C, method="fast"), "method must be"),
        (lambda: sinkhorn_log(C, b_mask=torch.tensor([[True] * 4, [False] * 4])), "at least one real point"),
        (lambda: sinkhorn_log(C, a=torch.tensor([[1.0, -1.0, 1.0]] * 2)), "non-negative"),
        (lambda: ot_distance(torch.rand(2, 3, 8), torch.rand(3, 4, 8)), "same batch size"),
        (lambda: ot_distance_matrix(torch.rand(2, 3, 8), torch.rand(3, 4, 7)), "same feature dim"),
        (lambda: ot_distance(torch.rand(2, 8), torch.rand(2, 8)), "must be a [batch, tokens, dim]"),
        (lambda: token_weights(torch.rand(2, 3, 8), torch.rand(2, 4)), "global_feat"),
    ]
    for fn, fragment in cases:
        with pytest.raises(OTInputError) as err:
            fn()
        assert fragment in str(err.value), (fragment, str(err.value))
        assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
        assert "\n" not in str(err.value)


def test_deterministic() -> None:
    x, y = feats(8, 6, 16, seed=39), feats(8, 7, 16, seed=40)
    assert torch.equal(ot_distance(x, y), ot_distance(x, y))
    assert math.isfinite(float(ot_distance_matrix(x, y).sum()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x, y = feats(64, 49, 64, seed=41), feats(64, 20, 64, seed=42)
    ym = torch.arange(20)[None] < torch.randint(1, 21, (64, 1), generator=torch.Generator().manual_seed(43))
    cpu = ot_distance(x, y, None, ym)
    gpu = ot_distance(x.cuda(), y.cuda(), None, ym.cuda())
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    D = ot_distance_matrix(x[:8].cuda(), y[:8].cuda(), None, ym[:8].cuda())
    assert torch.allclose(D.cpu(), ot_distance_matrix(x[:8], y[:8], None, ym[:8]), atol=1e-5)
