"""One report, two renderings: a small document model written out as markdown and as a single
self-contained HTML page (figures embedded as base64 PNG), so both say exactly the same.

Inline text is a sequence of plain strings and `Strong` / `Code` / `Link` spans; nothing is
parsed back out of markdown.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ticketsmith.gates import FAIL, PASS


@dataclass(frozen=True)
class Strong:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Link:
    text: str
    url: str | None      # None: shown as code (e.g. a run id without a web UI to link to)


Span = Union[str, Strong, Code, Link]
Inline = Union[Span, tuple]  # a span or a tuple of spans


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    parts: tuple


@dataclass(frozen=True)
class Bullets:
    items: tuple                 # each item: Inline


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple                  # rows of Inline cells
    numeric: tuple[int, ...] = ()   # right-aligned columns
    css: str = ""


@dataclass(frozen=True)
class Figure:
    path: str                    # relative to the report folder
    caption: str


Block = Union[Heading, Para, Bullets, Table, Figure]


def para(*parts: Span) -> Para:
    return Para(tuple(parts))


def _spans(x: Inline) -> tuple:
    return x if isinstance(x, tuple) else (x,)


# --- markdown ------------------------------------------------------------------------------

def _md_span(s: Span, in_table: bool) -> str:
    if isinstance(s, Strong):
        text = f"**{s.text}**"
    elif isinstance(s, Code):
        text = f"`{s.text}`"
    elif isinstance(s, Link):
        text = f"[`{s.text}`]({s.url})" if s.url else f"`{s.text}`"
    else:
        text = s
    return text.replace("|", "\\|") if in_table else text


def _md_inline(x: Inline, in_table: bool = False) -> str:
    return "".join(_md_span(s, in_table) for s in _spans(x))


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [_md_inline(b.parts), ""]
        elif isinstance(b, Bullets):
            out += [f"- {_md_inline(i)}" for i in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(b.header) + " |")
            out.append("|" + "|".join("---:" if i in b.numeric else "---"
                                      for i in range(len(b.header))) + "|")
            out += ["| " + " | ".join(_md_inline(c, True) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            out += [f"![{b.caption}]({b.path})", "", f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


# --- HTML ----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #bbb;padding:.3em .6em;vertical-align:top}th{background:#eee;text-align:left}
td.num{text-align:right;white-space:nowrap}tr:nth-child(even) td{background:#fafafa}
td.pass{color:#0a6b2b;font-weight:600}td.fail{color:#b00020;font-weight:600}
code{background:#f2f2f2;padding:0 .25em;border-radius:3px;font-size:.9em}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-style:italic;color:#444}
"""


def _html_span(s: Span) -> str:
    if isinstance(s, Strong):
        return f"<strong>{html.escape(s.text)}</strong>"
    if isinstance(s, Code):
        return f"<code>{html.escape(s.text)}</code>"
    if isinstance(s, Link):
        code = f"<code>{html.escape(s.text)}</code>"
        return f'<a href="{html.escape(s.url)}">{code}</a>' if s.url else code
    return html.escape(s)


def _html_inline(x: Inline) -> str:
    return "".join(_html_span(s) for s in _spans(x))


def _cell_class(i: int, cell: Inline, numeric: tuple[int, ...]) -> str:
    text = _md_inline(cell)
    classes = ["num"] if i in numeric else []
    if text.startswith(PASS):
        classes.append("pass")
    elif text.startswith(FAIL):
        classes.append("fail")
    return f' class="{" ".join(classes)}"' if classes else ""


def _html_block(b: Block, folder: Path) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p>{_html_inline(b.parts)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = "".join("<tr>" + "".join(f"<td{_cell_class(i, c, b.numeric)}>{_html_inline(c)}</td>"
                                        for i, c in enumerate(row)) + "</tr>" for row in b.rows)
        css = f' class="{b.css}"' if b.css else ""
        return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode((folder / b.path).read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
            f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")


def to_html(title: str, blocks: list[Block], folder: Path) -> str:
    """One HTML file with no external references: styles inline, figures as data URIs."""
    body = "\n".join(_html_block(b, folder) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
