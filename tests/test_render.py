"""The static atlas: pages, links, search coverage, escaping, atomicity and determinism."""

import gzip
import json
import os
import re
from urllib.parse import unquote, urlsplit

import duckdb
import numpy as np
import pytest

from atlas import search, site_data, site_views
from atlas.notes import note_html
from atlas.render import render_site
from atlas.tokens_display import visible_text, visible_token
from tests.atlas_fixtures import HOSTILE_LABEL, make_store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    store_path = make_store(root / "features.duckdb")
    notes = root / "notes" / "1"
    notes.mkdir(parents=True)
    (notes / "3.md").write_text(
        "# Fires on *of*\n\nSee [feature 4](4.html) and [docs](https://example.org/x?a=1&b=2).\n\n"
        "<script>alert(1)</script> [bad](javascript:alert(1)) ![pic](https://evil.example/p.png)\n")
    stats = render_site(store_path, root / "site", quiet=True)
    return store_path, root / "site", stats


def _features(store_path):
    con = duckdb.connect(str(store_path), read_only=True)
    try:
        keys = {s.sae_id: s.key for s in site_data.read_saes(con)}
        rows = con.execute("SELECT sae_id, feature, label FROM features ORDER BY sae_id, feature").fetchall()
    finally:
        con.close()
    return [(keys[sae_id], f, label) for sae_id, f, label in rows]


def test_a_page_for_every_feature_of_every_layer(built):
    store_path, site, stats = built
    features = _features(store_path)
    assert len(features) == 128 and stats["feature_pages"] == 128
    for key, f, _ in features:
        assert (site / "layers" / key / "features" / f"{f}.html").is_file(), (key, f)
    pages = sorted(site.glob("layers/*/features/*.html"))
    assert len(pages) == len(features)
    for path in ["index.html", "search/index.html", ".nojekyll", "site.json", "assets/atlas.css",
                 "assets/atlas.js", "assets/layer.js", "assets/search.js", "layers/1/index.html",
                 "layers/1/features.js", "layers/3/index.html"]:
        assert (site / path).exists(), path
    manifest = json.loads((site / "site.json").read_text())
    assert [s["key"] for s in manifest["saes"]] == ["1", "3"]


# Escaped text never contains "<" or a double quote, so every "<" starts real markup and
# every attr="..." is a real attribute: regexes are exact here, and much faster than a parser.
_ATTR = re.compile(r'\s(href|src|action|id)="([^"]*)"')


def test_every_internal_link_resolves_and_is_relative(built):
    _, site, _ = built
    checked = 0
    for page in site.rglob("*.html"):
        attrs = _ATTR.findall(page.read_text(encoding="utf-8"))
        ids = {value for name, value in attrs if name == "id"}
        for attr, url in ((name, value) for name, value in attrs if name != "id"):
            parts = urlsplit(url)
            if parts.scheme in ("http", "https", "mailto"):
                assert attr == "href", f"{page}: {attr}={url} would load from another host"
                continue
            assert not parts.scheme and not parts.netloc, f"{page}: non-relative link {url}"
            assert not url.startswith("/"), f"{page}: root-absolute link {url}"
            if parts.path:
                target = (page.parent / unquote(parts.path)).resolve()
                assert target.is_file(), f"{page}: {attr}={url} -> missing {target}"
            elif parts.fragment:
                assert parts.fragment in ids, f"{page}: missing anchor #{parts.fragment}"
            checked += 1
    assert checked > 128 * 5


def test_search_index_covers_every_feature(built):
    store_path, site, _ = built
    records = search.read_search_index(site / "search")
    assert {(r.layer_key, r.feature) for r in records} == {(k, f) for k, f, _ in _features(store_path)}
    by_id = {(r.layer_key, r.feature): r for r in records}
    for key, f, label in _features(store_path):
        assert by_id[key, f].label == (visible_text(label) if label else "")
    assert by_id["1", 0].label == visible_text(HOSTILE_LABEL)
    assert by_id["1", 5].tokens, "top tokens are indexed"


def test_search_index_shards_when_large(tmp_path):
    records = [search.SearchRecord("4", f, f"label {f}", ["·tok"], 0.5) for f in range(10)]
    shards = search.write_search_index(tmp_path, [("4", "Layer 4")], records, shard_size=4)
    assert shards == ["shard-000.js", "shard-001.js", "shard-002.js"]
    assert search.read_search_index(tmp_path) == records


def test_hostile_strings_are_visible_text_never_markup(built):
    _, site, _ = built
    for page in site.rglob("*.html"):
        raw = page.read_bytes()
        text = raw.decode("utf-8")
        assert b"\x00" not in raw and "\u202e" not in text and "\u200d" not in text, page
        assert not re.search(r"<img\b", text), page
        assert not re.search(r"<[^>]*\son\w+\s*=", text), f"{page}: an event-handler attribute"
        assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text), f"{page}: an inline script"
    page = (site / "layers/1/features/0.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;/script&gt;&lt;img·src=x·onerror=alert(1)&gt;" in page
    assert "{{7*7}}" in page and "\\x00" in page and "\\u202eevil" in page and "a\\u200db" in page
    assert "&#34;·onmouseover=&#34;alert(1)" in page
    # Data files are ASCII JSON: nothing in them can end a string or a script.
    for js in list(site.glob("search/*.js")) + list(site.glob("layers/*/features.js")):
        js.read_bytes().decode("ascii")
    index = (site / "index.html").read_text()
    assert "fineweb-edu sample &lt;script&gt;alert(1)&lt;/script&gt;" in index


def test_feature_page_content(built):
    _, site, _ = built
    page = (site / "layers/1/features/5.html").read_text()
    for needle in ['id="top"', 'id="intervals"', 'id="histograms"', 'id="logits"', 'id="neighbours"',
                   'rel="prev" href="4.html"', 'rel="next" href="6.html"', 'class="a8 c" data-v=',
                   "<svg", "Bin 4", "Decoder cosine", "Coactivation"]:
        assert needle in page, needle
    # The first SAE stores gain-corrected logit effects too: they are the ones shown, and the raw
    # ones (the same tokens, rescaled) are named in a note.
    assert "Shown: W_dec·W_U, gain-corrected" in page
    assert "raw W_dec·W_U (no final norm): the same tokens, values × 1.25" in page
    other = (site / "layers/3/features/5.html").read_text()
    assert "Shown: raw W_dec·W_U" in other and "gain-corrected" not in other
    dead = (site / "layers/1/features/63.html").read_text()
    assert "never fired" in dead and 'id="top"' not in dead and 'rel="next"' not in dead
    assert 'class="flag flag-dead"' in dead
    first = (site / "layers/1/features/0.html").read_text()
    assert 'rel="prev"' not in first


def test_logit_tables_show_every_kind_that_is_not_a_rescale():
    raw = [(1, 7, 0.5), (2, 8, 0.25), (-1, 9, -0.5)]
    flipped = [(1, 9, 0.4), (2, 3, 0.1), (-1, 7, -0.4)]  # a negative gain reorders the tokens
    vocab = [f"t{i}" for i in range(10)]
    tables = site_views.logit_tables({"raw": raw, "gain_corrected": flipped}, vocab)
    assert [(t.kind, t.shown) for t in tables] == [("gain_corrected", True), ("raw", False)]
    assert tables[0].pos == [("t9", "+0.400"), ("t3", "+0.100")] and tables[0].neg == [("t7", "-0.400")]
    scaled = [(r, t, v * -2.0) for r, t, v in raw]
    tables = site_views.logit_tables({"raw": raw, "gain_corrected": scaled}, vocab)
    assert len(tables) == 1 and tables[0].notes == ["raw W_dec·W_U (no final norm): the same tokens, values × -0.5"]


def test_notes_are_rendered_without_raw_html(built):
    _, site, _ = built
    page = (site / "layers/1/features/3.html").read_text()
    assert '<section class="card note" id="notes">' in page
    assert "<h1>Fires on <em>of</em></h1>" in page and '<a href="4.html">feature 4</a>' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "javascript:" not in page and "evil.example/p.png" in page and "<img" not in page
    assert '<a href="https://example.org/x?a=1&amp;b=2">docs</a>' in page
    note = note_html('[x](&#106;avascript:alert(1)) [y](java\tscript:alert(1)) <b onclick="x">b</b>')
    assert "<a>x</a>" in note and "&lt;b onclick" in note and 'href="java' not in note.replace(" ", "")


def test_render_is_deterministic(built, tmp_path):
    store_path, site, _ = built
    again = tmp_path / "again"
    render_site(store_path, again, notes_dir=store_path.parent / "notes", quiet=True)
    files = sorted(p.relative_to(site) for p in site.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (site / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_output_is_replaced_atomically_and_never_clobbers_other_folders(built, tmp_path):
    store_path, _, _ = built
    out = tmp_path / "site"
    render_site(store_path, out, quiet=True)
    (out / "stale.html").write_text("old")
    render_site(store_path, out, quiet=True)
    assert not (out / "stale.html").exists() and (out / "index.html").exists()
    assert sorted(os.listdir(tmp_path)) == ["site"], "no temp or old folders are left behind"

    with pytest.raises(FileNotFoundError, match="missing.duckdb"):
        render_site(tmp_path / "missing.duckdb", out, quiet=True)
    assert (out / "index.html").exists() and sorted(os.listdir(tmp_path)) == ["site"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        render_site(store_path, mine, quiet=True)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_average_feature_page_is_small_gzipped(tmp_path):
    # The miner's default profile: 20 top + 5 bins x 5 examples of 33-token windows.
    store_path = make_store(tmp_path / "f.duckdb", saes=(("blocks.2.hook_resid_post", 2, "hook_resid_post"),),
                            n_features=48, window=33, n_top=20, per_bin=5, n_neighbors=10, n_hist_bins=64)
    render_site(store_path, tmp_path / "site", quiet=True)
    pages = list((tmp_path / "site").glob("layers/2/features/*.html"))
    mean = sum(len(gzip.compress(p.read_bytes(), 6)) for p in pages) / len(pages)
    assert mean <= 15_000, mean


def test_layer_keys_stay_unique_for_shared_layers():
    rows = [{"sae_id": "blocks.4.hook_resid_post", "layer": 4, "hook": "hook_resid_post"},
            {"sae_id": "blocks.4.hook_resid_pre", "layer": 4, "hook": "hook_resid_pre"},
            {"sae_id": "blocks.6.hook_mlp_out/16k", "layer": 6, "hook": "hook_mlp_out"},
            {"sae_id": "blocks.6.hook_mlp_out/64k", "layer": 6, "hook": "hook_mlp_out"}]
    assert site_data.layer_keys(rows) == ["4", "4-resid_pre", "6-mlp_out-blocks.6.hook_mlp_out_16k",
                                          "6-mlp_out-blocks.6.hook_mlp_out_64k"]


def test_shared_layer_renders_two_directories(tmp_path):
    saes = (("blocks.2.hook_resid_post", 2, "hook_resid_post"), ("blocks.2.hook_resid_pre", 2, "hook_resid_pre"))
    store_path = make_store(tmp_path / "f.duckdb", saes=saes, n_features=8)
    render_site(store_path, tmp_path / "site", quiet=True)
    assert (tmp_path / "site/layers/2/features/7.html").exists()
    page = (tmp_path / "site/layers/2-resid_pre/features/7.html").read_text()
    assert "Layer 2 · resid_pre" in page


def test_old_stores_and_odd_rows_still_render(tmp_path):
    store_path = make_store(tmp_path / "f.duckdb", n_features=8)
    con = duckdb.connect(str(store_path))
    for column in ("flags", "label_precision", "label_recall", "min_act"):
        con.execute(f"ALTER TABLE features DROP COLUMN {column}")
    # a token id the vocab lacks, and a feature without logit effects or histograms
    con.execute("UPDATE examples SET token_ids = list_prepend(99999, token_ids), acts = list_prepend(0.5, acts), "
                "center = center + 1 WHERE feature = 2")
    con.execute("UPDATE features SET density = 'nan'::DOUBLE, max_act = NULL, label = NULL WHERE feature = 4")
    con.execute("DELETE FROM logit_effects WHERE feature = 3")
    con.execute("DELETE FROM histograms WHERE feature = 3")
    con.close()
    render_site(store_path, tmp_path / "site", quiet=True)
    assert "⟨99999⟩" in (tmp_path / "site/layers/1/features/2.html").read_text()
    page = (tmp_path / "site/layers/1/features/3.html").read_text()
    assert 'id="logits"' not in page and 'id="histograms"' not in page


def test_bad_stores_fail_with_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.duckdb"):
        render_site(tmp_path / "nope.duckdb", tmp_path / "site")
    store_path = make_store(tmp_path / "f.duckdb", n_features=4)
    con = duckdb.connect(str(store_path))
    con.execute("DELETE FROM saes")
    con.close()
    with pytest.raises(ValueError, match="no SAEs"):
        render_site(store_path, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_tokens_are_made_visible():
    assert visible_token(b" the\n") == "·the↵"
    assert visible_token(b"\tx\r") == "→x\\x0d"
    assert visible_token(b"\x00\x1b") == "\\x00\\x1b"
    assert visible_token("\u202eabc\u200b".encode()) == "\\u202eabc\\u200b"
    assert visible_token(b"\xe2\x82") == "\ufffd"
    assert visible_token(b"<|bos|>") == "<|bos|>"
    assert visible_token("\u00a0é".encode()) == "\\xa0é"
    assert visible_text("two words\nnext\u2066") == "two words↵next\\u2066"


def test_hover_values_match_python_formatting():
    rng = np.random.default_rng(1)
    values = np.concatenate([10 ** rng.uniform(-6, 7, 20_000), -(10 ** rng.uniform(-3, 3, 100)),
                             [0.0, np.nan, np.inf, 1e-4, 999.5, 0.9995, 99.95, 1e5, 99999.0]])
    values = np.concatenate([values, values.astype(np.float32)])
    assert site_views.act_strings(values) == [f"{v:.3g}" for v in values.tolist()]
