"""
Hand-written feature notes: `notes/<key>/<feature>.md` -> safe HTML for the feature page.

<key> is the layer's site directory key (`4` for a resid_post SAE at layer 4, see
atlas/site_data.py), so `notes/4/123.md` annotates `layers/4/features/123.html`.

Notable choices
- Markdown with fenced code and tables; raw HTML is not passed through: the block and
  inline HTML processors are removed, so `<script>` in a note shows as text.
- Links keep only http(s), mailto and relative targets (no `javascript:` or `data:`).
- Images become plain links: the site makes no request to another host, and a note's
  relative image would not be copied into the site anyway.
"""

from __future__ import annotations

import html
import sys
import xml.etree.ElementTree as etree
from pathlib import Path
from urllib.parse import urlsplit

import markdown
from markdown.treeprocessors import Treeprocessor
from markupsafe import Markup

_SAFE_SCHEMES = {"", "http", "https", "mailto"}


def find_notes(notes_dir: Path | None, key: str, features: set[int], quiet: bool = False) -> dict[int, Path]:
    """Note files of one layer key, by feature; files naming no existing feature are reported."""
    if notes_dir is None or not (notes_dir / key).is_dir():
        return {}
    found = {}
    for path in sorted((notes_dir / key).glob("*.md")):
        if path.stem.isdigit() and int(path.stem) in features:
            found[int(path.stem)] = path
        elif not quiet:
            print(f"note {path} ignored: layer {key} has no feature {path.stem!r}", file=sys.stderr)
    return found


def note_html(text: str) -> Markup:
    """Markdown -> HTML with raw HTML removed and links restricted (see module docstring)."""
    md = markdown.Markdown(extensions=["fenced_code", "tables"], output_format="html")
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_SafeLinks(md), "atlas_safe_links", 0)
    return Markup(md.convert(text))


class _SafeLinks(Treeprocessor):
    def run(self, root: etree.Element) -> None:
        for el in root.iter():
            if el.tag == "img":
                src, alt = el.get("src", ""), el.get("alt", "") or el.get("src", "")
                el.attrib.clear()
                el.tag, el.text = "a", f"[image: {alt}]"
                if _safe_url(src):
                    el.set("href", src)
            elif el.tag == "a" and not _safe_url(el.get("href", "")):
                el.attrib.pop("href", None)


def _safe_url(url: str) -> bool:
    # Markdown keeps character references in attributes ("&#106;avascript:"), and the browser
    # decodes them, so the decoded form is the one that must be safe.
    return all(_safe_scheme(u) for u in (url, html.unescape(url)))


def _safe_scheme(url: str) -> bool:
    url = url.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url) or any(c.isspace() for c in url.split(":", 1)[0]):
        return False  # browsers drop tabs and newlines inside a scheme ("java\tscript:")
    try:
        return urlsplit(url).scheme.lower() in _SAFE_SCHEMES
    except ValueError:
        return False
