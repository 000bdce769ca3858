"""The search page in a real browser: headless Debian Chromium driven by Playwright.

Uploads a photo, draws a box around the product, gets results, clicks through to similar
items, opens the duplicates page, and checks the DOM at each step. The screenshot of the
search page is the one in the README (docs/img/search_page.png).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from devkit.catalog import query_photo
from tests.harness import ROOT
from tests.serve_harness import TOKEN, Served, served

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "img" / "search_page.png"


@pytest.fixture(scope="module")
def sv(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(stack_env, tmp_path_factory.mktemp("serve-ui")) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import Error, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does it)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Error as e:
            pytest.fail(f"cannot launch {CHROMIUM} headless: {e.message}")
        yield b
        b.close()


def _page(browser: object, sv: Served) -> object:
    ctx = browser.new_context(viewport={"width": 1200, "height": 1000})  # type: ignore[attr-defined]
    ctx.add_cookies([{"name": "cardigan_token", "value": TOKEN, "url": sv.base + "/"}])
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    return page


def test_search_page_upload_box_results_similar(browser: object, sv: Served, tmp_path: Path) -> None:
    page = _page(browser, sv)
    target = sv.catalog[4]
    q = query_photo(target)
    photo = tmp_path / "street.jpg"
    photo.write_bytes(q.data)

    page.goto(sv.base + "/")
    assert page.title() == "Cardigan search"
    assert page.is_disabled("#go")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#preview", state="visible")
    assert "street.jpg" in page.inner_text("#status")

    # drag a box on the preview: the label shows it in the photo's own pixels
    canvas = page.locator("#preview").bounding_box()
    assert canvas is not None
    x0, y0 = canvas["x"] + canvas["width"] * 0.15, canvas["y"] + canvas["height"] * 0.15
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + canvas["width"] * 0.6, y0 + canvas["height"] * 0.6, steps=5)
    page.mouse.up()
    label = page.inner_text("#bbox-label")
    assert label.startswith("Box: "), label
    box = [float(v) for v in label.removeprefix("Box: ").split(",")]
    assert box[0] < box[2] and box[1] < box[3]
    page.click("#clear-box")
    assert page.inner_text("#bbox-label") == ""
    # now the box a shopper would draw: around the product (the photo's known bbox)
    assert q.bbox is not None
    w, h = Image.open(io.BytesIO(q.data)).size
    sx, sy = canvas["width"] / w, canvas["height"] / h
    page.mouse.move(canvas["x"] + q.bbox[0] * sx, canvas["y"] + q.bbox[1] * sy)
    page.mouse.down()
    page.mouse.move(canvas["x"] + q.bbox[2] * sx, canvas["y"] + q.bbox[3] * sy, steps=5)
    page.mouse.up()
    drawn = [float(v) for v in page.inner_text("#bbox-label").removeprefix("Box: ").split(",")]
    assert all(abs(a - b) <= 2 for a, b in zip(drawn, q.bbox)), (drawn, q.bbox)

    page.fill("#k", "8")
    with page.expect_response(lambda r: r.url.endswith("/v1/search")) as resp:
        page.click("#go")
    api = resp.value.json()
    assert resp.value.status == 200, api
    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == len(api["results"]) == 8
    shown = [cards.nth(i).get_attribute("data-product-id") for i in range(cards.count())]
    assert shown == [h["product_id"] for h in api["results"]]
    assert page.locator("#results .card .pid").first.inner_text() == shown[0]
    assert page.locator("#results .card .score").first.inner_text() == f"score {api['results'][0]['score']:.3f}"
    assert page.inner_text("#results-title") == "Results (8)"
    # every result's image came from S3 through the service and decoded in the browser
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")

    # click through to similar items
    first = shown[0]
    with page.expect_response(lambda r: "/similar" in r.url) as sim:
        cards.first.click()
    assert sim.value.status == 200
    page.wait_for_selector("#similar .card")
    assert page.inner_text("#similar-title") == f"Similar to {first}"
    similar = page.locator("#similar .card")
    ids = [similar.nth(i).get_attribute("data-product-id") for i in range(similar.count())]
    assert ids and first not in ids
    assert ids == [h["product_id"] for h in sim.value.json()["results"]]
    page.wait_for_function("[...document.querySelectorAll('#similar img')].every(i => i.complete && i.naturalWidth > 0)")
    assert not page.errors, page.errors

    page.evaluate("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_search_page_shows_the_error_for_a_bad_file(browser: object, sv: Served, tmp_path: Path) -> None:
    page = _page(browser, sv)
    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo at all " * 20)
    page.goto(sv.base + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("!document.getElementById('go').disabled")
    page.click("#go")
    page.wait_for_selector("#status.error")
    assert "not an image" in page.inner_text("#status")
    assert page.locator("#results .card").count() == 0


def test_duplicates_page_shows_groups_side_by_side(browser: object, sv: Served) -> None:
    page = _page(browser, sv)
    page.goto(sv.base + "/duplicates")
    page.wait_for_selector(".group .card")
    groups = page.locator(".group")
    assert groups.count() == 1
    ids = [c.get_attribute("data-product-id") for c in groups.first.locator(".card").all()]
    assert sorted(ids) == sorted(["dup-1", sv.catalog[0].product_id])
    assert "1 group(s)" in page.inner_text("#status")
    page.wait_for_function("[...document.querySelectorAll('.group img')].every(i => i.complete && i.naturalWidth > 0)")
    assert not page.errors, json.dumps(page.errors)
