"""Contact sheet, HTML page and terminal table of similarity results."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from devkit.report import (
    BORDER,
    GAP,
    OTHER,
    PAD,
    QUERY,
    SAME,
    Hit,
    QueryResult,
    contact_sheet,
    hit_rate_at_k,
    html_report,
    results_table,
    sheet_size,
)

RED, BLUE, YELLOW = (220, 30, 30), (30, 60, 220), (230, 210, 20)


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def rows() -> list[QueryResult]:
    return [
        QueryResult(
            Image.new("RGB", (200, 300), RED),
            "street photo of sku-1",
            [Hit("sku-1", _jpeg(RED), 0.93), Hit("sku-2", _jpeg(BLUE), 0.71), Hit("sku-3", None, 0.5)],
            product_id="sku-1",
        ),
        QueryResult(
            _jpeg(YELLOW),
            "<b>unknown</b> query",
            [Hit("sku-4", b"not a jpeg", 0.42, same_product=False), Hit("sku-5", _jpeg(YELLOW), 0.4, same_product=True)],
        ),
    ]


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_contact_sheet_layout_and_frames(tmp_path: Path, rows: list[QueryResult]) -> None:
    thumb = 96
    out = contact_sheet(rows, tmp_path / "sub" / "sheet.png", thumb=thumb)
    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == "PNG"
        sheet = im.convert("RGB")
    assert sheet.size == sheet_size(2, 3, thumb=thumb)
    assert sheet.width == 4 * (thumb + 2 * PAD) + GAP
    cell_w, cell_h = thumb + 2 * PAD, sheet.height // 2
    # the query thumbnail sits at the top-left, framed in the query colour
    assert _close(sheet.getpixel((PAD + thumb // 2, PAD + thumb // 2)), RED)
    assert sheet.getpixel((PAD - BORDER // 2, PAD + thumb // 2)) == QUERY

    def frame(row: int, k: int) -> tuple[int, ...]:
        return sheet.getpixel((GAP + cell_w * (1 + k) + PAD - BORDER // 2, row * cell_h + PAD + thumb // 2))

    def centre(row: int, k: int) -> tuple[int, ...]:
        return sheet.getpixel((GAP + cell_w * (1 + k) + PAD + thumb // 2, row * cell_h + PAD + thumb // 2))

    assert frame(0, 0) == SAME and _close(centre(0, 0), RED)  # same product: green frame
    assert frame(0, 1) == OTHER and _close(centre(0, 1), BLUE)  # another product: grey
    assert frame(0, 2) == OTHER  # missing image: a placeholder, not a crash
    assert frame(1, 0) == OTHER and frame(1, 1) == SAME  # explicit same_product flags win
    assert _close(sheet.getpixel((cell_w // 2, cell_h + PAD + thumb // 2)), YELLOW)


def test_contact_sheet_of_nothing(tmp_path: Path) -> None:
    out = contact_sheet([], tmp_path / "empty.png")
    with Image.open(out) as im:
        assert im.size[0] >= 1


def test_html_report_is_self_contained(tmp_path: Path, rows: list[QueryResult]) -> None:
    out = html_report(rows, tmp_path / "r.html", title="Results <today>")
    page = out.read_text(encoding="utf-8")
    for pid in ("sku-1", "sku-2", "sku-3", "sku-4", "sku-5"):
        assert pid in page
    assert "<title>Results &lt;today&gt;</title>" in page
    assert "<b>unknown</b>" not in page and "&lt;b&gt;unknown&lt;/b&gt;" in page  # labels are escaped
    images = re.findall(r'<img [^>]*src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 + 5  # two queries, five hits
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as im:
        assert im.format == "JPEG"
    assert "http://" not in page and "https://" not in page  # nothing to fetch when opened offline
    assert page.count('class="same"') == 2
    assert "hit@1 50%" in page  # query 1 right at rank 1, query 2 only at rank 2


def test_results_table_and_hit_rate(rows: list[QueryResult]) -> None:
    console = Console(record=True, width=140, color_system=None)
    console.print(results_table(rows))
    text = console.export_text()
    for pid in ("sku-1", "sku-3", "sku-5"):
        assert pid in text
    assert "0.930" in text and "#3" in text
    assert "hit@1 50%" in text and "hit@3 100%" in text
    assert hit_rate_at_k(rows, 1) == 0.5
    assert hit_rate_at_k(rows, 2) == 1.0
    assert hit_rate_at_k([QueryResult(None, "q", [Hit("a", None, 1.0)])], 1) is None


def test_hit_rate_counts_rank() -> None:
    wrong_first = QueryResult(None, "q", [Hit("x", None, 0.9), Hit("p", None, 0.8)], product_id="p")
    assert hit_rate_at_k([wrong_first], 1) == 0.0
    assert hit_rate_at_k([wrong_first], 2) == 1.0


def test_html_summary_counts_the_scored_queries_only() -> None:
    from devkit.report import Hit, QueryResult, html_summary

    img = Image.new("RGB", (8, 8))
    rows = [
        QueryResult(img, "street: a", [Hit("a", img, 0.9), Hit("b", img, 0.8)], product_id="a"),
        QueryResult(img, "street: b", [Hit("a", img, 0.9), Hit("b", img, 0.8)], product_id="b"),
        QueryResult(img, "similar: a", [Hit("b", img, 0.7)]),
    ]
    assert html_summary(rows) == "2 queries scored · hit@1 50% · hit@5 100% · 1 row without a right answer (similar items)"
    assert html_summary(rows[:1]) == "1 query scored · hit@1 100% · hit@5 100%"
