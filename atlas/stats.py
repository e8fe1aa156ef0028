"""
Mergeable streaming statistics for feature mining.

Every statistic is updated batch by batch in memory that does not grow with the corpus, and two
instances built on disjoint parts of a corpus `merge` into what one instance would have built on
the whole: integer counts, maxima, top-k sets, samples and histograms exactly; float sums up to
summation order. So a run can be checkpointed (`state_dict` / `load_state_dict`), resumed, or
sharded across processes and merged.

Inputs are sparse: (group, value, key) triplets of the non-zero activations of a batch, where
`group` is usually the latent index and `key` a 63-bit position id (doc_id << 32 | token_pos)
that orders the corpus and identifies a token.

- `FeatureMoments`: per-latent count, sum (float64), max and min of the non-zero activations.
- `TopKSlots`: per group, the k entries with the largest score, ties to the smallest key, with
  fixed-shape payloads (token windows...) fetched only for entries that get in. With score =
  activation it is the exact top-k; with score = -priority(key) it is a bottom-k *priority
  sample*: a uniform random sample without replacement whose randomness is a hash of the key,
  so it does not depend on batch order, resumes exactly and merges exactly.
- `ActivationHistogram`: per latent, `n_bins` equal bins over [0, 2^e], e the smallest integer
  with max ≤ 2^e. When a larger value arrives, e grows and bins merge in groups of 2^Δe, which
  is exact because every edge is a multiple of a power of two (bins never split).
- `CoactivationCounts`: d×d counts of tokens where two latents are both non-zero, from the pairs
  of each token's active set (scatter-add), or a 0/1 GEMM when that is cheaper (dense codes).
- `SparseCounter`: exact count and sum per (row, col) key for keys that occur, e.g. (token,
  latent) for the reverse index; batches are coalesced, then folded into a sorted table.
- `TokenCounts`: corpus unigram counts.
"""

from __future__ import annotations

from typing import Callable

import torch

EMPTY_KEY = -1
KEY_POS_BITS = 32  # key = doc_id << 32 | token_pos


def position_keys(doc_id: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
    return (doc_id.long() << KEY_POS_BITS) | token_pos.long()


def split_keys(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_id, token_pos) of position keys."""
    return key >> KEY_POS_BITS, key & ((1 << KEY_POS_BITS) - 1)


# ----------------------------------------------------------------------------- hashing

def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (two's-complement wrapping arithmetic)."""
    z = x.long() + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def priorities(key: torch.Tensor, group: torch.Tensor | int, seed: int) -> torch.Tensor:
    """A uniform [0, 1) float64 per (key, group, seed), the same on every device and run."""
    salt = splitmix64(torch.as_tensor(group, device=key.device).long() * _MIX1 + seed)
    return _shr(splitmix64(key.long() ^ salt), 11).double() * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- moments

class FeatureMoments:
    """Count, sum, max and min of the non-zero activations of each latent."""

    def __init__(self, n: int, device="cpu"):
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, dtype=torch.float32, device=device)
        self.min = torch.full((n,), float("inf"), dtype=torch.float32, device=device)

    def update(self, group: torch.Tensor, value: torch.Tensor) -> None:
        self.count.index_add_(0, group, torch.ones_like(group))
        self.sum.index_add_(0, group, value.double())
        self.max.scatter_reduce_(0, group, value.float(), "amax")
        self.min.scatter_reduce_(0, group, value.float(), "amin")

    def merge(self, other: "FeatureMoments") -> None:
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).cpu() for k in ("count", "sum", "max", "min")}

    def load_state_dict(self, state: dict) -> None:
        for k in ("count", "sum", "max", "min"):
            getattr(self, k).copy_(state[k])


# ----------------------------------------------------------------------------- top-k slots

class TopKSlots:
    """
    Per group, the k entries with the largest (score, -key), kept in rank order (slot 0 best).

    `payload` declares per-entry tensors as {name: (shape, dtype, fill)}; an update's `fetch(sel)`
    returns them for the candidate indices `sel` that get in (so windows are gathered only for
    the few entries that change the state, never for every candidate).
    """

    def __init__(self, n_groups: int, k: int, payload: dict | None = None, device="cpu"):
        self.n_groups, self.k = n_groups, k
        self.score = torch.full((n_groups, k), float("-inf"), dtype=torch.float64, device=device)
        self.key = torch.full((n_groups, k), EMPTY_KEY, dtype=torch.int64, device=device)
        self.value = torch.zeros((n_groups, k), dtype=torch.float32, device=device)
        self.spec = dict(payload or {})
        self.payload = {name: torch.full((n_groups, k, *shape), fill, dtype=dtype, device=device)
                        for name, (shape, dtype, fill) in self.spec.items()}

    @property
    def filled(self) -> torch.Tensor:
        return self.key != EMPTY_KEY

    def update(self, group: torch.Tensor, score: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, fetch: Callable[[torch.Tensor], dict] | None = None) -> None:
        # only candidates at least as good as the group's current k-th entry can get in
        maybe = score >= self.score[group, -1]
        if not bool(maybe.any()):
            return
        sel = maybe.nonzero().squeeze(1)

        def fetch_sel(i):
            return fetch(sel[i]) if fetch is not None else {}

        self._merge_in(group[sel], score[sel].double(), key[sel], value[sel].float(), fetch_sel)

    def merge(self, other: "TopKSlots") -> None:
        g, s = other.filled.nonzero(as_tuple=True)

        def fetch(i):
            return {name: other.payload[name][g[i], s[i]] for name in self.spec}

        self._merge_in(g, other.score[g, s], other.key[g, s], other.value[g, s], fetch)

    def _merge_in(self, group, score, key, value, fetch) -> None:
        groups = torch.unique(group)
        old_g, old_s = self.filled[groups].nonzero(as_tuple=True)
        old_g = groups[old_g]
        n_old = old_g.numel()
        all_group = torch.cat([old_g, group])
        all_score = torch.cat([self.score[old_g, old_s], score])
        all_key = torch.cat([self.key[old_g, old_s], key])
        all_value = torch.cat([self.value[old_g, old_s], value])
        order = lexsort_desc(all_group, all_score, all_key)
        g_sorted = all_group[order]
        rank = ranks_within(g_sorted, self.n_groups)
        keep = rank < self.k
        src, g_new, r_new = order[keep], g_sorted[keep], rank[keep]
        from_old = src < n_old
        old_payload = {name: t[old_g[src[from_old]], old_s[src[from_old]]]
                       for name, t in self.payload.items()}
        new_payload = fetch(src[~from_old] - n_old) if self.spec else {}
        # rewrite the touched groups: clear, then place the survivors at their ranks
        self.score[groups] = float("-inf")
        self.key[groups] = EMPTY_KEY
        self.value[groups] = 0.0
        for name, (shape, dtype, fill) in self.spec.items():
            self.payload[name][groups] = fill
        self.score[g_new, r_new] = all_score[src]
        self.key[g_new, r_new] = all_key[src]
        self.value[g_new, r_new] = all_value[src]
        for name in self.spec:
            t = self.payload[name]
            t[g_new[from_old], r_new[from_old]] = old_payload[name]
            t[g_new[~from_old], r_new[~from_old]] = new_payload[name].to(t.dtype)

    def state_dict(self) -> dict:
        d = {"score": self.score.cpu(), "key": self.key.cpu(), "value": self.value.cpu()}
        d.update({f"payload.{n}": t.cpu() for n, t in self.payload.items()})
        return d

    def load_state_dict(self, state: dict) -> None:
        self.score.copy_(state["score"])
        self.key.copy_(state["key"])
        self.value.copy_(state["value"])
        for n, t in self.payload.items():
            t.copy_(state[f"payload.{n}"])


def lexsort_desc(group: torch.Tensor, score: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Order by group ascending, then score descending, then key ascending (three stable sorts)."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(score[order], descending=True, stable=True)]
    return order[torch.argsort(group[order], stable=True)]


def ranks_within(sorted_groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """0-based position of each element within its run of equal groups (input grouped)."""
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups]


# ----------------------------------------------------------------------------- histogram

class ActivationHistogram:
    """
    Per latent, `n_bins` (a power of two) equal bins over [0, 2^exp] holding every non-zero
    activation; bin i is [i·w, (i+1)·w) with w = 2^exp / n_bins, the last bin also holds 2^exp.
    """

    NO_DATA = -(1 << 20)

    def __init__(self, n: int, n_bins: int = 64, device="cpu"):
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.log2_bins = n_bins.bit_length() - 1
        self.counts = torch.zeros((n, n_bins), dtype=torch.int64, device=device)
        self.exp = torch.full((n,), self.NO_DATA, dtype=torch.int64, device=device)

    def update(self, group: torch.Tensor, value: torch.Tensor) -> None:
        value = value.float()
        mant, e = torch.frexp(value)  # value = mant·2^e, mant in [0.5, 1)
        e = e.long() - (mant == 0.5).long()  # smallest e with value <= 2^e
        need = self.exp.clone().scatter_reduce_(0, group, e, "amax")
        self._grow(need)
        b = torch.ldexp(value, (self.log2_bins - self.exp[group]).float()).long().clamp_(max=self.n_bins - 1)
        self.counts.view(-1).index_add_(0, group * self.n_bins + b, torch.ones_like(b))

    def _grow(self, new_exp: torch.Tensor) -> None:
        self.counts = _rebinned(self.counts, self.exp, new_exp, self.NO_DATA)
        self.exp = torch.maximum(self.exp, new_exp)

    def merge(self, other: "ActivationHistogram") -> None:
        exp = torch.maximum(self.exp, other.exp)
        self.counts = (_rebinned(self.counts, self.exp, exp, self.NO_DATA)
                       + _rebinned(other.counts, other.exp, exp, self.NO_DATA))
        self.exp = exp

    def edges_counts(self, i: int) -> tuple[list[float], list[int]] | None:
        """Latent i's histogram, trimmed after the last non-empty bin; None if it never fired."""
        if int(self.exp[i]) == self.NO_DATA:
            return None
        counts = self.counts[i].tolist()
        last = max(j for j, c in enumerate(counts) if c) + 1
        width = 2.0 ** int(self.exp[i]) / self.n_bins
        return [j * width for j in range(last + 1)], counts[:last]

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu(), "exp": self.exp.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])
        self.exp.copy_(state["exp"])


def _rebinned(counts: torch.Tensor, exp: torch.Tensor, new_exp: torch.Tensor,
              no_data: int) -> torch.Tensor:
    """counts over [0, 2^exp] re-expressed over [0, 2^new_exp] (new_exp >= exp): bin i -> i >> Δ."""
    rows = (new_exp > exp).nonzero().squeeze(1)
    if rows.numel() == 0:
        return counts
    counts = counts.clone()
    old = counts[rows]
    shift = (new_exp[rows] - exp[rows]).clamp(max=62)
    target = torch.arange(counts.shape[1], device=counts.device)[None, :] >> shift[:, None]
    merged = torch.zeros_like(old).scatter_add_(1, target, old)
    had_data = (exp[rows] != no_data)[:, None]
    counts[rows] = torch.where(had_data, merged, torch.zeros_like(merged))
    return counts


# ----------------------------------------------------------------------------- coactivation

class CoactivationCounts:
    """counts[i, j] = tokens on which latents i and j are both active (diagonal: i's count)."""

    PAIR_CHUNK = 1 << 22  # pair indices materialised at once

    def __init__(self, n: int, device="cpu"):
        self.n = n
        self.counts = torch.zeros((n, n), dtype=torch.int32, device=device)
        self.tokens = 0

    def update(self, rows: torch.Tensor, group: torch.Tensor, n_rows: int,
               dense_active: torch.Tensor | None = None) -> None:
        """Active (row, latent) pairs of a batch of `n_rows` tokens, grouped by row ascending.

        `dense_active` ([n_rows, n] bool), when given, allows the GEMM path."""
        if self.tokens + n_rows >= 2**31:
            raise OverflowError("coactivation counts are int32: mine fewer than 2^31 tokens")
        self.tokens += n_rows
        if rows.numel() == 0:
            return
        per_row = torch.bincount(rows, minlength=n_rows)
        pairs = int((per_row * per_row).sum())
        # a scatter-add costs a few hundred GEMM multiply-adds: pick the cheaper path
        if dense_active is not None and pairs * 256 > n_rows * self.n * self.n:
            self._update_dense(dense_active)
        else:
            self._update_pairs(rows, group, per_row)

    def _update_pairs(self, rows, group, per_row) -> None:
        m = int(per_row.max())
        starts = torch.cumsum(per_row, 0) - per_row
        slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
        active_rows = per_row.nonzero().squeeze(1)
        remap = torch.full_like(per_row, -1)
        remap[active_rows] = torch.arange(active_rows.numel(), device=rows.device)
        padded = torch.full((active_rows.numel(), m), -1, dtype=torch.int64, device=rows.device)
        padded[remap[rows], slot] = group
        flat = self.counts.view(-1)
        step = max(1, self.PAIR_CHUNK // (m * m))
        for s in range(0, padded.shape[0], step):
            p = padded[s:s + step]
            ok = (p[:, :, None] >= 0) & (p[:, None, :] >= 0)
            idx = (p[:, :, None] * self.n + p[:, None, :])[ok]
            flat.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def _update_dense(self, active: torch.Tensor) -> None:
        # 0/1 products summed in fp32 are exact integers below 2^24 per chunk
        step = 1 << 14
        for s in range(0, active.shape[0], step):
            a = active[s:s + step].float()
            self.counts += (a.t() @ a).round_().to(torch.int32)

    def merge(self, other: "CoactivationCounts") -> None:
        self.counts += other.counts
        self.tokens += other.tokens

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])
        self.tokens = int(state["tokens"])


# ----------------------------------------------------------------------------- sparse counter

class SparseCounter:
    """
    Exact count and float64 sum per key (row·n_cols + col) over the keys that occur.

    Memory is the number of distinct keys seen (at most n_rows·n_cols), not the number of
    updates: each batch is coalesced at once and folded into a sorted table when the pending
    part exceeds `fold_at` entries.
    """

    def __init__(self, n_cols: int, fold_at: int = 1 << 22, device="cpu"):
        self.n_cols, self.fold_at, self.device = n_cols, fold_at, device
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.count = torch.zeros(0, dtype=torch.int64, device=device)
        self.sum = torch.zeros(0, dtype=torch.float64, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0

    def update(self, row: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        keys = row.long() * self.n_cols + col.long()
        uniq, inv = torch.unique(keys, return_inverse=True)
        count = torch.zeros_like(uniq).index_add_(0, inv, torch.ones_like(inv))
        total = torch.zeros(uniq.numel(), dtype=torch.float64, device=uniq.device)
        total.index_add_(0, inv, value.double())
        self._pending.append((uniq, count, total))
        self._pending_size += uniq.numel()
        if self._pending_size > self.fold_at:
            self.fold()

    def fold(self) -> None:
        if not self._pending:
            return
        parts = [(self.keys, self.count, self.sum), *self._pending]
        keys = torch.cat([p[0] for p in parts])
        uniq, inv = torch.unique(keys, return_inverse=True)
        self.count = torch.zeros_like(uniq).index_add_(0, inv, torch.cat([p[1] for p in parts]))
        self.sum = torch.zeros(uniq.numel(), dtype=torch.float64, device=uniq.device).index_add_(
            0, inv, torch.cat([p[2] for p in parts]))
        self.keys = uniq
        self._pending, self._pending_size = [], 0

    def merge(self, other: "SparseCounter") -> None:
        other.fold()
        self._pending.append((other.keys, other.count, other.sum))
        self.fold()

    def top_per_row(self, n_top: int) -> dict[str, torch.Tensor]:
        """Per row, the n_top columns by count (ties: the smaller column)."""
        self.fold()
        row, col = self.keys // self.n_cols, self.keys % self.n_cols
        n_rows = int(row.max()) + 1 if row.numel() else 1
        order = lexsort_desc(row, self.count.double(), col)
        rank = ranks_within(row[order], n_rows)
        keep = order[rank < n_top]
        return {"row": row[keep], "col": col[keep], "count": self.count[keep], "sum": self.sum[keep],
                "rank": rank[rank < n_top]}

    def state_dict(self) -> dict:
        self.fold()
        return {"keys": self.keys.cpu(), "count": self.count.cpu(), "sum": self.sum.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].to(self.device)
        self.count = state["count"].to(self.device)
        self.sum = state["sum"].to(self.device)
        self._pending, self._pending_size = [], 0


# ----------------------------------------------------------------------------- token counts

class TokenCounts:
    """How often each vocabulary token occurs among the mined (non-BOS) tokens."""

    def __init__(self, vocab_size: int, device="cpu"):
        self.count = torch.zeros(vocab_size, dtype=torch.int64, device=device)

    def update(self, tokens: torch.Tensor) -> None:
        self.count += torch.bincount(tokens, minlength=self.count.numel())

    def merge(self, other: "TokenCounts") -> None:
        self.count += other.count

    def state_dict(self) -> dict:
        return {"count": self.count.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.count.copy_(state["count"])


# ----------------------------------------------------------------------------- one SAE

class SaeStats:
    """
    Everything mining keeps about one SAE, updated from each batch's sparse activations:
    moments, exact top-k with windows, a priority sample of values (for quantile bin edges) and
    its first entries with windows (interval examples), the activation histogram, coactivation
    counts (optional), the (token, latent) reverse index, and a priority sample of random
    positions with their windows and active sets (negatives for label scoring).
    """

    def __init__(self, d_sae: int, window: int, top_k: int, sample_k: int, value_k: int,
                 random_k: int, hist_bins: int, coactivation: bool, seed: int, device="cpu"):
        win = {"tokens": ((window,), torch.int32, -1), "acts": ((window,), torch.float32, 0.0)}
        self.seed = seed
        self.n_tokens = 0
        self.moments = FeatureMoments(d_sae, device)
        self.top = TopKSlots(d_sae, top_k, win, device)
        self.values = TopKSlots(d_sae, value_k, None, device)
        self.samples = TopKSlots(d_sae, sample_k, win, device)
        self.hist = ActivationHistogram(d_sae, hist_bins, device)
        self.coact = CoactivationCounts(d_sae, device) if coactivation else None
        self.token_features = SparseCounter(d_sae, device=device)
        self.random = TopKSlots(1, random_k, {"tokens": ((window,), torch.int32, -1),
                                              "active": ((d_sae,), torch.bool, False)}, device)

    def update(self, key: torch.Tensor, token: torch.Tensor, rows: torch.Tensor,
               group: torch.Tensor, value: torch.Tensor, windows: Callable, active: Callable,
               codes: torch.Tensor | None = None) -> None:
        """
        key, token [N]: the batch's mined tokens. (rows, group, value): its non-zero activations,
        grouped by row ascending. windows(rows, group) -> {"tokens", "acts"} [m, window] for
        those (token, latent) pairs; active(rows) -> [m, d_sae] bool. codes: dense [N, d_sae]
        (optional; lets coactivation use a GEMM when that is cheaper).
        """
        n = key.numel()
        self.n_tokens += n
        self.moments.update(group, value)
        self.hist.update(group, value)
        k = key[rows]
        self.top.update(group, value, k, value, lambda i: windows(rows[i], group[i]))
        neg_priority = -priorities(k, group, self.seed)
        self.values.update(group, neg_priority, k, value)
        self.samples.update(group, neg_priority, k, value, lambda i: windows(rows[i], group[i]))
        if self.coact is not None:
            self.coact.update(rows, group, n, None if codes is None else codes > 0)
        self.token_features.update(token[rows], group, value)
        zeros = torch.zeros_like(key)
        self.random.update(zeros, -priorities(key, -1, self.seed), key,
                           torch.zeros(n, dtype=torch.float32, device=key.device),
                           lambda i: {"tokens": windows(i, None)["tokens"], "active": active(i)})

    def merge(self, other: "SaeStats") -> None:
        self.n_tokens += other.n_tokens
        for name in ("moments", "top", "values", "samples", "hist", "token_features", "random"):
            getattr(self, name).merge(getattr(other, name))
        if self.coact is not None:
            self.coact.merge(other.coact)

    def state_dict(self) -> dict:
        parts = ("moments", "top", "values", "samples", "hist", "token_features", "random")
        d = {name: getattr(self, name).state_dict() for name in parts}
        d["coact"] = self.coact.state_dict() if self.coact is not None else None
        d["n_tokens"] = self.n_tokens
        return d

    def load_state_dict(self, state: dict) -> None:
        for name in ("moments", "top", "values", "samples", "hist", "token_features", "random"):
            getattr(self, name).load_state_dict(state[name])
        if self.coact is not None:
            self.coact.load_state_dict(state["coact"])
        self.n_tokens = int(state["n_tokens"])
