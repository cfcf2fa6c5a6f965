"""Parse a run's report.html with Python's html.parser and check it is one well-formed,
self-contained page.

    python3 tests/py/check_report.py RUN_DIR/report.html

Checks: every non-void element is closed in order; the sections summary, curves, eval, preview,
throughput, exports and config are there; nothing is loaded from elsewhere (no <script>, <link>,
no src/href that is not a data: URI or a fragment); every <img> is an inline PNG that decodes.
Prints one JSON line: {"sections": [...], "svg": n, "images": [[w, h], ...], "tables": n,
"text": {section: its text}}.
"""
import base64
import io
import json
import sys
from html.parser import HTMLParser

from PIL import Image

VOID = {"meta", "img", "br", "hr", "input", "link", "area", "base", "col", "source", "wbr"}
# SVG children written self-closing.
SELF_CLOSING_OK = {"rect", "line", "circle", "polyline", "path"}


class Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.sections, self.svg, self.tables, self.images = [], [], 0, 0, []
        self.text, self.current = {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "iframe", "object", "embed"):
            raise SystemExit(f"<{tag}> in a self-contained page")
        for k in ("src", "href"):
            v = a.get(k)
            if v is not None and not (v.startswith("data:") or v.startswith("#")):
                raise SystemExit(f"<{tag} {k}={v!r}> points outside the page")
        if tag == "section":
            self.sections.append(a.get("id"))
            self.current = a.get("id")
            self.text[self.current] = ""
        if tag == "svg":
            self.svg += 1
        if tag == "table":
            self.tables += 1
        if tag == "img":
            src = a.get("src", "")
            head, _, data = src.partition(",")
            if head != "data:image/png;base64":
                raise SystemExit(f"<img> is not an inline PNG: {head}")
            self.images.append(list(Image.open(io.BytesIO(base64.b64decode(data, validate=True))).size))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID and tag not in SELF_CLOSING_OK:
            raise SystemExit(f"<{tag}/> self-closed")
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            raise SystemExit(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        self.stack.pop()
        if tag == "section":
            self.current = None

    def handle_data(self, data):
        if self.current:
            self.text[self.current] += data


def main():
    p = Page()
    p.feed(open(sys.argv[1], encoding="utf-8").read())
    p.close()
    if p.stack:
        raise SystemExit(f"unclosed: {p.stack}")
    print(json.dumps({"sections": p.sections, "svg": p.svg, "images": p.images, "tables": p.tables, "text": p.text}))


if __name__ == "__main__":
    main()
