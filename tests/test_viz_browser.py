"""The graph page in a real browser (headless Chromium): what it renders, and what a click shows.

Chromium is driven from the command line, no Python dependency: ``--dump-dom`` returns the DOM
after the page's script ran, and ``--screenshot`` saves what it drew. The page clicks the node a
``#click=NODE`` fragment names, through its ordinary click handler. Chromium is installed with
apt-get when missing and we are root; otherwise the test is skipped, saying why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

import yoloq
from yoloq.sources import load_model
from yoloq.tools import viz
from yoloq.tools.viz.collapse import collapse
from yoloq.tools.viz.colors import BITS

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
NOTE_SCREENSHOT = "/tmp/yoloq-viz-screenshot.png"
WINDOW = (1400, 1000)


def _find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="session")
def chromium() -> str:
    browser = _find_browser()
    if browser is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True,
                                 env=env, timeout=900, check=False)
        if install.returncode:  # the package lists may be stale
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300, check=False)
            subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, env=env, timeout=900,
                           check=False)
        browser = _find_browser()
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install -y chromium, as root)")
    return browser


def _run(browser: str, profile, *args: str) -> str:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000", *args],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _canvas(dom: str) -> str:
    return dom.split('<div id="canvas">', 1)[1].split("</div>", 1)[0]


def _count_nodes(dom: str) -> int:
    """``g.node`` elements on screen (the canvas; the inert templates hold the other views)."""
    return len(re.findall(r'<g class="node[ "]', _canvas(dom)))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calib = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
        qm = yoloq.quantize(load_model("tiny-yolo"), "w4a4", calib=calib, imgsz=64)
    finally:
        torch.set_num_threads(threads)
    path = viz.render_html(qm, tmp_path_factory.mktemp("viz") / "graph.html", collapse_depth=1)
    return path, viz.view(qm)


@pytest.mark.slow
def test_the_browser_renders_every_node_and_a_click_shows_its_details(chromium, page, tmp_path):
    path, graph = page
    url = path.resolve().as_uri()
    dom = _run(chromium, tmp_path / "profile", "--dump-dom", url)
    first = collapse(graph, 1)
    assert _count_nodes(dom) == len(first.nodes) == 11
    assert f'data-node-count="{len(first.nodes)}"' in dom.split("<body", 1)[1].split(">", 1)[0]

    # stem_1_conv sits in the collapsed "stem" box: the page clicks the box open, then the node
    dom = _run(chromium, tmp_path / "profile", "--dump-dom", url + "#click=stem_1_conv")
    opened = collapse(graph, 1, expand="box:stem")
    body = dom.split("<body", 1)[1].split(">", 1)[0]
    assert 'data-state="box:stem"' in body and f'data-node-count="{len(opened.nodes)}"' in body
    assert _count_nodes(dom) == len(opened.nodes) == 16
    assert 'class="node opened selected" id="node-stem_1_conv"' in _canvas(dom)
    details = dom.split('<aside id="details"', 1)[1].split("</aside>", 1)[0]
    assert 'data-selected="stem_1_conv"' in details
    for text in ("<th>qualified name</th><td>stem.1.conv</td>", "<th>shape</th><td>float32[1, 32, 16, 16]</td>",
                 "<th>weight</th><td>4 bits · uniform · per_channel", "SQNR",
                 "<th>created by</th><td>insert_quantizers"):
        assert text in details, text

    shot = tmp_path / "graph.png"
    _run(chromium, tmp_path / "profile", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
         url + "#click=stem_1_conv")
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colours = {c for _, c in image.getcolors(maxcolors=1 << 22)}
    assert {tuple(int(BITS[b][i:i + 2], 16) for i in (1, 3, 5)) for b in (4, 8)} <= colours  # the drawn nodes
    shutil.copyfile(shot, NOTE_SCREENSHOT)
