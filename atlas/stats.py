"""
Mergeable streaming statistics for feature mining.

Every statistic is updated batch by batch in memory that does not grow with the corpus, and two
instances built on disjoint parts of a corpus `merge` into exactly what one instance would have
built on the whole, bit for bit: counts, maxima, top-k sets, samples, histograms, and sums too
(fixed point, see `to_fixed`). So a run can be checkpointed (`state_dict` / `load_state_dict`),
resumed, or sharded across processes (torchrun ranks) and merged, and ends with the same numbers.

Inputs are sparse: (group, value, key) triplets of the non-zero activations of a batch, where
`group` is usually the latent index and `key` a 63-bit position id (doc_id << 32 | token_pos)
that orders the corpus and identifies a token.

- `to_fixed` / `from_fixed`: sums of activations as integers (whole units and 2^-32 fractions),
  so they do not depend on the order of the additions (float sums do, in their last bits).
- `FeatureMoments`: per-latent count, sum, max and min of the non-zero activations.
- `TopKSlots`: per group, the k best entries (ties to the smallest key), with fixed-shape
  payloads (token windows...) fetched only for entries that get in. Ranked by activation it is
  the exact top-k; ranked by a hash of the key it is a bottom-k *priority sample*: a uniform
  random sample without replacement that does not depend on batch order, resumes exactly and
  merges exactly.
- `ActivationHistogram`: per latent, `n_bins` equal bins over [0, 2^e], e the smallest integer
  with max ≤ 2^e. When a larger value arrives, e grows and bins merge in groups of 2^Δe, which
  is exact because every edge is a multiple of a power of two (bins never split).
- `CoactivationCounts`: counts of tokens where two latents are both active (upper triangle of a
  d×d int32 matrix), from the pairs of each token's active set (scatter-add), capped at the
  token's 64 strongest latents to bound the cost.
- `PairCounter`: exact count and sum per (row, col) pair, e.g. (token, latent) for the reverse
  index: a dense table when it fits a memory budget, else a sorted sparse table of the pairs seen.
- `PositionProfile`: per-latent counts and sums by log2 bucket of the context position.
- `TokenCounts`: corpus unigram counts.
- `SaeStats`: all of the above for one SAE, fed from one batch's sparse codes.

Ranking (TopKSlots) uses int64 order keys, smaller first: 0x7FFFFFFF - bits(activation) for the
top-k (float32 bit patterns of non-negative values are monotone) and a 39-bit hash of the position
for samples; with the group in the high bits, one stable sort ranks a whole batch.
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


# ----------------------------------------------------------------------------- exact sums

FIXED_FRAC_BITS = 32  # sums resolve 2^-32 (~2e-10); each value is rounded to that grid once


def to_fixed(value: torch.Tensor) -> torch.Tensor:
    """[n] values -> [n, 2] int64 (whole part, fraction in 2^-32 units): adding these rows is
    integer addition, exact in any order or split (batches, resumes, ranks), which float sums are
    not. The fraction column can hold 2^31 values (the token limit of every count here)."""
    v = value.double()
    whole = v.floor()
    out = torch.empty((v.numel(), 2), dtype=torch.int64, device=v.device)
    out[:, 0] = whole
    out[:, 1] = (v - whole).mul_(2.0 ** FIXED_FRAC_BITS).round_()  # exact: scaling by a power of 2
    return out


def from_fixed(total: torch.Tensor) -> torch.Tensor:
    """[..., 2] fixed-point sums -> float64 (a function of the integers alone: deterministic)."""
    return total[..., 0].double() + total[..., 1].double() * 2.0 ** -FIXED_FRAC_BITS


# ----------------------------------------------------------------------------- moments

class FeatureMoments:
    """Count, sum (fixed point), max and min of the non-zero activations of each latent."""

    def __init__(self, n: int, device="cpu"):
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.sum = torch.zeros((n, 2), dtype=torch.int64, device=device)
        self.max = torch.zeros(n, dtype=torch.float32, device=device)
        self.min = torch.full((n,), float("inf"), dtype=torch.float32, device=device)

    def update(self, group: torch.Tensor, value: torch.Tensor) -> None:
        self.count.index_add_(0, group, torch.ones_like(group))
        self.sum.index_add_(0, group, to_fixed(value))
        self.max.scatter_reduce_(0, group, value.float(), "amax")
        self.min.scatter_reduce_(0, group, value.float(), "amin")

    def merge(self, other: "FeatureMoments") -> None:
        self.count += other.count
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)

    def total(self) -> torch.Tensor:
        """Sum of each latent's activations (float64)."""
        return from_fixed(self.sum)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).cpu() for k in ("count", "sum", "max", "min")}

    def load_state_dict(self, state: dict) -> None:
        for k in ("count", "sum", "max", "min"):
            getattr(self, k).copy_(state[k])


# ----------------------------------------------------------------------------- top-k slots

ORDER_BITS = 40                      # order keys are ints below EMPTY_ORDER: smaller = better
EMPTY_ORDER = (1 << ORDER_BITS) - 1  # an empty slot, worse than any entry
MAX_GROUPS = 1 << (63 - ORDER_BITS)


def order_by_value(value: torch.Tensor) -> torch.Tensor:
    """Order keys ranking non-negative float32 values largest first (their bit patterns are
    monotone in the value, so this is exact)."""
    return 0x7FFFFFFF - value.float().contiguous().view(torch.int32).long()


def order_by_priority(key: torch.Tensor, group: torch.Tensor | int, seed: int) -> torch.Tensor:
    """Order keys ranking entries by a 39-bit hash of (key, group, seed): the smallest k form a
    uniform random sample without replacement (bottom-k / priority sampling), the same on every
    device, batch order and shard split."""
    salt = splitmix64(torch.as_tensor(group, device=key.device).long() * _MIX1 + seed)
    return _shr(splitmix64(key.long() ^ salt), 64 - (ORDER_BITS - 1))


class TopKSlots:
    """
    Per group, the k best entries by (order key, position key), both ascending: ties go to the
    earliest position. Order keys come from `order_by_value` (exact top-k of activations) or
    `order_by_priority` (a random sample).

    `order`, `key`, `value` are kept in rank order (slot 0 best); payloads (`payload` declares
    them as {name: (shape, dtype, fill)}) sit in physical slots that never move, `phys[g, r]`
    naming the slot of rank r, so a batch writes payload only for the entries it admits. An
    update's `fetch(sel)` returns the payloads of the admitted candidates `sel`; `ranked(name)`
    reads a payload in rank order.
    """

    def __init__(self, n_groups: int, k: int, payload: dict | None = None, device="cpu"):
        if n_groups > MAX_GROUPS:
            raise ValueError(f"TopKSlots: at most {MAX_GROUPS} groups, got {n_groups}")
        self.n_groups, self.k = n_groups, k
        self.order = torch.full((n_groups, k), EMPTY_ORDER, dtype=torch.int64, device=device)
        self.key = torch.full((n_groups, k), EMPTY_KEY, dtype=torch.int64, device=device)
        self.value = torch.zeros((n_groups, k), dtype=torch.float32, device=device)
        self.phys = torch.arange(k, device=device).repeat(n_groups, 1)
        self.spec = dict(payload or {})
        self.payload = {name: torch.full((n_groups, k, *shape), fill, dtype=dtype, device=device)
                        for name, (shape, dtype, fill) in self.spec.items()}

    @property
    def filled(self) -> torch.Tensor:
        return self.key != EMPTY_KEY

    def ranked(self, name: str) -> torch.Tensor:
        """Payload `name` in rank order: [n_groups, k, ...]."""
        t = self.payload[name]
        idx = self.phys.view(self.n_groups, self.k, *([1] * (t.dim() - 2))).expand_as(t)
        return t.gather(1, idx)

    def update(self, group: torch.Tensor, order: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, fetch: Callable[[torch.Tensor], dict] | None = None) -> None:
        """Offer candidates. Streaming contract: their keys ascend and exceed every key already
        held (the corpus is read in order), so a tie in order always goes to the held entry."""
        maybe = order < self.order[group, -1]
        if not bool(maybe.any()):
            return
        sel = maybe.nonzero().squeeze(1)
        rows, row_of = torch.unique(group[sel], return_inverse=True)
        n_rows, k, dev = rows.numel(), self.k, group.device
        # candidates sorted by (row, order); the stable sort keeps key order within ties
        comp = (row_of << ORDER_BITS) | order[sel]
        perm = torch.argsort(comp, stable=True)
        comp, row_c, cand = comp[perm], row_of[perm], sel[perm]
        held_order, held_key = self.order[rows], self.key[rows]
        held_comp = (torch.arange(n_rows, device=dev)[:, None] << ORDER_BITS) | held_order
        # rank of a candidate = held entries ahead of it + earlier candidates of its row
        ahead = torch.searchsorted(held_comp.reshape(-1), comp, right=True) - row_c * k
        rank_c = ahead + ranks_within(row_c, n_rows)
        in_c = rank_c < k  # a prefix of each row's candidates
        row_c, ahead, rank_c, cand = row_c[in_c], ahead[in_c], rank_c[in_c], cand[in_c]
        # a held entry moves down by the admitted candidates inserted ahead of it
        bump = torch.zeros(n_rows, k + 1, dtype=torch.int64, device=dev)
        bump.index_put_((row_c, ahead), torch.ones_like(ahead), accumulate=True)
        rank_h = torch.arange(k, device=dev) + bump.cumsum(1)[:, :k]
        in_h = (held_key != EMPTY_KEY) & (rank_h < k)
        # rows are rebuilt by scatters along dim 1; entries that leave go to a dump column k
        dest_h = torch.where(in_h, rank_h, k)
        # physical slots of evicted and empty entries are free; admitted candidates take the
        # first ones in rank order, the rest stay behind the row's last entry
        phys = self.phys[rows]
        free = ~in_h
        free_list = _scatter_rows(phys, torch.where(free, free.long().cumsum(1) - 1, k), k)
        n_c = torch.bincount(row_c, minlength=n_rows)[:, None]
        slot_c = free_list[row_c, rank_c - ahead]  # rank_c - ahead: index among admitted
        n_h = in_h.sum(1, keepdim=True)
        i = torch.arange(k, device=dev)[None, :]
        dest_rest = torch.where((i >= n_c) & (i < k - n_h), n_h + i, k)
        new_phys = _scatter_rows(phys, dest_h, k)
        new_phys.scatter_(1, dest_rest, free_list[:, :k])
        new_order = _scatter_rows(held_order, dest_h, k, EMPTY_ORDER)
        new_key = _scatter_rows(held_key, dest_h, k, EMPTY_KEY)
        new_value = _scatter_rows(self.value[rows], dest_h, k, 0.0)
        new_order[row_c, rank_c] = order[cand]
        new_key[row_c, rank_c] = key[cand]
        new_value[row_c, rank_c] = value[cand].float()
        new_phys[row_c, rank_c] = slot_c
        self.order[rows], self.key[rows] = new_order[:, :k], new_key[:, :k]
        self.value[rows], self.phys[rows] = new_value[:, :k], new_phys[:, :k]
        if self.spec:
            got = fetch(cand)
            for name in self.spec:
                self.payload[name][rows[row_c], slot_c] = got[name].to(self.payload[name].dtype)

    def merge(self, other: "TopKSlots") -> None:
        """Add the entries of another instance (any key order); payloads are rewritten in rank
        order. Rare (one call per shard), so a plain sort of everything held is fine."""
        a_g, a_r = self.filled.nonzero(as_tuple=True)
        b_g, b_r = other.filled.nonzero(as_tuple=True)
        group = torch.cat([a_g, b_g])
        order = torch.cat([self.order[a_g, a_r], other.order[b_g, b_r]])
        key = torch.cat([self.key[a_g, a_r], other.key[b_g, b_r]])
        value = torch.cat([self.value[a_g, a_r], other.value[b_g, b_r]])
        payload = {n: torch.cat([self.ranked(n)[a_g, a_r], other.ranked(n)[b_g, b_r]]) for n in self.spec}
        perm = torch.argsort(key, stable=True)
        perm = perm[torch.argsort((group[perm] << ORDER_BITS) | order[perm], stable=True)]
        rank = ranks_within(group[perm], self.n_groups)
        keep = perm[rank < self.k]
        g, r = group[keep], rank[rank < self.k]
        self.order.fill_(EMPTY_ORDER)
        self.key.fill_(EMPTY_KEY)
        self.value.zero_()
        self.phys.copy_(torch.arange(self.k, device=self.phys.device).expand_as(self.phys))
        self.order[g, r], self.key[g, r], self.value[g, r] = order[keep], key[keep], value[keep]
        for name, (shape, dtype, fill) in self.spec.items():
            self.payload[name].fill_(fill)
            self.payload[name][g, r] = payload[name][keep]

    def state_dict(self) -> dict:
        d = {"order": self.order.cpu(), "key": self.key.cpu(), "value": self.value.cpu(),
             "phys": self.phys.cpu()}
        d.update({f"payload.{n}": t.cpu() for n, t in self.payload.items()})
        return d

    def load_state_dict(self, state: dict) -> None:
        for name in ("order", "key", "value", "phys"):
            getattr(self, name).copy_(state[name])
        for n, t in self.payload.items():
            t.copy_(state[f"payload.{n}"])


def _scatter_rows(src: torch.Tensor, dest: torch.Tensor, k: int, fill=None) -> torch.Tensor:
    """out[u, dest[u, s]] = src[u, s] into rows of k + 1 columns (column k collects the
    entries that leave); unfilled columns hold `fill` (uninitialised when None)."""
    shape = (src.shape[0], k + 1)
    out = torch.empty(shape, dtype=src.dtype, device=src.device) if fill is None else \
        torch.full(shape, fill, dtype=src.dtype, device=src.device)
    return out.scatter_(1, dest, src)


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
    Fine enough (1024 bins by default) to place quantile edges on bin boundaries, where the
    fraction of activations on either side is known exactly; `coarsened` gives the display bins.
    """

    NO_DATA = -(1 << 20)

    def __init__(self, n: int, n_bins: int = 64, device="cpu"):
        if n_bins < 2 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {n_bins}")
        self.n_bins = n_bins
        self.log2_bins = n_bins.bit_length() - 1
        self.counts = torch.zeros((n, n_bins), dtype=torch.int32, device=device)
        self.exp = torch.full((n,), self.NO_DATA, dtype=torch.int64, device=device)

    def update(self, group: torch.Tensor, value: torch.Tensor) -> None:
        value = value.float()
        mant, e = torch.frexp(value)  # value = mant·2^e, mant in [0.5, 1)
        e = e.long() - (mant == 0.5).long()  # smallest e with value <= 2^e
        need = self.exp.clone().scatter_reduce_(0, group, e, "amax")
        self._grow(need)
        b = self.bin_index(group, value)
        self.counts.view(-1).index_add_(0, group * self.n_bins + b,
                                        torch.ones(b.numel(), dtype=torch.int32, device=b.device))

    def bin_index(self, group: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The bin of each (latent, value) under the current ranges (exact: scaling by 2^k)."""
        scaled = torch.ldexp(value.float(), (self.log2_bins - self.exp[group]).float())
        return scaled.long().clamp_(max=self.n_bins - 1)

    def width(self) -> torch.Tensor:
        """Bin width per latent (float64; meaningless for latents that never fired)."""
        return torch.ldexp(torch.ones_like(self.exp, dtype=torch.float64),
                           (self.exp - self.log2_bins).clamp(min=-1000).double())

    def coarsened(self, n_bins: int) -> torch.Tensor:
        """Counts summed into n_bins equal bins over the same ranges (n_bins divides n_bins)."""
        return self.counts.view(self.counts.shape[0], n_bins, -1).sum(2, dtype=torch.int64)

    def quantile_boundaries(self, n_quantiles: int) -> torch.Tensor:
        """[n, n_quantiles - 1] bin boundaries b_j (edges b_j·w): the smallest boundary with at
        least j/n_quantiles of the latent's activations below it."""
        cum = self.counts.cumsum(1, dtype=torch.int64)
        total = cum[:, -1:].double()
        targets = total * torch.arange(1, n_quantiles, device=cum.device, dtype=torch.float64) / n_quantiles
        return torch.searchsorted(cum.double().contiguous(), targets.contiguous()) + 1

    def _grow(self, new_exp: torch.Tensor) -> None:
        self.counts = _rebinned(self.counts, self.exp, new_exp, self.NO_DATA)
        self.exp = torch.maximum(self.exp, new_exp)

    def merge(self, other: "ActivationHistogram") -> None:
        exp = torch.maximum(self.exp, other.exp)
        self.counts = (_rebinned(self.counts, self.exp, exp, self.NO_DATA)
                       + _rebinned(other.counts, other.exp, exp, self.NO_DATA))
        self.exp = exp

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
    """
    Tokens on which two latents are both among the token's `top` strongest active latents
    (exact co-firing counts whenever a token has at most `top` active latents, e.g. any TopK SAE
    with k <= top; the cap bounds the cost, which grows with the square of the active count).
    `pairs` counts each co-firing pair of a token's capped active set once, in cell (i, j) or
    (j, i); `count[i]` counts the tokens where i is in it; `symmetric()` is the full matrix
    (pairs + pairsᵀ) with `count` on the diagonal.
    """

    PAIR_CHUNK = 1 << 22  # pair indices materialised at once
    BUCKET = 8  # row-length step of the padded blocks of variable-length rows

    def __init__(self, n: int, top: int = 64, device="cpu"):
        self.n, self.top = n, top
        self.pairs = torch.zeros((n, n), dtype=torch.int32, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.tokens = 0

    def update(self, rows: torch.Tensor, group: torch.Tensor, value: torch.Tensor,
               n_rows: int) -> None:
        """Active (row, latent, value) triplets of a batch of `n_rows` tokens, rows ascending."""
        if self.tokens + n_rows >= 2**31:
            raise OverflowError("coactivation counts are int32: mine fewer than 2^31 tokens")
        self.tokens += n_rows
        if rows.numel() == 0:
            return
        per_row = torch.bincount(rows, minlength=n_rows)
        if int(per_row.max()) > self.top:
            rows, group, per_row = self._capped(rows, group, value, per_row)
        self.count.index_add_(0, group, torch.ones_like(group))
        self._update_pairs(rows, group, per_row)

    def _capped(self, rows, group, value, per_row):
        """Keep each row's `top` largest values (ties: smaller latent); rows stay ascending.
        Only the entries of rows over the cap are sorted: usually a small tail."""
        over = per_row[rows] > self.top
        idx = torch.nonzero(over).squeeze(1)
        rank_key = (rows[idx] << 31) | order_by_value(value[idx])  # row, then value descending
        perm = idx[torch.argsort(rank_key, stable=True)]
        keep = over.logical_not()
        keep[perm[ranks_within(rows[perm], per_row.numel()) < self.top]] = True
        return rows[keep], group[keep], per_row.clamp(max=self.top)

    def _update_pairs(self, rows, group, per_row) -> None:
        """Count every pair of latents within each row, as dense [rows, m] blocks: the pairs
        (i, i + 1..m-1) of column i are a broadcast add of contiguous slices, so no index
        tensors are gathered and Python loops over columns, not rows. Rows of different lengths
        (JumpReLU, ReLU) are bucketed by length in steps of BUCKET and padded to their bucket's
        longest row; a padded pair is sent to cell (0, 0), which symmetric() never reads (its
        diagonal is `count`) and which is cleared after each update. A pair lands in cell (a, b)
        or (b, a) depending on the order of the latents; `symmetric()` adds both."""
        dtype = torch.int32 if self.n * self.n < 2**31 else torch.int64  # half the traffic
        flat = self.pairs.view(-1)
        group = group.to(dtype)
        m_max = int(per_row.max())
        if m_max < 2:
            return
        if int(per_row.min()) == m_max:  # every row alike (TopK): one block, no padding
            self._count_block(flat, group.view(-1, m_max), padded=False)
            return
        starts = torch.cumsum(per_row, 0) - per_row
        bucket = (per_row + self.BUCKET - 1) // self.BUCKET  # rows of 1..8 latents -> 1, ...
        for b in torch.unique(bucket[per_row >= 2]).tolist():
            r = torch.nonzero((bucket == b) & (per_row >= 2)).squeeze(1)
            m = int(per_row[r].max())
            cols = torch.arange(m, device=group.device)
            valid = cols < per_row[r, None]
            pos = torch.where(valid, starts[r, None] + cols, 0)
            self._count_block(flat, torch.where(valid, group[pos], -1), padded=True)
        flat[0] = 0

    def _count_block(self, flat: torch.Tensor, latents: torch.Tensor, padded: bool) -> None:
        """Pairs within each row of a [rows, m] block of latents (-1 = padding when `padded`)."""
        m = latents.shape[1]
        base = latents * self.n
        step = max(1, self.PAIR_CHUNK // m)  # rows per slice: bounded pair tensors
        for s in range(0, latents.shape[0], step):
            b, lat = base[s:s + step], latents[s:s + step]
            for i in range(m - 1):
                cell = b[:, i:i + 1] + lat[:, i + 1:]
                if padded:  # padding sits at the ends of rows, so checking the later latent suffices
                    cell = torch.where(lat[:, i + 1:] >= 0, cell, 0)
                _count(flat, cell.reshape(-1))

    def symmetric(self) -> torch.Tensor:
        """The full symmetric int32 count matrix, `count` on the diagonal."""
        full = self.pairs + self.pairs.t()
        full.diagonal().copy_(self.count)
        return full

    def merge(self, other: "CoactivationCounts") -> None:
        self.pairs += other.pairs
        self.count += other.count
        self.tokens += other.tokens

    def state_dict(self) -> dict:
        return {"pairs": self.pairs.cpu(), "count": self.count.cpu(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.pairs.copy_(state["pairs"])
        self.count.copy_(state["count"])
        self.tokens = int(state["tokens"])


def _count(flat: torch.Tensor, idx: torch.Tensor) -> None:
    flat.index_add_(0, idx, torch.ones(idx.numel(), dtype=flat.dtype, device=idx.device))


# ----------------------------------------------------------------------------- pair counter

class PairCounter:
    """
    Exact count and sum (fixed point) per (row, col) pair, e.g. (token, latent) for the reverse
    index.

    Dense tables when n_rows·n_cols·20 bytes fits `dense_bytes`; otherwise a sparse table of the
    pairs that occur (memory = distinct pairs, at most n_rows·n_cols, whatever the corpus size):
    updates are buffered and folded into a sorted key table with one sort per `fold_at` entries.
    """

    def __init__(self, n_rows: int, n_cols: int, dense_bytes: int = 256 << 20,
                 fold_at: int = 1 << 23, device="cpu"):
        self.n_rows, self.n_cols, self.fold_at, self.device = n_rows, n_cols, fold_at, device
        self.dense = n_rows * n_cols * 20 <= dense_bytes
        if self.dense:
            self.count = torch.zeros(n_rows * n_cols, dtype=torch.int32, device=device)
            self.sum = torch.zeros((n_rows * n_cols, 2), dtype=torch.int64, device=device)
        else:
            self.keys = torch.zeros(0, dtype=torch.int64, device=device)
            self.count = torch.zeros(0, dtype=torch.int64, device=device)
            self.sum = torch.zeros((0, 2), dtype=torch.int64, device=device)
            self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            self._pending_size = 0

    def update(self, row: torch.Tensor, col: torch.Tensor, value: torch.Tensor) -> None:
        keys = row.long() * self.n_cols + col.long()
        if self.dense:
            self.count.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))
            self.sum.index_add_(0, keys, to_fixed(value))
            return
        self._pending.append((keys, torch.ones_like(keys), to_fixed(value)))
        self._pending_size += keys.numel()
        if self._pending_size >= self.fold_at:
            self._fold()

    def _fold(self) -> None:
        if self.dense or not self._pending:
            return
        parts = [(self.keys, self.count, self.sum), *self._pending]
        uniq, inv = torch.unique(torch.cat([p[0] for p in parts]), return_inverse=True)
        self.count = torch.zeros_like(uniq).index_add_(0, inv, torch.cat([p[1] for p in parts]))
        self.sum = torch.zeros((uniq.numel(), 2), dtype=torch.int64, device=uniq.device).index_add_(
            0, inv, torch.cat([p[2] for p in parts]))
        self.keys = uniq
        self._pending, self._pending_size = [], 0

    def table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, count, sum as float64) of every pair that occurred, keys ascending."""
        keys, count, total = self._pairs()
        return keys, count, from_fixed(total)

    def _pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, count, fixed-point sum) of every pair that occurred, keys ascending."""
        if self.dense:
            keys = self.count.nonzero().squeeze(1)
            return keys, self.count[keys].long(), self.sum[keys]
        self._fold()
        return self.keys, self.count, self.sum

    def merge(self, other: "PairCounter") -> None:
        keys, count, total = other._pairs()
        if self.dense:
            self.count.index_add_(0, keys, count.to(torch.int32))
            self.sum.index_add_(0, keys, total)
        else:
            self._pending.append((keys, count, total))
            self._fold()

    def top_per_row(self, n_top: int) -> dict[str, torch.Tensor]:
        """Per row, the n_top columns by count (ties: the smaller column), with their count and
        float64 sum."""
        keys, count, total = self._pairs()
        row, col = keys // self.n_cols, keys % self.n_cols
        # keys ascend, so within a row columns ascend: one stable sort by (row, -count)
        composite = row * (int(count.max()) + 1 if count.numel() else 1) - count
        perm = torch.argsort(composite, stable=True)
        rank = ranks_within(row[perm], self.n_rows)
        keep = perm[rank < n_top]
        return {"row": row[keep], "col": col[keep], "count": count[keep],
                "sum": from_fixed(total[keep]), "rank": rank[rank < n_top]}

    def state_dict(self) -> dict:
        keys, count, total = self._pairs()
        return {"keys": keys.cpu(), "count": count.cpu(), "sum": total.cpu()}

    def load_state_dict(self, state: dict) -> None:
        keys, count, total = (state[k].to(self.device) for k in ("keys", "count", "sum"))
        if self.dense:
            self.count.zero_()
            self.sum.zero_()
            self.count[keys] = count.to(torch.int32)
            self.sum[keys] = total
        else:
            self.keys, self.count, self.sum = keys, count, total
            self._pending, self._pending_size = [], 0


# ----------------------------------------------------------------------------- positions

class PositionProfile:
    """Per latent, count and activation sum by context position bucket: bucket b holds
    positions [2^b, 2^(b+1)) of the model's window (BOS = 0 is never mined), plus the number of
    mined tokens per bucket, so density by position = count / tokens."""

    N_BUCKETS = 32

    def __init__(self, n: int, device="cpu"):
        self.count = torch.zeros((n, self.N_BUCKETS), dtype=torch.int32, device=device)
        self.sum = torch.zeros((n, self.N_BUCKETS, 2), dtype=torch.int64, device=device)
        self.tokens = torch.zeros(self.N_BUCKETS, dtype=torch.int64, device=device)

    @classmethod
    def bucket(cls, position: torch.Tensor) -> torch.Tensor:
        _, e = torch.frexp(position.clamp(min=1).double())  # position in [2^(e-1), 2^e)
        return (e.long() - 1).clamp_(0, cls.N_BUCKETS - 1)

    def update(self, group: torch.Tensor, bucket: torch.Tensor, value: torch.Tensor,
               token_buckets: torch.Tensor) -> None:
        """(group, bucket, value) per non-zero activation; token_buckets: every mined token's."""
        flat = group * self.N_BUCKETS + bucket
        self.count.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.int32, device=flat.device))
        self.sum.view(-1, 2).index_add_(0, flat, to_fixed(value))
        self.tokens += torch.bincount(token_buckets, minlength=self.N_BUCKETS)

    def merge(self, other: "PositionProfile") -> None:
        self.count += other.count
        self.sum += other.sum
        self.tokens += other.tokens

    def total(self) -> torch.Tensor:
        """[n, N_BUCKETS] activation sums (float64)."""
        return from_fixed(self.sum)

    def state_dict(self) -> dict:
        return {"count": self.count.cpu(), "sum": self.sum.cpu(), "tokens": self.tokens.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("count", "sum", "tokens"):
            getattr(self, name).copy_(state[name])


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
    moments, exact top-k with windows, a priority sample with windows (interval examples), the
    fine activation histogram (display bins and quantile edges), coactivation counts (optional),
    the (token, latent) reverse index, the position profile, and a priority sample of random
    positions with their windows and active sets (negatives for label scoring).
    """

    def __init__(self, d_sae: int, vocab_size: int, window: int, top_k: int, sample_k: int,
                 random_k: int, hist_bins: int, coactivation_top: int | None, seed: int,
                 device="cpu"):
        win = {"tokens": ((window,), torch.int32, -1), "acts": ((window,), torch.float32, 0.0)}
        self.seed = seed
        self.n_tokens = 0
        self.moments = FeatureMoments(d_sae, device)
        self.top = TopKSlots(d_sae, top_k, win, device)
        self.samples = TopKSlots(d_sae, sample_k, win, device)
        self.hist = ActivationHistogram(d_sae, hist_bins, device)
        self.coact = (CoactivationCounts(d_sae, coactivation_top, device)
                      if coactivation_top else None)
        self.token_features = PairCounter(vocab_size, d_sae, device=device)
        self.positions = PositionProfile(d_sae, device)
        self.random = TopKSlots(1, random_k, {"tokens": ((window,), torch.int32, -1),
                                              "active": ((d_sae,), torch.bool, False)}, device)

    def update(self, key: torch.Tensor, token: torch.Tensor, position: torch.Tensor,
               rows: torch.Tensor, group: torch.Tensor, value: torch.Tensor, windows: Callable,
               active: Callable) -> None:
        """
        key, token, position [N]: the batch's mined tokens (position: in the model's window).
        (rows, group, value): its non-zero activations,
        grouped by row ascending. windows(rows, group) -> {"tokens", "acts"} [m, window] for
        those (token, latent) pairs; active(rows) -> [m, d_sae] bool.
        """
        n = key.numel()
        if self.n_tokens + n >= 2**31:
            raise OverflowError("counts are int32: mine fewer than 2^31 tokens per run")
        self.n_tokens += n
        self.moments.update(group, value)
        self.hist.update(group, value)
        k = key[rows]
        self.top.update(group, order_by_value(value), k, value, lambda i: windows(rows[i], group[i]))
        self.samples.update(group, order_by_priority(k, group, self.seed), k, value,
                            lambda i: windows(rows[i], group[i]))
        if self.coact is not None:
            self.coact.update(rows, group, value, n)
        self.token_features.update(token[rows], group, value)
        buckets = PositionProfile.bucket(position)
        self.positions.update(group, buckets[rows], value, buckets)
        zeros = torch.zeros_like(key)
        self.random.update(zeros, order_by_priority(key, -1, self.seed), key,
                           torch.zeros(n, dtype=torch.float32, device=key.device),
                           lambda i: {"tokens": windows(i, None)["tokens"], "active": active(i)})

    def merge(self, other: "SaeStats") -> None:
        self.n_tokens += other.n_tokens
        for name in ("moments", "top", "samples", "hist", "token_features", "positions", "random"):
            getattr(self, name).merge(getattr(other, name))
        if self.coact is not None:
            self.coact.merge(other.coact)

    def state_dict(self) -> dict:
        parts = ("moments", "top", "samples", "hist", "token_features", "positions", "random")
        d = {name: getattr(self, name).state_dict() for name in parts}
        d["coact"] = self.coact.state_dict() if self.coact is not None else None
        d["n_tokens"] = self.n_tokens
        return d

    def load_state_dict(self, state: dict) -> None:
        for name in ("moments", "top", "samples", "hist", "token_features", "positions", "random"):
            getattr(self, name).load_state_dict(state[name])
        if self.coact is not None:
            self.coact.load_state_dict(state["coact"])
        self.n_tokens = int(state["n_tokens"])
