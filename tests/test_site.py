"""The built book, tested the way a reader uses it: in a real browser.

Playwright drives the system Chromium (never `playwright install`) against
`_build/html`, served by a local http.server on 127.0.0.1. Run after the book build
(`make test` does). Without a browser or a build these tests skip, except under CI
(CI=true) or SITE_TESTS=required, where they fail: CI must not skip them.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import os
import pathlib
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("SITE_TESTS") == "required"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _toc_pages() -> list[str]:
    pages = [TOC["root"]]
    for part in TOC.get("parts", []):
        for ch in part.get("chapters", []):
            pages.append(ch["file"])
            pages += [s["file"] for s in ch.get("sections", [])]
    return [p.removesuffix(".md").removesuffix(".ipynb") for p in pages]


PAGES = _toc_pages()
NOTEBOOK_PAGES = [p for p in PAGES if p.startswith("notebooks/")]


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_PATH"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").exists():
        _unavailable("the book is not built: run `make book` first")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(HTML)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        _unavailable("no Chromium found: `apt-get install -y chromium` (make test does this as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class _Page:
    """A loaded page with everything the browser complained about."""

    def __init__(self, browser, url: str, color_scheme: str = "light"):
        self.page = browser.new_page(color_scheme=color_scheme, viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.bad_responses: list[str] = []
        self.external_requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("response", lambda r: r.status >= 400 and self.bad_responses.append(f"{r.status} {r.url}"))
        self.page.on("request", self._on_request)
        self.page.goto(url, wait_until="load")
        self.page.wait_for_load_state("networkidle")
        if self.page.evaluate("() => !!(window.MathJax && MathJax.startup && MathJax.startup.promise)"):
            self.page.evaluate("() => MathJax.startup.promise")

    def _on_request(self, request):
        host = urllib.parse.urlparse(request.url).hostname
        if request.url.startswith("http") and host != "127.0.0.1":
            self.external_requests.append(request.url)

    def close(self):
        self.page.close()


@pytest.fixture
def open_page(browser, base_url):
    opened = []

    def _open(page: str, **kw) -> _Page:
        p = _Page(browser, f"{base_url}/{page}", **kw)
        opened.append(p)
        return p

    yield _open
    for p in opened:
        p.close()


def test_root_index_redirects_to_the_intro(open_page):
    p = open_page("index.html")
    assert p.page.url.endswith(f"/{TOC['root']}.html"), p.page.url


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_cleanly_with_typeset_math_and_images(open_page, page):
    p = open_page(f"{page}.html")
    assert p.errors == [], f"{page}: browser errors {p.errors}"
    assert p.bad_responses == [], f"{page}: failed requests {p.bad_responses}"
    assert p.external_requests == [], f"{page}: requests left the machine: {p.external_requests}"
    # Every image decoded.
    broken = p.page.evaluate(
        "() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    )
    assert broken == [], f"{page}: images that did not load: {broken}"
    # MathJax typeset every formula: no raw TeX delimiters left in the visible prose.
    prose = p.page.evaluate(
        """() => { const a = document.querySelector('article').cloneNode(true);
                   a.querySelectorAll('pre, code, .cell_output, script, style').forEach(e => e.remove());
                   return a.innerText; }"""
    )
    for delim in ("$$", "\\(", "\\[", "\\begin{"):
        assert delim not in prose, f"{page}: raw {delim!r} left in visible text"
    n_math = p.page.evaluate("() => document.querySelectorAll('article .math').length")
    if n_math:
        n_typeset = p.page.evaluate("() => document.querySelectorAll('article .math mjx-container').length")
        assert n_typeset >= n_math, f"{page}: {n_math - n_typeset} of {n_math} formulas not typeset"


def test_math_pages_have_mjx_containers(open_page):
    p = open_page("book/notation.html")
    assert p.page.locator("mjx-container").count() > 10


@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_notebook_page_has_one_correct_colab_link_and_a_download(open_page, page):
    p = open_page(f"{page}.html")
    repo = urllib.parse.urlparse(CONFIG["repository"]["url"]).path.strip("/")
    branch = CONFIG["repository"].get("branch", "main")
    expected = f"https://colab.research.google.com/github/{repo}/blob/{branch}/{page}.ipynb"
    colab = p.page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
    assert colab == [expected], f"{page}: Colab links {colab}, expected exactly [{expected}]"
    downloads = p.page.eval_on_selector_all("a[href$='.ipynb']:not([href*='colab'])", "els => els.map(e => e.href)")
    assert any(d.endswith(f"{pathlib.PurePosixPath(page).name}.ipynb") for d in downloads), downloads
    assert p.page.locator("a[href*='github.com/']").count() >= 1  # repository button


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.hrefs.append(a["src"])
        if tag == "link" and a.get("href"):
            self.hrefs.append(a["href"])


def _parse(path: pathlib.Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_and_anchors_resolve(base_url):
    """Every internal href, src and anchor on every page resolves under the local server."""
    parsed: dict[str, _Links] = {}
    status_of: dict[str, int] = {}
    problems, checked = [], 0
    for page in PAGES:
        src = HTML / f"{page}.html"
        links = parsed.setdefault(page, _parse(src))
        for href in links.hrefs:
            url = urllib.parse.urljoin(f"{base_url}/{page}.html", href)
            if not url.startswith(base_url):
                continue
            target, _, anchor = url.partition("#")
            target = target.split("?")[0]
            if target not in status_of:  # the theme's assets recur on every page
                try:
                    with urllib.request.urlopen(target) as r:
                        status_of[target] = r.status
                except urllib.error.HTTPError as e:
                    status_of[target] = e.code
            status = status_of[target]
            checked += 1
            if status != 200:
                problems.append(f"{page}: {href} -> {status}")
                continue
            if anchor and target.endswith(".html"):
                rel = urllib.parse.unquote(target[len(base_url) + 1:]).removesuffix(".html")
                ids = parsed.setdefault(rel, _parse(HTML / f"{rel}.html")).ids
                if urllib.parse.unquote(anchor) not in ids:
                    problems.append(f"{page}: {href} -> no element with id {anchor!r}")
    assert checked > 50
    assert problems == [], "\n".join(problems)


def test_search_finds_the_softmax_chapter(open_page):
    p = open_page("search.html?q=softmax")
    p.page.wait_for_selector("#search-results li a", timeout=20_000)
    results = p.page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.href)")
    assert any("softmax" in r for r in results), f"search results for softmax: {results}"


def test_dark_mode_keeps_figures_on_white(open_page):
    page = next((pg for pg in NOTEBOOK_PAGES if (HTML / f"{pg}.html").read_text().count("<img") > 1), None)
    if page is None:
        pytest.skip("no notebook page with figures yet")
    p = open_page(f"{page}.html", color_scheme="dark")
    p.page.evaluate("() => { document.documentElement.dataset.theme = 'dark'; document.documentElement.dataset.mode = 'dark'; }")
    assert p.page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    style = p.page.evaluate(
        "() => { const s = getComputedStyle(document.querySelector('.cell_output img'));"
        " return [s.backgroundColor, s.filter]; }"
    )
    assert style == ["rgb(255, 255, 255)", "none"], f"figure background and filter in dark mode: {style}"


def test_book_opens_from_disk_with_maths(browser):
    """Opened over file:// in a classroom without internet, the maths still renders."""
    if not (HTML / "book" / "notation.html").exists():
        _unavailable("the book is not built")
    p = _Page(browser, (HTML / "book" / "notation.html").as_uri())
    try:
        assert p.external_requests == []
        assert p.page.locator("mjx-container").count() > 10
    finally:
        p.close()


def _screenshot_pages() -> list[str]:
    wanted = ["notebooks/03_softmax", "notebooks/05_masking", "book/notation"]
    chosen = [w for w in wanted if w in PAGES]
    for extra in NOTEBOOK_PAGES + PAGES:
        if len(chosen) >= 3:
            break
        if extra not in chosen:
            chosen.append(extra)
    return chosen


def test_screenshots_of_representative_pages(open_page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for page in _screenshot_pages():
        p = open_page(f"{page}.html")
        out = SCREENSHOTS / (re.sub(r"[^A-Za-z0-9_]+", "_", page) + ".png")
        p.page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 10_000, f"{out} looks empty"
