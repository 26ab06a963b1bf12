"""The self-contained HTML report, and the page shell the live viewer shares with it.

One file: the CSS and JS are real files in ``headatlas/report/assets`` read with
:mod:`importlib.resources` and inlined; the data is inlined as JSON in a
``<script type="application/json">`` block, with ``<``, ``>``, ``&`` and ``/`` escaped so no token
can close the block. The page never builds markup from data (``textContent`` only), and its
Content-Security-Policy allows exactly the inlined script (by hash) and no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..atlas.table import Atlas
from ..core.storage import write_text
from .data import DEFAULT_MAX_EXAMPLE_BYTES, atlas_payload

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
_PLACEHOLDER = re.compile(r"\{\{([A-Z]+)\}\}")


def asset(name: str) -> str:
    """Return the text of ``headatlas/report/assets/<name>``."""
    return resources.files("headatlas.report").joinpath("assets", name).read_text(encoding="utf-8")


def script_json(value: Any) -> str:
    """Return ``value`` as JSON safe to place inside a ``<script>`` element.

    ASCII only, no NaN, and ``< > & /`` written as escapes, so no string can end the element
    or look like a URL.
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("/", "\\/")):
        text = text.replace(char, escape)
    return text


def fill(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{NAME}}`` in ``template`` in one pass (inserted text is never re-scanned)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def script_hash(script: str) -> str:
    """Return the CSP source ``'sha256-…'`` that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(script: str, connect_self: bool = False) -> str:
    """CSP for a page whose only code is ``script``: no network except, when asked, its own origin."""
    parts = [
        "default-src 'none'",
        f"script-src {script_hash(script)}",
        "style-src 'unsafe-inline'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
    ]
    if connect_self:
        parts.append("connect-src 'self'")
    return "; ".join(parts)


def page_script(*names: str) -> str:
    """Concatenate the named JS assets into one inline script."""
    script = "\n".join(asset(name) for name in names)
    if "</script" in script.lower():
        raise RuntimeError("an asset contains '</script': it cannot be inlined")
    return script


def render_report(atlas: Atlas, max_example_bytes: int = DEFAULT_MAX_EXAMPLE_BYTES) -> str:
    """Return the report of ``atlas`` as one HTML document (no external references)."""
    payload = atlas_payload(atlas, max_example_bytes)
    script = page_script("common.js", "report.js")
    title = str(payload["model"].get("name") or "atlas")
    return fill(
        asset("report.html"),
        {
            "CSP": html.escape(content_security_policy(script), quote=False).replace('"', "&quot;"),
            "VERSION": html.escape(__version__),
            "TITLE": html.escape(title),
            "STYLE": asset("style.css"),
            "DATA": script_json(payload),
            "SCRIPT": script,
        },
    )


def write_report(
    atlas: Atlas,
    directory: str | Path,
    out: str | Path | None = None,
    figures: bool = True,
    max_example_bytes: int = DEFAULT_MAX_EXAMPLE_BYTES,
) -> Path:
    """Write ``report.html`` (or ``out``) and, with ``figures``, ``DIR/figures/``; return the report path.

    The report is written to a temporary file and renamed, so a reader never sees half of it.
    """
    target = Path(out) if out is not None else Path(directory) / REPORT_FILE
    write_text(target, render_report(atlas, max_example_bytes))
    logger.info("wrote %s (%d bytes)", target, target.stat().st_size)
    if figures:
        from .figures import write_figures

        write_figures(atlas, Path(directory) / FIGURES_DIR)
    return target
