"""The HTML report is built from the report's data: title first (no Markdown residue), cards with the stated
shapes and providers, plots, a per-layer table for every weight pass, candidates left as they were grouped by
reason, the search when auto ran; and, where Debian's Chromium is installed, the page renders headless."""
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

import onnxcomp
from onnxcomp import testing


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.order, self.tables, self.text, self._stack = [], {}, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.order.append(tag)
        if tag == "table":
            self.tables[a.get("id")] = 0
            self._stack.append(a.get("id"))
        if tag == "tr" and self._stack:
            self.tables[self._stack[-1]] += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    d = testing.digits_data()
    path = str(testing.digits_cnn_path())
    calib = [{"input": d["x_calib"][i:i + 1]} for i in range(0, 60)]
    tmp = tmp_path_factory.mktemp("html")
    recipe = {"passes": [{"type": "sparsify", "pattern": "channel", "sparsity": 0.3},
                         {"type": "quantize", "mode": "static"}, {"type": "palettize", "bits": 4}]}
    out = {}
    for name, r in (("passes", recipe), ("auto", {"preset": "auto", "objective": "size", "max_seconds": 30})):
        res = onnxcomp.compress(path, r, calibration_data=calib, progress=False)
        out[name] = (res, res.report.to_html(tmp / f"{name}.html"))
    return out


def _parse(p):
    page = _Page()
    page.feed(p.read_text())
    return page, " ".join(page.text)


def test_page_from_typed_data(pages):
    res, path = pages["passes"]
    page, text = _parse(path)
    assert page.order.index("h1") < page.order.index("svg")  # the title comes first, the plots after it
    assert "`" not in text and "|---" not in text  # no Markdown residue
    v = res.report.validation
    assert "file size" in text and f"{res.report.size_ratio:.3f}x" in text
    assert f"{v.latency_ratio:.3f}x" in text and "CPUExecutionProvider" in text and "[1, 1, 8, 8]" in text
    assert "worst cosine" in text and "session creation" in text
    assert "weight bytes by storage" in path.read_text() and "largest per-layer errors" in path.read_text()
    # a per-layer table for every weight pass, one row per layer (+ the header)
    recs = {p.name: p for p in res.report.passes}
    assert page.tables["t0_groups"] == 1 + len(recs["sparsify"].details["groups"])
    assert page.tables["t1_sensitivity"] == 1 + len(recs["quantize"].details["sensitivity"])
    assert page.tables["t2_layers"] == 1 + len(recs["palettize"].details["layers"])
    # every candidate a pass left alone, grouped by reason with counts
    left = recs["palettize"].details["left_float"]
    assert f"left as they were: {len(left)} candidate(s)" in text
    for reason in {r["reason"] for r in left}:
        assert reason in text


def test_layers_table_covers_every_weight_layer_over_the_whole_recipe(pages):
    res, path = pages["passes"]
    page, text = _parse(path)
    rows = res.report.layers
    assert sorted(r["node"] for r in rows) == ["conv1", "conv2", "fc1", "fc2"]  # every weight layer, once
    assert page.tables["layers_table"] == 1 + len(rows)
    by = {r["node"]: r for r in rows}
    # fc1 lost neurons (sparsify), was quantized, then its int8 values palettized (the others are too small)
    assert by["fc1"]["done"] == "sparsify + quantize + palettize", by["fc1"]
    assert "sparsify kept" in by["fc1"]["settings"] and "palettize bits 4" in by["fc1"]["settings"]
    assert by["fc1"]["storage_after"].startswith("codebook") and by["conv2"]["done"] == "sparsify + quantize"
    assert all(r["bytes_after"] < r["bytes_before"] for r in rows)
    # the bytes add up: every input initializer belongs to a layer here; after, all but the activation scales
    before, after = res.report.before["parameter_bytes"], res.report.after["parameter_bytes"]
    assert sum(r["bytes_before"] for r in rows) == before
    assert 0.9 * after < sum(r["bytes_after"] for r in rows) <= after
    assert "every layer (4)" in text and "Layers (4 weight layers" in text


def test_auto_page_shows_the_search(pages):
    res, path = pages["auto"]
    page, text = _parse(path)
    s = res.report.search
    assert f"Auto search: {s['winner']}" in text and page.tables["search"] == 1 + len(s["trials"])
    assert "auto search (size)" in path.read_text()


@pytest.fixture(scope="module")
def minilm_page(tmp_path_factory):
    """MiniLM-L3 static int8 calibrated on 24 real sentences (every 5th held back for validation)."""
    res = onnxcomp.compress(testing.minilm_path(), "int8", calibration_data=testing.minilm_feeds(30), progress=False)
    return res, res.report.to_html(tmp_path_factory.mktemp("minilm") / "minilm.html")


def test_minilm_page_has_every_layer(minilm_page):
    res, path = minilm_page
    page, text = _parse(path)
    assert len(res.report.layers) == 21 and page.tables["layers_table"] == 22  # 18 MatMuls + 3 embedding tables
    assert re.search(r"without their common prefix\s+/model/model\.0/auto_model/", text)
    assert {r["done"] for r in res.report.layers} == {"quantize", "unchanged"}  # the 2x384 token-type table


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,2400"]


@pytest.mark.parametrize("which", ["minilm", "cnn", "auto"])
def test_chromium_renders_the_page(which, pages, minilm_page, tmp_path):
    args = _chromium()
    res, path = {"minilm": minilm_page, "cnn": pages["passes"], "auto": pages["auto"]}[which]
    shot = tmp_path / "page.png"
    dom = subprocess.run(args + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r"<h1>onnxcomp report", dom.stdout) and dom.stdout.count("<svg") == 1
    assert dom.stdout.count("<tr") >= len(res.report.layers) + 1  # the rendered per-layer table
    assert "id=\"layers_table\"" in dom.stdout and "<select" in dom.stdout  # and its filter
    if which == "auto":
        assert "auto search (" in dom.stdout and "id=\"search\"" in dom.stdout
    subprocess.run(args + [f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20000  # a rendered page, not a blank one
