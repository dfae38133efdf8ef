"""The analysis page (issue 25 item 5): one self-contained HTML file, checked in a real headless
Chromium (Debian's, installed by .ci/run): it loads without a script error, draws one panel per
figure, and the layer slider and head menu work; a screenshot is taken."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lsg.analysis import attention_maps, profiles
from lsg.analysis.data import load_questions
from lsg.analysis.page import PANEL_CLASS, write_page

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)


@pytest.fixture(scope="module")
def page(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    questions = load_questions({"name": "shapes", "root": str(tmp_path_factory.getbasetemp() / "shapes"), "n": 6}, 2)
    results = [attention_maps.run(tiny, questions, {"layers": "all", "heads": "all"}, out, progress=False),
               profiles.run_layers(tiny, questions, {"layers": "all"}, out, progress=False)]
    return write_page(results, out / "index.html", "tiny-random"), sum(len(r.figures) for r in results)


def test_the_page_inlines_plotly_once_and_has_a_panel_per_figure(page):
    path, n_figures = page
    text = path.read_text()
    assert text.count(f'class="{PANEL_CLASS}"') == n_figures == 3
    assert text.count("plotly.js v") == 1 and "<script src=" not in text  # inlined, once, nothing fetched


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)")
def test_the_page_draws_every_panel_in_headless_chromium(page, tmp_path):
    from playwright.sync_api import sync_playwright

    path, n_figures = page
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            tab.goto(path.as_uri())
            tab.wait_for_function(f"document.querySelectorAll('.{PANEL_CLASS} .main-svg').length >= {n_figures}",
                                  timeout=30000)
            drawn = tab.evaluate(f"Array.from(document.querySelectorAll('.{PANEL_CLASS} .js-plotly-plot'))"
                                 f".filter(d => d._fullLayout && d.querySelector('.main-svg')).length")
            assert drawn == n_figures
            assert tab.locator(".slider-container").count() >= 2  # the maps' layer sliders
            # move the first map to decoder layer 2 and pick head 1: the heat map changes
            z_before = tab.evaluate("document.querySelector('.js-plotly-plot').data[1].z")
            tab.evaluate("(() => { const d = document.querySelector('.js-plotly-plot');"
                         " return Plotly.animate(d, ['2'], {frame: {duration: 0}, mode: 'immediate'}); })()")
            z_after = tab.evaluate("document.querySelector('.js-plotly-plot').data[1].z")
            assert z_after != z_before
            tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (tmp_path / "page.png").stat().st_size > 10_000
