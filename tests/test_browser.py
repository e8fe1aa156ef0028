"""The atlas in a real browser (headless Debian Chromium driven by Playwright), opened from disk
(file://) and served under a project subpath as on GitHub Pages: navigate, sort, search, open
a feature, hover a token; no console errors, no failed or outside requests, no script from the
corpus ever runs."""

import functools
import http.server
import re
import threading
from pathlib import Path

import pytest

from atlas.render import render_site
from tests.atlas_fixtures import make_store

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    store_path = make_store(root / "features.duckdb", n_features=240)
    # served as http://127.0.0.1:PORT/atlas-project/ like a GitHub Pages project site
    out = root / "www" / "atlas-project"
    render_site(store_path, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/atlas-project/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Watch:
    """Everything that must not happen: console errors, page errors, failed or outside requests,
    dialogs (alert). A request cancelled because the test navigated on (net::ERR_ABORTED, e.g.
    the favicon of a page left at once) is not a failure; a missing file is (ERR_FILE_NOT_FOUND,
    or an HTTP error status)."""

    def __init__(self, page, base: str):
        self.problems = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: r.failure == "net::ERR_ABORTED"
                or self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on("request", lambda r: r.url.startswith((base, "data:")) or self.problems.append(f"outside: {r.url}"))
        page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))


def _base(mode: str, site: Path, server_url) -> str:
    return site.as_uri() + "/" if mode == "file" else server_url


@pytest.mark.parametrize("mode", ["file", "http"])
def test_browse_sort_search_open_hover(browser, site, server, mode):
    base = _base(mode, site, server)
    page = browser.new_page()
    watch = Watch(page, base)

    page.goto(base + "index.html")
    assert "feature atlas" in page.inner_text("h1")
    page.click("text=Layer 1")
    page.wait_for_url(re.compile(r"layers/1/index\.html"))
    page.wait_for_selector("#pageinfo:has-text('page 1 / 3')")  # 240 features, 100 per page
    assert page.locator("#ftable tbody tr").count() == 100

    page.click("th button[data-sort=density]")  # descending first
    page.wait_for_selector("th button[data-sort=density][aria-sort=descending]")
    densities = [float(t.rstrip("%")) for t in page.locator("#ftable tbody td.c-d").all_inner_texts()]
    assert densities == sorted(densities, reverse=True) and len(densities) == 100
    assert "sort=density" in page.url
    page.click("#nextpage")
    page.wait_for_selector("#pageinfo:has-text('page 2 / 3')")
    page.fill("#filter", "#17")
    page.wait_for_selector("#count:has-text('1 of 240')")

    page.fill("header input[type=search]", "script")
    page.press("header input[type=search]", "Enter")
    page.wait_for_url(re.compile(r"search/index\.html\?q=script"))
    page.wait_for_selector("#results li")
    assert page.locator("#results li").count() == 2  # feature 0 of both layers (hostile label)
    page.fill("#q", "L3/42")
    page.wait_for_selector("#status:has-text('1 match')")
    page.click("#results li a")
    page.wait_for_url(re.compile(r"layers/3/features/42\.html"))

    token = page.locator(".ctx span[data-v]").first
    value = token.get_attribute("data-v")
    token.hover()
    page.wait_for_selector(".tip", state="visible")
    assert f"activation {value}" in page.inner_text(".tip")

    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(r"features/43\.html"))
    page.keyboard.press("k")
    page.wait_for_url(re.compile(r"features/42\.html"))
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.name") == "q"
    page.close()
    assert watch.problems == []


@pytest.mark.parametrize("mode", ["file", "http"])
def test_hostile_corpus_renders_as_text_and_runs_nothing(browser, site, server, mode):
    base = _base(mode, site, server)
    page = browser.new_page()
    watch = Watch(page, base)
    page.goto(base + "layers/1/features/0.html")
    body = page.inner_text("body")
    for visible in ["<script>alert(1)</script>", "</script><img·src=x·onerror=alert(1)>", "{{7*7}}",
                    "\\x00", "\\u202eevil", "say <script>alert(1)</script> {{7*7}} \\u202edesrever\\x00"]:
        assert visible in body, visible
    assert "\u202e" not in body and "\x00" not in body
    assert page.locator("img").count() == 0
    assert page.evaluate("document.scripts.length") == 1  # only assets/atlas.js
    page.goto(base + "search/index.html?q=alert")
    page.wait_for_selector("#results li")
    assert "<script>alert(1)</script>" in page.inner_text("#results")
    page.goto(base + "layers/1/index.html#q=script")
    page.wait_for_selector("#count:has-text('1 of 240')")
    assert "<script>alert(1)</script>" in page.inner_text("#ftable")
    page.goto(base + "index.html")
    assert "fineweb-edu sample <script>alert(1)</script>" in page.inner_text("body")
    page.close()
    assert watch.problems == []


def test_feature_page_lays_out_examples_beside_the_sidebar(browser, site):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(site.as_uri() + "/layers/1/features/5.html")
    main, side = page.locator(".fmain").bounding_box(), page.locator(".fside").bounding_box()
    assert side["x"] >= main["x"] + main["width"] and abs(side["y"] - main["y"]) < 2
    assert page.evaluate("document.documentElement.scrollWidth") <= 1400  # nothing overflows sideways
    page.close()
