"""The search page in a real headless Chromium: search by upload, by gallery click, with filters and re-ranking, and
see an error explained.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``), driven by playwright-python;
playwright's own browser download is never used, so the test runs offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from metricsearch.search.index import open_index
from metricsearch.search.server import ServerSettings, build_app
from tests.search_fixtures import BackgroundServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/metricsearch_browser.png")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's Chromium: sudo apt-get update && sudo apt-get install -y chromium",
    ),
]


@pytest.fixture(scope="module")
def server(tiny):
    index, embedder = open_index(tiny.index_dir)
    with BackgroundServer(build_app(index, embedder, ServerSettings(default_k=6, gallery_page_size=24))) as server:
        yield server, tiny


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        yield page
        browser.close()


def _result_paths(page) -> list[str]:
    return page.eval_on_selector_all("#results .result", "cards => cards.map(c => c.dataset.path)")


def test_search_by_upload_and_by_gallery_click(server, page, tmp_path):
    url, tiny = server[0].url, server[1]
    page.goto(url + "/")
    page.wait_for_selector("#gallery .gallery-item")
    assert page.locator("#gallery .gallery-item").count() == 24  # the first page of thumbnails
    assert "96 images" in page.inner_text("#info")

    # Upload a gallery image: it comes back first, with a score of 1.000.
    page.set_input_files("#file-input", str(tiny.gallery / "006" / "002.jpg"))
    page.click("#search-button")
    page.wait_for_selector("#results .result")
    assert page.locator("#results .result").count() == 6
    assert _result_paths(page)[0] == "006/002.jpg"
    assert re.match(r"#1\s+score 1\.000", page.inner_text("#results .result >> nth=0"))
    assert page.locator("#query-preview img").count() == 1

    # Click a gallery thumbnail: the results change to that image's neighbours.
    page.locator('#gallery .gallery-item[data-path="001/004.jpg"]').click()
    page.wait_for_function("document.querySelector('#results .result').dataset.path === '001/004.jpg'")
    assert "001/004.jpg" in page.inner_text("#query-preview")
    scores = [float(s) for s in page.eval_on_selector_all("#results .result", "cs => cs.map(c => c.dataset.score)")]
    assert scores == sorted(scores, reverse=True) and len(scores) == 6
    # Every result thumbnail really loads from /gallery/ (the 32 px synthetic images).
    page.wait_for_function(
        "[...document.querySelectorAll('#results .result img')].every(i => i.complete && i.naturalWidth === 32)"
    )
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # "Show more" loads the next page of the gallery.
    page.click("#more-button")
    page.wait_for_function("document.querySelectorAll('#gallery .gallery-item').length === 48")


def test_a_non_image_upload_shows_the_servers_message(page, server, tmp_path):
    page.goto(server[0].url + "/")
    page.wait_for_selector("#gallery .gallery-item")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("definitely not a picture")
    page.set_input_files("#file-input", str(not_image))
    page.click("#search-button")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not an image" in page.inner_text("#error")
    assert page.locator("#results .result").count() == 0


def test_the_filters_and_the_reranking_go_with_each_search(server, page):
    url, tiny = server[0].url, server[1]
    page.goto(url + "/")
    page.wait_for_selector("#gallery .gallery-item")
    methods = page.eval_on_selector_all("#postprocess-select option", "options => options.map(o => o.value)")
    assert methods == ["none", "aqe", "dba", "k_reciprocal"]
    assert page.input_value("#postprocess-select") == "none"  # the server's default

    # Only class 003, re-ranked by k-reciprocal: a click on an image of another class finds class 003 only.
    page.fill("#label-input", "003")
    page.select_option("#postprocess-select", "k_reciprocal")
    page.locator('#gallery .gallery-item[data-path="001/004.jpg"]').click()
    page.wait_for_function("document.getElementById('status').textContent.includes('re-ranked by k_reciprocal')")
    paths = _result_paths(page)
    assert len(paths) == 6 and all(path.startswith("003/") for path in paths)
    fields = {"path": "001/004.jpg", "k": "6", "label": "003", "postprocess": "k_reciprocal"}
    answer = httpx.post(url + "/api/search", data=fields).json()
    assert paths == [hit["path"] for hit in answer["results"]]

    # A folder instead, by upload, without re-ranking: only images under 007/.
    page.fill("#label-input", "")
    page.fill("#folder-input", "007")
    page.select_option("#postprocess-select", "none")
    page.set_input_files("#file-input", str(tiny.gallery / "006" / "002.jpg"))
    page.click("#search-button")
    page.wait_for_function(
        "[...document.querySelectorAll('#results .result')].every(c => c.dataset.path.startsWith('007/'))"
        " && !document.getElementById('status').textContent.includes('re-ranked')"
    )
    assert len(_result_paths(page)) == 6

    # A folder that does not exist: no results, no error.
    page.fill("#folder-input", "no/such/folder")
    page.click("#search-button")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('0 results')")
    assert page.locator("#results .result").count() == 0 and page.inner_text("#error") == ""
