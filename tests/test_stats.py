"""Streaming statistics: each one equals a brute-force computation, and merging shards equals one pass."""

import numpy as np
import pytest
import torch

from atlas.stats import (ActivationHistogram, CoactivationCounts, FeatureMoments, PairCounter, PositionProfile, SaeStats,
                         TopKSlots, order_by_priority, order_by_value, position_keys, splitmix64, split_keys)


def splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def to_signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def test_splitmix64_matches_the_reference_bit_for_bit():
    xs = [0, 1, 2, 12345, (1 << 62) + 7, -1, -(1 << 63)]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [to_signed(splitmix64_reference(x & ((1 << 64) - 1))) for x in xs]


def test_position_keys_round_trip():
    doc, pos = torch.tensor([0, 3, 1 << 30]), torch.tensor([0, 17, (1 << 32) - 1])
    d, p = split_keys(position_keys(doc, pos))
    assert d.tolist() == doc.tolist() and p.tolist() == pos.tolist()


def make_stream(seed=0, n_batches=6, n=400, groups=7):
    """Sparse (group, value, key) batches with keys ascending across batches and many ties."""
    g = torch.Generator().manual_seed(seed)
    batches, key0 = [], 0
    for _ in range(n_batches):
        key = torch.arange(key0, key0 + n)
        key0 += n + int(torch.randint(1, 50, (1,), generator=g))
        group = torch.randint(0, groups, (n,), generator=g)
        value = torch.rand(n, generator=g) * 4
        value[torch.rand(n, generator=g) < 0.3] = 2.5  # exact ties
        batches.append((group, value, key))
    return batches


def brute_topk(batches, groups, k, order_fn):
    group = torch.cat([b[0] for b in batches])
    value = torch.cat([b[1] for b in batches])
    key = torch.cat([b[2] for b in batches])
    order = order_fn(group, value, key)
    out = {}
    for f in range(groups):
        m = group == f
        rows = sorted(zip(order[m].tolist(), key[m].tolist(), value[m].tolist()))[:k]
        out[f] = [(kk, v) for _, kk, v in rows]
    return out


def slots_as_dict(slots: TopKSlots):
    out = {}
    for f in range(slots.n_groups):
        filled = slots.filled[f]
        out[f] = list(zip(slots.key[f][filled].tolist(), slots.value[f][filled].tolist()))
    return out


BY_VALUE = lambda g, v, k: order_by_value(v)  # noqa: E731
BY_PRIORITY = lambda g, v, k: order_by_priority(k, g, 5)  # noqa: E731


@pytest.mark.parametrize("order_fn", [BY_VALUE, BY_PRIORITY], ids=["top-k", "priority-sample"])
def test_topk_slots_equal_brute_force_and_merge_exactly(order_fn):
    batches = make_stream()
    k = 9
    payload = {"w": ((3,), torch.int64, -1)}

    def run(parts):
        slots = TopKSlots(7, k, payload)
        for group, value, key in parts:
            slots.update(group, order_fn(group, value, key), key, value,
                         lambda i, key=key: {"w": key[i, None].repeat(1, 3) * 10})
        return slots

    whole = run(batches)
    assert slots_as_dict(whole) == brute_topk(batches, 7, k, order_fn)
    # the payload travelled with its entry
    filled = whole.filled
    assert torch.equal(whole.ranked("w")[filled], whole.key[filled, None].repeat(1, 3) * 10)
    # shards in either merge order give the same state as one pass
    for a, b in ((batches[:2], batches[2:]), (batches[3:], batches[:3])):
        merged = run(a)
        merged.merge(run(b))
        for name in ("order", "key", "value"):
            assert torch.equal(getattr(merged, name), getattr(whole, name))
        assert torch.equal(merged.ranked("w")[filled], whole.ranked("w")[filled])


def test_priority_sample_is_roughly_uniform_over_positions():
    n, k = 200_000, 2000
    key = torch.arange(n)
    slots = TopKSlots(1, k)
    for s in range(0, n, 10_000):
        kk = key[s:s + 10_000]
        slots.update(torch.zeros_like(kk), order_by_priority(kk, 0, 0), kk, torch.ones(kk.numel()))
    counts = np.histogram(slots.key[0].numpy(), bins=10, range=(0, n))[0]
    assert counts.sum() == k
    assert counts.min() > 150 and counts.max() < 250  # expected 200 per decile


def test_activation_histogram_is_exact_against_numpy_as_the_range_grows():
    g = torch.Generator().manual_seed(1)
    h = ActivationHistogram(3, n_bins=16)
    seen = {0: [], 1: [], 2: []}
    for scale in (0.01, 0.3, 1.0, 7.0, 100.0):  # each batch may widen the range
        group = torch.randint(0, 3, (300,), generator=g)
        value = torch.rand(300, generator=g) * scale + 1e-6
        value[:5] = scale  # values exactly on a power-of-two edge or at the max
        h.update(group, value)
        for f in range(3):
            seen[f] += value[group == f].tolist()
    for f in range(3):
        vals = np.array(seen[f], dtype=np.float32).astype(np.float64)
        R = 2.0 ** int(h.exp[f])
        assert vals.max() <= R < 2 * vals.max()
        edges = np.linspace(0, R, 17)
        assert h.counts[f].tolist() == np.histogram(vals, edges)[0].tolist()


def test_quantile_boundaries_and_coarsening():
    h = ActivationHistogram(2, n_bins=64)
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 3.0, 3.5])
    h.update(torch.zeros(12, dtype=torch.long), values)
    assert int(h.exp[0]) == 2 and h.width()[0] == 4 / 64
    b = h.quantile_boundaries(4)[0]
    idx = h.bin_index(torch.zeros(12, dtype=torch.long), values)
    for j, bj in enumerate(b.tolist(), start=1):  # the first boundary with >= j/4 of the values below
        assert int((idx < bj).sum()) >= 3 * j > int((idx < bj - 1).sum())
    assert torch.equal(h.coarsened(8)[0], torch.tensor([4, 5, 1, 0, 0, 0, 1, 1]))  # bins of 0.5
    assert torch.equal(h.coarsened(8)[1], torch.zeros(8, dtype=torch.int64))


def test_activation_histogram_merge_equals_one_pass():
    batches = make_stream(seed=2, groups=5)
    one = ActivationHistogram(5, 32)
    a, b = ActivationHistogram(5, 32), ActivationHistogram(5, 32)
    for i, (group, value, _) in enumerate(batches):
        value = value * (10.0 ** i)  # later shards have much larger ranges
        one.update(group, value)
        (a if i < 3 else b).update(group, value)
    b.merge(a)
    assert torch.equal(b.exp, one.exp) and torch.equal(b.counts, one.counts)


def sparse_codes(n_rows, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n_rows, n)
    for r in range(n_rows):
        m = int(torch.randint(0, k + 1, (1,), generator=g))
        codes[r, torch.randperm(n, generator=g)[:m]] = torch.rand(m, generator=g) + 0.1
    return codes


def fixed_codes(n_rows, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_rows, n, generator=g).topk(k, dim=1).indices
    return torch.zeros(n_rows, n).scatter_(1, idx, torch.rand(n_rows, k, generator=g) + 0.1)


@pytest.mark.parametrize("path", ["variable", "fixed", "chunked", "capped"])
def test_coactivation_counts_equal_the_brute_force_product(path, monkeypatch):
    n = 40
    if path == "chunked":  # many small chunks of pairs
        monkeypatch.setattr(CoactivationCounts, "PAIR_CHUNK", 50)
    top = 5 if path == "capped" else 64
    cc = CoactivationCounts(n, top=top)
    all_codes = []
    for seed in range(3):
        codes = fixed_codes(120, n, 6, seed) if path == "fixed" else sparse_codes(120, n, 8, seed)
        rows, group = (codes > 0).nonzero(as_tuple=True)
        cc.update(rows, group, codes[rows, group], codes.shape[0])
        all_codes.append(codes)
    codes = torch.cat(all_codes)
    # brute force: each token's `top` largest activations (ties: the smaller latent)
    capped = torch.zeros_like(codes, dtype=torch.long)
    for r in range(codes.shape[0]):
        active = [(-float(codes[r, f]), f) for f in range(n) if codes[r, f] > 0]
        for _, f in sorted(active)[:top]:
            capped[r, f] = 1
    if path != "capped":
        assert torch.equal(capped, (codes > 0).long())  # no token exceeds the cap: exact co-firing
    else:
        assert int(capped.sum()) < int((codes > 0).sum())
    assert torch.equal(cc.symmetric().long(), capped.t() @ capped)
    assert cc.tokens == 360


@pytest.mark.parametrize("dense_bytes", [1 << 30, 0], ids=["dense", "sparse"])
def test_pair_counter_equals_brute_force_and_merges(dense_bytes):
    n_rows, n_cols = 13, 11
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, n_rows, (500,), generator=g), torch.randint(0, n_cols, (500,), generator=g),
             torch.rand(500, generator=g)) for _ in range(4)]
    one = PairCounter(n_rows, n_cols, dense_bytes=dense_bytes, fold_at=700)
    a = PairCounter(n_rows, n_cols, dense_bytes=dense_bytes, fold_at=700)
    b = PairCounter(n_rows, n_cols, dense_bytes=dense_bytes, fold_at=700)
    count = torch.zeros(n_rows, n_cols, dtype=torch.int64)
    total = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    for i, (r, c, v) in enumerate(data):
        one.update(r, c, v)
        (a if i % 2 else b).update(r, c, v)
        count.index_put_((r, c), torch.ones_like(r), accumulate=True)
        total.index_put_((r, c), v.double(), accumulate=True)
    assert one.dense == (dense_bytes > 0)
    a.merge(b)
    for counter in (one, a):
        keys, cnt, s = counter.table()
        assert torch.equal(cnt, count.view(-1)[keys]) and int(cnt.sum()) == 2000
        assert torch.allclose(s, total.view(-1)[keys])
        top = counter.top_per_row(3)
        for row in range(n_rows):
            expect = sorted(range(n_cols), key=lambda c: (-int(count[row, c]), c))[:3]
            expect = [c for c in expect if count[row, c] > 0]
            assert top["col"][top["row"] == row].tolist() == expect


def test_position_buckets_are_log2_ranges():
    assert PositionProfile.bucket(torch.tensor([1, 2, 3, 4, 7, 8, 1023, 1024])).tolist() == [0, 1, 1, 2, 2, 3, 9, 10]


def test_sae_stats_merge_equals_one_pass_and_state_round_trips():
    d, window = 16, 5
    codes_batches = [sparse_codes(60, d, 5, seed) for seed in range(4)]

    def feed(stats, which):
        for i in which:
            codes = codes_batches[i]
            key = position_keys(torch.full((60,), i), torch.arange(1, 61))
            token = (torch.arange(60) * 7 + i) % 30
            rows, group = (codes > 0).nonzero(as_tuple=True)

            def windows(r, f, codes=codes, token=token):
                out = {"tokens": token[r, None].repeat(1, window).int()}
                if f is not None:
                    out["acts"] = codes[r, f][:, None].repeat(1, window)
                return out
            stats.update(key, token, torch.arange(60) % 40 + 1, rows, group, codes[rows, group], windows,
                         lambda r, codes=codes: codes[r] > 0)

    def new():
        return SaeStats(d, 30, window, top_k=4, sample_k=6, random_k=8, hist_bins=8,
                        coactivation_top=3, seed=0)

    one, a, b = new(), new(), new()
    feed(one, range(4))
    feed(a, [2, 3])
    feed(b, [0, 1])
    a.merge(b)
    s1, s2 = one.state_dict(), a.state_dict()
    assert s1.keys() == s2.keys()
    for part in ("top", "samples", "random"):
        slots_a, slots_b = getattr(one, part), getattr(a, part)
        for name in slots_a.spec:  # payloads sit in different physical slots; compare by rank
            assert torch.equal(slots_a.ranked(name)[slots_a.filled], slots_b.ranked(name)[slots_b.filled])
    for part in s1:
        if isinstance(s1[part], dict):
            for name, t in s1[part].items():
                if name == "phys" or name.startswith("payload."):
                    continue
                if name == "sum":
                    assert torch.allclose(t, s2[part][name]), (part, name)
                elif isinstance(t, torch.Tensor):
                    assert torch.equal(t, s2[part][name]), (part, name)
                else:
                    assert t == s2[part][name]
    restored = new()
    restored.load_state_dict(one.state_dict())
    assert torch.equal(restored.top.ranked("acts"), one.top.ranked("acts"))
    assert torch.equal(restored.random.ranked("active"), one.random.ranked("active"))
    assert restored.n_tokens == 240
