"""The web page in a real browser: Playwright drives headless Chromium (Debian's ``chromium`` package) against a
server on 127.0.0.1; it uploads a demo image, waits for the results grid and checks k thumbnails with scores, then
clicks a result. ``SERVE_SCREENSHOT=path.png`` also saves a screenshot of the page (README's picture)."""

import io
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("python_multipart", reason="the [serve] extra (python-multipart) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-serve.txt)")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium installed (Debian: apt-get install chromium)", allow_module_level=True)

from cgd.spec import SPEC  # noqa: E402
from common.distributed import free_port  # noqa: E402
from common.searcher import Searcher  # noqa: E402
from common.service import create_app  # noqa: E402
from tests.serving import demo_photos, gallery_database  # noqa: E402

K = 6


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A labelled 24-image gallery served by uvicorn on a free loopback port, in a thread of this process."""
    monkeypatch.setenv("RETRIEVAL_RESULTS", str(tmp_path / "results"))
    photos = demo_photos(tmp_path / "photos", classes=5, per_class=5, size=64)
    listing = tmp_path / "photos.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{Path(p).parent.name}\n" for p in photos[1:]))
    db_path = gallery_database(tmp_path, str(listing))
    app = create_app(Searcher(SPEC, db_path, device=torch.device("cpu")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", photos[0]
    server.should_exit = True
    thread.join(timeout=10)


def _screenshot(page, path: str) -> None:
    """The page as a 256-colour PNG (small enough to commit)."""
    from PIL import Image

    page.set_viewport_size({"width": 1100, "height": 500})
    png = page.screenshot(type="png")
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


def test_page_searches_an_upload_and_a_clicked_result(server):
    url, query = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url + "/")
            playwright.expect(page.locator("#info")).to_contain_text("24 images")
            page.fill("#k", str(K))
            page.fill("#label", Path(query).parent.name)
            page.set_input_files("#file", query)
            results = page.locator("#results .result")
            playwright.expect(results).to_have_count(K)
            scores = results.locator(".score").all_inner_texts()
            assert len(scores) == K and all(re.fullmatch(r"\d+\.\d{4}", s) for s in scores), scores
            assert [float(s) for s in scores] == sorted(float(s) for s in scores)  # distances, nearest first
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            frames = results.evaluate_all("els => els.map(e => e.className)")
            assert all(("correct" in f) != ("wrong" in f) for f in frames), frames  # the query's label is known
            if os.environ.get("SERVE_SCREENSHOT"):
                _screenshot(page, os.environ["SERVE_SCREENSHOT"])
            clicked = results.nth(2).get_attribute("data-path")
            results.nth(2).click()
            playwright.expect(page.locator("#query span")).to_have_text(clicked)
            # the new results replace the grid: a stored image is excluded from its own results
            playwright.expect(page.locator(f'#results .result[data-path="{clicked}"]')).to_have_count(0)
            playwright.expect(results).to_have_count(K)
            frames = results.evaluate_all("els => els.map(e => e.className)")
            assert all(("correct" in f) != ("wrong" in f) for f in frames), frames  # its stored label is known
            page.fill("#k", "0")
            page.set_input_files("#file", query)
            playwright.expect(page.locator("#status")).to_contain_text("error 422")
        finally:
            browser.close()
