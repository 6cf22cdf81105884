"""Small HTML pieces the report's sections share: a matplotlib figure as PNG bytes and as an
embedded ``<figure>``, a paired contrast in points, and a plain table."""

from __future__ import annotations

import base64
import html
import io

__all__ = ["figure_html", "figure_png", "html_table", "pts"]


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def figure_html(caption: str, png: bytes) -> str:
    """PNG bytes as an embedded (base64) ``<figure>`` with its caption."""
    b64 = base64.b64encode(png).decode()
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
    )


def pts(e: dict[str, float]) -> str:
    """A paired contrast (``value``, ``lo``, ``hi`` as fractions) in signed points."""
    return f"{100 * e['value']:+.2f} [{100 * e['lo']:+.2f}, {100 * e['hi']:+.2f}]"


def html_table(headers: list[str], body: list[list[str]], css: str = "") -> str:
    """A plain table, every header and cell escaped (``css``: its class, if any)."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body
    )
    cls = f" class='{css}'" if css else ""
    return f"<table{cls}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
