"""Rendering the run report (`cakelm.report`): its building blocks (a Section of paragraphs, tables and images),
number formatting for table cells, matplotlib figures as PNG bytes, and one list of sections written two ways:
self-contained HTML (images as base64 data URIs, CSS inline, no scripts) and Markdown (images as files beside it).

    html_text = render_html("title", [Section("1. Run", [("p", "text"), ("table", ["a"], [["1"]])])])
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MISSING = "—"


@dataclass
class Section:
    """One report section: a title and blocks, each ("p", text) | ("note", text) | ("pre", text) |
    ("table", headers, rows) | ("img", file name, png bytes, alt text)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Formatting helpers


def fmt(x: Any, spec: str = ".3f") -> str:
    """A number for a table cell; a missing value (None, NaN, not a number) is the dash."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return MISSING
    return format(x, spec)


def pct(x: Any) -> str:
    """A rate in [0, 1] as a percentage (the dash when missing)."""
    return MISSING if fmt(x) == MISSING else f"{100 * x:.1f}%"


def figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight")  # (legends outside)
    plt.close(fig)
    return buf.getvalue()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Rendering: one list of sections, two formats

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
       margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; white-space: pre-wrap;
         overflow-wrap: anywhere; max-width: 32em; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; }
.note { color: #777; font-style: italic; } .sub { color: #666; }
"""


NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(%|x| s| MB)?")


def _is_num(cell: str) -> bool:
    """Right-align plain numbers (with a unit at most) in HTML tables."""
    return NUMBER.fullmatch(cell) is not None


def render_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for s in sections:
        out.append(f"<section><h2>{esc(s.title)}</h2>")
        for b in s.blocks:
            if b[0] in ("p", "note"):
                out.append(f'<p{" class=note" if b[0] == "note" else ""}>{esc(b[1])}</p>')
            elif b[0] == "pre":
                out.append(f"<pre>{esc(b[1])}</pre>")
            elif b[0] == "table":
                _, headers, rows = b
                out.append("<table>")
                if any(headers):
                    out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>")
                out.append("<tbody>" + "".join(
                    "<tr>" + "".join(f'<td{" class=num" if _is_num(c) else ""}>{esc(c)}</td>' for c in row) + "</tr>"
                    for row in rows) + "</tbody></table>")
            elif b[0] == "img":
                _, _, png, alt = b
                out.append(f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,'
                           f'{base64.b64encode(png).decode("ascii")}"></figure>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    # markdown renders raw HTML and a reply may contain some: escape & and < (enough to keep tags inert); pipes and
    # newlines are kept inside the table cell
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, sections: Sequence[Section], files: Path) -> str:
    """Markdown; images are written into `files` and linked relative to the markdown file's folder."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if b[0] == "p":
                out += [_md_cell(b[1]).replace("<br>", "\n"), ""]
            elif b[0] == "note":
                out += [f"*{_md_cell(b[1])}*", ""]
            elif b[0] == "pre":
                out += ["```", b[1], "```", ""]
            elif b[0] == "table":
                _, headers, rows = b
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif b[0] == "img":
                _, name, png, alt = b
                files.mkdir(parents=True, exist_ok=True)
                (files / name).write_bytes(png)
                out += [f"![{_md_cell(alt)}]({files.name}/{name})", ""]
    return "\n".join(out)
