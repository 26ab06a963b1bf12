"""Pictures and the report: matplotlib figures (:mod:`.figures`), the self-contained HTML report
(:mod:`.html`), attention maps of a text (:mod:`.maps`) and the data they share (:mod:`.data`).

Submodules load on first use, so ``import headatlas.report`` does not import matplotlib or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.lazy import lazy_getattr

_EXPORTS = {
    "write_figures": "headatlas.report.figures",
    "attention_figure": "headatlas.report.figures",
    "grid_figure": "headatlas.report.figures",
    "render_report": "headatlas.report.html",
    "write_report": "headatlas.report.html",
    "text_attention": "headatlas.report.maps",
    "TextAttention": "headatlas.report.maps",
}

__all__ = [
    "TextAttention",
    "attention_figure",
    "grid_figure",
    "render_report",
    "text_attention",
    "write_figures",
    "write_report",
]

if TYPE_CHECKING:
    from .figures import attention_figure, grid_figure, write_figures
    from .html import render_report, write_report
    from .maps import TextAttention, text_attention


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
