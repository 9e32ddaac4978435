"""Small fixes to the built site, found by the browser tests (tests/test_site.py).

Written here because no extension does these: each is a few lines.

* Jupyter Book 1 runs sphinx-thebe's set-up twice, so every page declares
  ``const THEBE_JS_URL`` twice and the browser console shows a SyntaxError.
  (once with filename None, once with ''), so Sphinx's own de-duplication misses
  them. Drop script entries with the same source and attributes.
* Serve ``book/_static`` (dark-mode CSS, favicon) next to the theme's files.
"""

from __future__ import annotations

import pathlib

STATIC = pathlib.Path(__file__).resolve().parents[1] / "_static"


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        attrs = getattr(js, "attributes", {}) or {}
        key = (getattr(js, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def _add_static(app, config):
    config.html_static_path.append(str(STATIC))


def setup(app):
    app.connect("config-inited", _add_static)
    app.add_css_file("site.css")
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
