"""Pictures and tables of similarity results, for people to judge the index by eye.

A recall number says *whether* search works; a contact sheet says *how* it fails (wrong
colour? wrong shape? background matched instead of the item?). Three views of the same
rows: a PNG contact sheet, a self-contained HTML page (one file to attach or open offline)
and a rich table for the terminal.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps
from rich.table import Table
from rich.text import Text

ImageLike = bytes | Image.Image | None  # None: the hit's image could not be fetched

# Contact sheet geometry (pixels); ``sheet_size`` turns it into the PNG's size.
PAD = 6  # around each thumbnail, inside its cell
BORDER = 4  # green (same product) / grey frame drawn in the padding
GAP = 14  # between the query column and the hits
LINE_GAP = 2

SAME = (46, 158, 68)  # green: a photo of the query's own product
OTHER = (176, 176, 176)  # grey: some other product
QUERY = (48, 96, 192)  # blue: the query itself
CELL_BG = (255, 255, 255)
LETTERBOX = (226, 226, 226)  # shows where a white-background photo ends
SHEET_BG = (236, 236, 236)
TEXT = (32, 32, 32)
MUTED = (110, 110, 110)


@dataclass(frozen=True)
class Hit:
    """One search result; ``same_product`` None means unknown (then the query's id decides)."""

    product_id: str
    image: ImageLike = field(repr=False)
    score: float
    same_product: bool | None = None


@dataclass(frozen=True)
class QueryResult:
    """A query photo and its top-k hits, best first.

    ``product_id`` is the product the query photo shows, when known: it marks which hits
    are right without every caller computing ``same_product`` itself.
    """

    query: ImageLike = field(repr=False)
    label: str
    hits: list[Hit]
    product_id: str | None = None

    def is_same(self, hit: Hit) -> bool | None:
        """Whether ``hit`` shows the query's product (None: nobody said)."""
        if hit.same_product is not None:
            return hit.same_product
        if self.product_id is None:
            return None
        return hit.product_id == self.product_id


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font: no font files to ship; bitmap fallback without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _font_size(thumb: int) -> int:
    return max(10, min(18, thumb // 10))


def _caption_height(thumb: int) -> int:
    return 2 * (_font_size(thumb) + LINE_GAP) + PAD


def sheet_size(n_rows: int, n_hits: int, *, thumb: int = 128) -> tuple[int, int]:
    """The contact sheet's (width, height) for ``n_rows`` queries and up to ``n_hits`` hits."""
    cell_w = thumb + 2 * PAD
    cell_h = thumb + 2 * PAD + _caption_height(thumb)
    return (cell_w * (1 + n_hits) + GAP, cell_h * n_rows)


def _open(image: ImageLike) -> Image.Image | None:
    """Decode to RGB, upright; None when there is nothing (or nothing readable) to show."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    try:
        img = Image.open(io.BytesIO(image))
        img.draft("RGB", (512, 512))  # JPEG: decode at reduced scale, much faster for big photos
        return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _thumbnail(image: ImageLike, thumb: int) -> Image.Image:
    """The image letterboxed into a ``thumb`` square, or a labelled placeholder."""
    cell = Image.new("RGB", (thumb, thumb), LETTERBOX)
    img = _open(image)
    if img is None:
        d = ImageDraw.Draw(cell)
        d.rectangle((0, 0, thumb - 1, thumb - 1), fill=(205, 205, 205))
        d.text((thumb // 2, thumb // 2), "no image", fill=MUTED, font=_font(_font_size(thumb)), anchor="mm")
        return cell
    img = ImageOps.contain(img, (thumb, thumb), Image.Resampling.LANCZOS)
    cell.paste(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
    return cell


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """Cut ``text`` with an ellipsis so it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


# --------------------------------------------------------------------------- contact sheet


def contact_sheet(rows: Sequence[QueryResult], out_png: Path, *, thumb: int = 128) -> Path:
    """One row per query: the query photo (blue frame), then its hits best first.

    A hit of the query's own product gets a green frame, any other a grey one, so a glance
    tells how high the right product ranks and what the wrong ones have in common.
    """
    n_hits = max((len(r.hits) for r in rows), default=0)
    width, height = sheet_size(len(rows), n_hits, thumb=thumb)
    sheet = Image.new("RGB", (max(width, 1), max(height, 1)), SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    font = _font(_font_size(thumb))
    line_h = _font_size(thumb) + LINE_GAP
    cell_w = thumb + 2 * PAD
    cell_h = thumb + 2 * PAD + _caption_height(thumb)

    def cell(x: int, y: int, image: ImageLike, frame: tuple[int, int, int], lines: list[tuple[str, tuple[int, int, int]]]) -> None:
        draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=CELL_BG)  # 1 px grid lines
        draw.rectangle(
            (x + PAD - BORDER, y + PAD - BORDER, x + PAD + thumb + BORDER - 1, y + PAD + thumb + BORDER - 1),
            fill=frame,
        )
        sheet.paste(_thumbnail(image, thumb), (x + PAD, y + PAD))
        ty = y + 2 * PAD + thumb
        for text, colour in lines:
            draw.text((x + PAD, ty), _fit(text, font, thumb), fill=colour, font=font)
            ty += line_h

    for r, row in enumerate(rows):
        y = r * cell_h
        cell(0, y, row.query, QUERY, [("query", QUERY), (row.label, MUTED)])
        for k, hit in enumerate(row.hits):
            same = row.is_same(hit)
            cell(
                cell_w * (1 + k) + GAP,
                y,
                hit.image,
                SAME if same else OTHER,
                [(f"{k + 1}. {hit.product_id}", SAME if same else TEXT), (f"score {hit.score:.3f}", MUTED)],
            )
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, "PNG", optimize=False)
    return out_png


# --------------------------------------------------------------------------- HTML


def _data_uri(image: ImageLike, thumb: int) -> str:
    buf = io.BytesIO()
    _thumbnail(image, thumb).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} .summary{color:#666;margin:0 0 20px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:0 0 16px;
 display:flex;gap:20px;align-items:flex-start}
section h2{font-size:15px;margin:0 0 6px} .query img{border:4px solid #3060c0}
table{border-collapse:collapse} th,td{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
th{color:#666;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.same td{background:#e7f5ea} tr.same img{outline:3px solid #2e9e44}
td img{display:block;width:64px;height:64px}
"""


def html_summary(rows: Sequence[QueryResult]) -> str:
    """``6 queries scored · hit@1 50% · hit@5 83% · 1 row without a right answer``: the count
    is the rows behind the rates, not every row on the page (a "similar items" row has no truth)."""
    scored = sum(_knows_truth(r) for r in rows)
    parts = [f"{scored} quer{'y' if scored == 1 else 'ies'} scored"]
    for k in (1, 5):
        rate = hit_rate_at_k(rows, k)
        if rate is not None:
            parts.append(f"hit@{k} {rate:.0%}")
    if rest := len(rows) - scored:
        parts.append(f"{rest} row{'' if rest == 1 else 's'} without a right answer (similar items)")
    return " · ".join(parts)


def html_report(rows: Sequence[QueryResult], out_html: Path, *, title: str, thumb: int = 160) -> Path:
    """A single self-contained HTML file: images inlined as base64 JPEG, no external assets."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    summary = [html_summary(rows)]
    parts.append(f'<p class="summary">{html.escape(" · ".join(summary))}</p>')
    for row in rows:
        parts.append("<section>")
        parts.append(
            f'<div class="query"><h2>{html.escape(row.label)}</h2>'
            f'<img alt="query" width="{thumb}" height="{thumb}" src="{_data_uri(row.query, thumb)}">'
        )
        if row.product_id:
            parts.append(f"<div>shows <b>{html.escape(row.product_id)}</b></div>")
        parts.append("</div>")
        parts.append("<table><thead><tr><th>rank</th><th>image</th><th>product</th><th>score</th></tr></thead><tbody>")
        for k, hit in enumerate(row.hits, start=1):
            cls = ' class="same"' if row.is_same(hit) else ""
            parts.append(
                f"<tr{cls}><td class=num>{k}</td>"
                f'<td><img alt="{html.escape(hit.product_id)}" src="{_data_uri(hit.image, 128)}"></td>'
                f"<td>{html.escape(hit.product_id)}</td><td class=num>{hit.score:.4f}</td></tr>"
            )
        if not row.hits:
            parts.append('<tr><td colspan="4">no hits</td></tr>')
        parts.append("</tbody></table></section>")
    parts.append("</body></html>")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text("\n".join(parts), encoding="utf-8")
    return out_html


# --------------------------------------------------------------------------- terminal


def _knows_truth(row: QueryResult) -> bool:
    return row.product_id is not None or any(h.same_product is not None for h in row.hits)


def hit_rate_at_k(rows: Sequence[QueryResult], k: int) -> float | None:
    """Share of queries with their own product among the top ``k`` (None: unknown for all)."""
    known = [r for r in rows if _knows_truth(r)]
    if not known:
        return None
    return sum(any(r.is_same(h) for h in r.hits[:k]) for r in known) / len(known)


def results_table(rows: Sequence[QueryResult], *, title: str = "similarity results") -> Table:
    """One line per query, one column per rank (product over score): the right product in green."""
    n_hits = max((len(r.hits) for r in rows), default=0)
    table = Table(title=title, show_lines=True)
    table.add_column("query", style="bold", overflow="fold", max_width=28)
    for k in range(1, n_hits + 1):
        table.add_column(f"#{k}", no_wrap=True)
    for row in rows:
        cells: list[Text | str] = [row.label]
        for hit in row.hits:
            same = row.is_same(hit)
            style = "bold green" if same else ("dim" if same is False else "")
            cells.append(Text(f"{hit.product_id}\n{hit.score:.3f}", style=style))
        cells += [""] * (n_hits - len(row.hits))
        table.add_row(*cells)
    k = min(5, max(n_hits, 1))
    known = [r for r in rows if _knows_truth(r)]
    if known:
        table.caption = (
            f"hit@1 {hit_rate_at_k(known, 1):.0%} · hit@{k} {hit_rate_at_k(known, k):.0%} over {len(known)} queries with a known product"
        )
    return table
