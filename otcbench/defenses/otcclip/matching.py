"""OTCCLIP's caption matching: candidates from a caption pool by global cosine, re-ranked by the OT score, the
optional cap on a caption's uses, and otcbench's pair filter (``otcclip+filter``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from otcbench.defenses.otcclip import features
from otcbench.defenses.otcclip.features import FeatureStore, PairStats, PoolFeatures
from otcbench.defenses.otcclip.options import OTCCLIPOptions
from otcbench.models.mode import eval_mode
from otcbench.progress import counted, progress_enabled
from otcbench.train import distributed
from otcbench.train.order import epoch_order

if TYPE_CHECKING:
    from otcbench.defenses.base import DataContext

__all__ = ["CaptionMatching", "cap_caption_uses", "rank_candidates"]


def rank_candidates(
    cos: torch.Tensor,
    ot_sim: torch.Tensor | None,
    alpha: float,
    margin: float = 0.0,
    own_competes: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the best candidate per image; column 0 is the image's own caption.

    Args:
        cos: [c, K] global cosine of each image with its K candidates (column 0: own caption).
        ot_sim: [c, K] 1 − d_OT of the same pairs, or None for global-only matching.
        alpha: weight of the global term in s = α·cos + (1 − α)·ot_sim.
        margin: with ``own_competes``, a candidate replaces the own caption only if it scores more than
            ``margin`` higher.
        own_competes: whether the own caption is a candidate (otcbench's rule). False (the paper's reading,
            RoCLIP's protocol): the best of columns 1..K-1, whatever the own caption scores; an image without
            other candidates (K = 1) keeps its own.

    Returns:
        (choice [c] column index, score s [c, K]). Ties go to the lower column (argmax keeps the first).
    """
    s = cos if ot_sim is None else alpha * cos + (1.0 - alpha) * ot_sim
    if not own_competes:
        if s.shape[1] < 2:
            return torch.zeros(s.shape[0], dtype=torch.long, device=s.device), s
        best = s[:, 1:].argmax(dim=1) + 1
        # a row whose every other candidate is excluded (-inf: a duplicate's caption) keeps its own
        ok = torch.isfinite(s.gather(1, best[:, None]).squeeze(1))
        return torch.where(ok, best, torch.zeros_like(best)), s
    best = s.argmax(dim=1)
    gain = s.gather(1, best[:, None]).squeeze(1) - s[:, 0]
    return torch.where(gain > margin, best, torch.zeros_like(best)), s


def cap_caption_uses(assigned: torch.Tensor, score: torch.Tensor, max_uses: int) -> torch.Tensor:
    """Limit how many images a caption is re-assigned to: per caption, the ``max_uses`` images with the highest
    ``score`` keep it, the others get their own caption back (row i's own caption is row i). Ties keep the lower
    row (stable sorts), so the result is deterministic."""
    n = assigned.numel()
    moved = (assigned != torch.arange(n)).nonzero().flatten()
    if moved.numel() == 0:
        return assigned
    caps, sc = assigned[moved], score[moved]
    order = torch.argsort(-sc, stable=True)
    order = order[torch.argsort(caps[order], stable=True)]  # by caption, best score first within a caption
    _, counts = torch.unique_consecutive(caps[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(order.numel()) - starts  # 0 for the best image of each caption
    out = assigned.clone()
    drop = moved[order[rank >= max_uses]]
    out[drop] = drop
    return out



class CaptionMatching:
    """Mixin of the OTCCLIP defense: the matching of a data-side step, under ``self.options``.

    Needs ``ot_distance`` and ``_text_mask`` (:class:`~otcbench.defenses.otcclip.transport.TokenOT`) and the
    attributes ``keep`` (rows the filter kept) and ``_keys`` (image hash cache).
    """

    options: OTCCLIPOptions
    keep: torch.Tensor | None
    _keys: torch.Tensor | None

    def filter_rows(self, ctx: DataContext, score: torch.Tensor) -> torch.Tensor:
        """Rows kept for training [N] bool.

        Without ``filter_duplicates``: all but the ``filter_fraction`` lowest own-pair scores, row by row. With
        it (the default) the filter decides per image: an image's score is its weakest row's, the
        ``filter_fraction`` lowest-scoring *images* leave with all their rows — the five captions of a COCO
        image, a targeted poison's pixel-identical copies. One image per row gives the row rule. Ties: the
        image (row) that comes first is filtered first, so the split is deterministic."""
        n = score.numel()
        score = score.cpu().float()
        if not self.options.filter_duplicates:
            k = int(self.options.filter_fraction * n)
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.argsort(score, stable=True)[:k]] = False
            return keep
        group = self._image_groups(ctx)
        n_img = int(group.max()) + 1 if n else 0
        k = int(self.options.filter_fraction * n_img)
        if k == 0:
            return torch.ones(n, dtype=torch.bool)
        worst = torch.full((n_img,), float("inf")).scatter_reduce(0, group, score, reduce="amin")
        first = torch.full((n_img,), n, dtype=torch.long).scatter_reduce(0, group, torch.arange(n), reduce="amin")
        by_first = torch.argsort(first)  # images in the order of their first row: the tie-break
        dropped = torch.zeros(n_img, dtype=torch.bool)
        dropped[by_first[torch.argsort(worst[by_first], stable=True)[:k]]] = True
        return ~dropped[group]

    # ---- matching internals --------------------------------------------------------------------

    def _pool_rows(self, ctx: DataContext, epoch: int | None) -> torch.Tensor:
        """Caption rows that compete for every image (besides its own caption)."""
        n = len(ctx.data)
        size = self.options.pool_size
        if size is None or size >= n:
            return torch.arange(n)
        cfg = getattr(ctx, "cfg", None)
        if epoch is None or epoch == 0 or cfg is None:
            # standalone: what a FIFO holds after one pass over the data in stored order
            return torch.arange(n - size, n)
        # the captions trained last in the previous epoch: what a FIFO fed by the loop holds now
        order = epoch_order(n, cfg.seed, epoch - 1)
        order = self._kept(order, n)  # the previous epoch skipped the filtered rows
        bs = min(cfg.batch_size, len(order))
        used = order[: max(1, len(order) // bs) * bs]
        return used[-size:].sort().values

    def pool_features(self, ctx: DataContext, pool: torch.Tensor, store: FeatureStore | None = None) -> PoolFeatures:
        """One text pass over the pool (sharded over ranks, then gathered): L2-normalised globals [P, D], and
        the token features [P, L, D] with masks when they fit in ``token_cache_mb``. With a feature ``store``
        (one process) only the captions it lacks are encoded."""
        if store is not None:
            dev = store.txt_ok.device
            rows = pool.to(dev)
            glob, tokens, mask = store.txt_g[rows], store.txt_t[rows], store.txt_m[rows]
            missing = (~store.txt_ok[rows]).nonzero().flatten()
            with eval_mode(ctx.model), torch.no_grad():
                for part in missing.split(max(1, ctx.embed_batch_size)):
                    with ctx.autocast():
                        g, w, m = features.text_features(ctx.model, ctx.data.tokens[rows[part].cpu()].to(ctx.device))
                    glob[part], tokens[part], mask[part] = F.normalize(g.float(), dim=-1), w.float(), self._text_mask(m)
            return PoolFeatures(rows, glob, tokens, mask, n_rows=len(ctx.data))
        lo, hi = distributed.shard(pool.numel())
        model = ctx.model
        # an empty shard (fewer pool rows than ranks) still needs [0, ...] tensors for the gather: encode one
        mine = pool[lo:hi] if hi > lo else pool[:1]
        g_parts, w_parts, m_parts = [], [], []
        cache: bool | None = None
        with eval_mode(model), torch.no_grad():
            for chunk in mine.split(max(1, ctx.embed_batch_size)):
                with ctx.autocast():
                    g, w, m = features.text_features(model, ctx.data.tokens[chunk].to(ctx.device, non_blocking=True))
                if cache is None:  # same decision on every rank: it depends on the global pool size only
                    cache = pool.numel() * w.shape[1] * w.shape[2] * 4 <= self.options.token_cache_mb * 2**20
                g_parts.append(F.normalize(g.float(), dim=-1))
                if cache:
                    w_parts.append(w.float())
                    m_parts.append(self._text_mask(m))
        cut = slice(None) if hi > lo else slice(0, 0)
        glob = distributed.all_gather_rows(torch.cat(g_parts)[cut])
        if not cache:
            return PoolFeatures(pool.to(ctx.device), glob)
        tokens = distributed.all_gather_rows(torch.cat(w_parts)[cut])
        mask = distributed.all_gather_rows(torch.cat(m_parts)[cut].to(torch.uint8)).bool()  # gloo gathers no bool
        return PoolFeatures(pool.to(ctx.device), glob, tokens, mask, n_rows=len(ctx.data))

    def _candidate_features(
        self, ctx: DataContext, chunk: torch.Tensor, top: torch.Tensor | None, pool: PoolFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption rows [c, K] (column 0: the own caption, then the top-k pool entries) with their normalised
        globals [c, K, D], token features [c, K, L, D] and masks [c, K, L]."""
        device = ctx.device
        own = chunk.to(device)[:, None]
        cand = own if top is None else torch.cat([own, pool.rows[top]], dim=1)
        if pool.tokens is None:
            # re-encode the chunk's distinct candidates: one text forward
            uniq, inv = torch.unique(cand, return_inverse=True)
            with ctx.autocast():
                g, w, m = features.text_features(ctx.model, ctx.data.tokens[uniq.cpu()].to(device, non_blocking=True))
            return cand, F.normalize(g.float(), dim=-1)[inv], w.float()[inv], self._text_mask(m)[inv]
        pos = pool.position[chunk.to(device)]  # own caption's pool index (-1: not in a FIFO pool)
        missing = pos < 0
        at = pos.clamp_min(0)
        g_own, w_own, m_own = pool.globals[at], pool.tokens[at], pool.mask[at]
        if missing.any():
            rows = chunk[missing.cpu()]
            with ctx.autocast():
                g, w, m = features.text_features(ctx.model, ctx.data.tokens[rows].to(device, non_blocking=True))
            g_own[missing], w_own[missing] = F.normalize(g.float(), dim=-1), w.float()
            m_own[missing] = self._text_mask(m)
        if top is None:
            return cand, g_own[:, None], w_own[:, None], m_own[:, None]
        return (cand, torch.cat([g_own[:, None], pool.globals[top]], 1),
                torch.cat([w_own[:, None], pool.tokens[top]], 1), torch.cat([m_own[:, None], pool.mask[top]], 1))

    def _image_groups(self, ctx: DataContext) -> torch.Tensor:
        """[N] int64 image of every row: by the data's image ids, else by pixel identity."""
        groups = ctx.data.image_groups()
        if groups is not None:
            return groups
        _, inverse = torch.unique(self._image_keys(ctx).cpu(), dim=0, return_inverse=True)
        return inverse

    def _image_keys(self, ctx: DataContext) -> torch.Tensor:
        """Keys of every row's image [N, k] (int64; equal keys: one image), computed once.

        With image ids (every loaded dataset: docs/data.md) the key is the image's group [N, 1]. Without them
        (data built in memory) two pixel hashes [N, 2]: exact integer arithmetic — 8-bit pixels times 31-bit
        weights summed over up to 2^24 values cannot overflow, so equal pixels give equal keys; two independent
        keys make a collision of different images a 2^-62 event per pair."""
        n = len(ctx.data)
        if self._keys is None or self._keys.shape[0] != n:
            groups = ctx.data.image_groups()
            if groups is not None:
                self._keys = groups[:, None]
                return self._keys
            weights: torch.Tensor | None = None
            parts = []
            for chunk in torch.arange(n).split(max(1, self.options.match_chunk)):
                flat = ctx.data.image_rows(chunk).reshape(chunk.numel(), -1).to(torch.int64)
                if weights is None:
                    gen = torch.Generator().manual_seed(0)
                    weights = torch.randint(1, 2**31, (flat.shape[1], 2), generator=gen, dtype=torch.int64)
                parts.append(flat @ weights)
            self._keys = torch.cat(parts) if parts else torch.empty(0, 2, dtype=torch.int64)
        return self._keys

    def _image_chunk(self, ctx: DataContext, chunk: torch.Tensor, store: FeatureStore | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image globals [c, D] and tokens [c, n, D] of rows ``chunk``: from the store where it has
        them, else one image-tower forward."""
        device = ctx.device
        if store is None:
            with ctx.autocast():
                g, v = features.image_features(ctx.model, ctx.data.image_rows(chunk).to(device, non_blocking=True))
            return F.normalize(g.float(), dim=-1), v.float()
        at = chunk.to(store.img_ok.device)
        g, v = store.img_g[at], store.img_t[at]
        missing = (~store.img_ok[at]).cpu()
        if missing.any():
            with ctx.autocast():
                images = ctx.data.image_rows(chunk[missing]).to(device, non_blocking=True)
                g2, v2 = features.image_features(ctx.model, images)
            g[missing.to(g.device)], v[missing.to(g.device)] = F.normalize(g2.float(), dim=-1), v2.float()
        return g, v

    @torch.no_grad()
    def score_rows(self, ctx: DataContext, lo: int, hi: int, pool: PoolFeatures,
                   store: FeatureStore | None = None) -> tuple[torch.Tensor, PairStats]:
        """Match image rows [lo, hi): returns (assigned caption row [h], :class:`PairStats` of the rows).

        Batched per chunk: one image-tower forward, top-k by a matrix product with the pool (without the image's
        own caption unless ``own_competes``), the candidates' features from the pool cache (or one text forward
        over the chunk's distinct candidates), one batched OT call.
        """
        o = self.options
        model = ctx.model
        device = ctx.device
        rows = torch.arange(lo, hi)
        k = min(o.top_k, pool.rows.numel())
        out_rows: list[torch.Tensor] = []
        out_stats: list[PairStats] = []
        chunks = rows.split(o.match_chunk)
        shown = progress_enabled(getattr(ctx, "show_progress", False))
        with eval_mode(model), counted(shown, len(chunks), "otcclip matching") as advance:
            for chunk in chunks:
                c = chunk.numel()
                g_img, v = self._image_chunk(ctx, chunk, store)
                sim = g_img @ pool.globals.t()
                excluded = None  # [c, P] pool entries that may not replace the image's caption
                if pool.image_keys is not None:
                    keys = pool.image_keys
                    excluded = (keys[chunk.to(keys.device)][:, None, :] == keys[pool.rows][None, :, :]).all(-1)
                if not o.own_competes:  # the own caption is column 0 for the statistics, never a pool candidate
                    own = pool.rows[None, :] == chunk.to(pool.rows.device)[:, None]
                    excluded = own if excluded is None else excluded | own
                if excluded is not None:
                    sim = sim.masked_fill(excluded, float("-inf"))
                top = sim.topk(k, dim=1) if k else None
                dup = None
                if top is not None:
                    dup, top = torch.isinf(top.values), top.indices  # dup: fewer than k allowed entries
                cand, g_txt, w, w_mask = self._candidate_features(ctx, chunk, top, pool)
                cos = (g_img[:, None, :] * g_txt).sum(-1)  # [c, K]
                # the own pair's OT score is always computed (detection reports it); all candidates' only
                # when OT decides the matching
                cols = cand.shape[1] if o.score == "ot" else 1
                vv = v[:, None].expand(c, cols, *v.shape[1:]).reshape(c * cols, *v.shape[1:])
                gg = g_img[:, None].expand(c, cols, -1).reshape(c * cols, -1)
                v_mask = torch.ones(vv.shape[:2], dtype=torch.bool, device=device)
                d = self.ot_distance(vv, w[:, :cols].flatten(0, 1), v_mask, w_mask[:, :cols].flatten(0, 1), gg,
                                     g_txt[:, :cols].flatten(0, 1)).float().view(c, cols)
                ot_sim = 1.0 - d
                if dup is not None and bool(dup.any()):  # an excluded entry never wins
                    cos, ot_sim = cos.clone(), ot_sim.clone()
                    cos[:, 1:][dup] = float("-inf")
                    if ot_sim.shape[1] > 1:
                        ot_sim[:, 1:][dup] = float("-inf")
                choice, s = rank_candidates(cos, ot_sim if o.score == "ot" else None, o.alpha, o.margin,
                                            o.own_competes)
                best = self._chosen_rows(ctx, chunk, cand, choice)
                choice_g, _ = rank_candidates(cos, None, 1.0, o.margin, o.own_competes)
                best_g = self._chosen_rows(ctx, chunk, cand, choice_g)
                best_ot = best if o.score == "ot" else torch.full_like(best, -1)  # OT of the candidates not computed
                rival = s if o.own_competes or s.shape[1] < 2 else s[:, 1:]
                out_stats.append(PairStats(match=s[:, 0], ot=ot_sim[:, 0], cos=cos[:, 0],
                                           best=rival.max(dim=1).values,
                                           n_tokens=torch.full((c,), v.shape[1], dtype=torch.long, device=device),
                                           choice_global=best_g, choice_ot=best_ot))
                out_rows.append(best)
                advance()
        if not out_rows:
            return torch.empty(0, dtype=torch.long, device=device), PairStats.cat([], device)
        return torch.cat(out_rows), PairStats.cat(out_stats, device)

    @staticmethod
    def _chosen_rows(ctx: DataContext, chunk: torch.Tensor, cand: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Caption rows of the chosen columns; a different row with the very same caption text is not a
        replacement (the image keeps its own row)."""
        best = cand.gather(1, choice[:, None]).squeeze(1)
        same_text = (ctx.data.tokens[best.cpu()] == ctx.data.tokens[chunk]).all(dim=1).to(best.device)
        return torch.where(same_text, cand[:, 0], best)

    def _kept(self, order: torch.Tensor, n: int) -> torch.Tensor:
        """``order`` without the rows the last matching filtered (all of it when nothing is filtered)."""
        if self.keep is None or self.keep.numel() != n:
            return order
        return order[self.keep[order]]

