"""yoloq.tools.viz: the graph drawn at every stage, collapsing, diffs, the CLI and the report plots."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from PIL import Image

import yoloq
from yoloq.cli import main
from yoloq.pipeline import build_pipeline, run_pipeline
from yoloq.quantizers.oscillation import OscillationTracker
from yoloq.sources import load_model
from yoloq.tools import viz
from yoloq.tools.viz.collapse import auto_depth, collapse
from yoloq.tools.viz.colors import BITS, FLOAT, HEAD, STATUS_FILL, group_color
from yoloq.tools.viz.layout import forward_edges, layout

NODE = re.compile(r'<g class="(node[^"]*)" id="[^"]*" data-id="([^"]+)" data-bits="([^"]+)"(?: data-group="(\d+)")?')


@pytest.fixture(scope="module")
def stages():
    """tiny-yolo at every stage (64 px, w4a4), built once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model("tiny-yolo")
        calib = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
        captured = yoloq.capture(model, calib[0][:1])
        fused, _ = run_pipeline(copy.deepcopy(captured.graph_module), build_pipeline("fused"))
        quantized = yoloq.quantize(model, "w4a4", calib=calib, imgsz=64)
        qat = yoloq.prepare_qat(model, "w4a4", calib=calib, imgsz=64)
        integer = yoloq.lower(quantized)
        yield {"captured": captured, "fused": fused, "quantized": quantized, "qat": qat, "integer": integer}
    finally:
        torch.set_num_threads(threads)


def gm_of(stage):
    return stage if isinstance(stage, torch.fx.GraphModule) else stage.graph_module


def shown_nodes(html: str) -> list[tuple[str, str, str, str | None]]:
    """(classes, id, bits, group) of the nodes on screen: the canvas, not the inert templates."""
    canvas = html.split('<div id="canvas">', 1)[1].split("</div>", 1)[0]
    return NODE.findall(canvas)


def fill_of(svg: str, node_id: str) -> str:
    element = svg.split(f'data-id="{node_id}"', 1)[1].split("</g>", 1)[0]
    return re.findall(r'<rect width="[^"]+" height="[^"]+" rx="6" fill="([^"]+)"', element)[-1]


@pytest.mark.parametrize("name", ["captured", "fused", "quantized", "qat", "integer"])
def test_every_stage_draws_each_graph_node_once(stages, name, tmp_path):
    gm = gm_of(stages[name])
    names = [n.name for n in gm.graph.nodes]
    html = viz.render_html(stages[name], tmp_path / "g.html").read_text()
    assert sorted(i for _, i, _, _ in shown_nodes(html)) == sorted(names)
    assert f'data-node-count="{len(names)}"' in html
    svg = viz.to_svg(stages[name])
    assert sorted(i for _, i, _, _ in NODE.findall(svg)) == sorted(names)
    dot = viz.to_dot(stages[name])
    declared = re.findall(r'^  "([^"]+)" \[label=', dot, re.M)
    assert sorted(declared) == sorted(names)
    assert len(re.findall(r"^  \"[^\"]+\" -> \"[^\"]+\"", dot, re.M)) >= len(names) - 1


def test_nodes_are_coloured_by_bit_width_with_a_legend(stages):
    svg = viz.to_svg(stages["quantized"])
    bits = {i: b for _, i, b, _ in NODE.findall(svg)}
    assert bits["stem_0_conv"] == "8" and bits["stem_1_conv"] == "4"  # w4a4 keeps the first layer at 8 bits
    assert bits["x"] == "float" and bits["activation_quantizers_g0"] == "8" and bits["cat"] == "4"
    assert fill_of(svg, "stem_0_conv") == BITS[8] and fill_of(svg, "stem_1_conv") == BITS[4]
    assert fill_of(svg, "x") == FLOAT
    legend = svg.split('<g class="legend"', 1)[1].split("</g>", 1)[0]
    assert ">4 bits<" in legend and ">8 bits<" in legend and ">float<" in legend and ">16 bits<" not in legend
    captured = viz.to_svg(stages["captured"])
    assert {b for _, _, b, _ in NODE.findall(captured)} == {"float"} and ">4 bits<" not in captured
    integer = {i: b for _, i, b, _ in NODE.findall(viz.to_svg(stages["integer"]))}
    assert integer["stem_1_conv"] == "4" and integer["stem_1_conv_act"] == "4" and integer["stem_0_conv"] == "8"
    assert integer["quantize_input"] == "8" and integer["dequantize_0"] == "float" and integer["chunk"] == "4"


def test_details_list_name_shape_quantizers_sqnr_and_creating_pass(stages):
    qm = stages["quantized"]
    details = dict(viz.view(qm).node("stem_1_conv").details)
    rows = {r.quantizer: r for r in qm.report.rows}
    weight = rows["stem.1.conv.weight_quant"]
    assert details["qualified name"] == "stem.1.conv" and details["shape"] == "float32[1, 32, 16, 16]"
    assert details["weight"].startswith("4 bits · uniform · per_channel · signed symmetric · scale ")
    assert f"{weight.scale_min:.3g}…{weight.scale_max:.3g}" in details["weight"]
    assert details["weight"].endswith(f"SQNR {weight.sqnr_db:.1f} dB")
    assert f"SQNR {rows['activation_quantizers.g2'].sqnr_db:.1f} dB" in details["output"]
    assert details["pre_activation"].startswith("16 bits · uniform · per_tensor")
    assert details["created by"] == "insert_quantizers"
    assert dict(viz.view(stages["captured"]).node("stem_0_bn").details)["created by"] == "capture"
    integer = dict(viz.view(stages["integer"], report=qm.report).node("stem_1_conv").details)
    assert integer["lowered from"] == "stem.1.conv" and f"SQNR {weight.sqnr_db:.1f} dB" in integer["weight"]


def test_oscillation_shares_come_from_the_tracker(stages):
    qat = stages["qat"]
    layer = qat.graph_module.get_submodule("stem.1.conv")
    tracker = OscillationTracker(qat)
    step = layer.weight_quant.scale.detach()  # one grid step per output channel
    with torch.no_grad():
        for sign in (0, 1, -1):  # codes go up one step, then back: a flip
            layer.layer.weight += sign * step
            tracker.update()
    stats = {s.name: s for s in tracker.layer_stats()}["graph_module.stem.1.conv"]
    assert stats.oscillating > 0.5
    line = dict(viz.view(qat, oscillation=tracker).node("stem_1_conv").details)["weight oscillation"]
    assert line.startswith(f"{100 * stats.oscillating:.2f}% oscillating · {100 * stats.frozen:.2f}% frozen")
    assert "weight oscillation" not in dict(viz.view(qat).node("stem_1_conv").details)


def test_shared_scale_groups_are_outlined(stages):
    svg = viz.to_svg(stages["quantized"])
    groups = {i: g for _, i, _, g in NODE.findall(svg) if g}
    concat_group = groups["cat"]
    assert {n for n, g in groups.items() if g == concat_group} >= {"block_cv1_conv", "chunk", "getitem", "getitem_1",
                                                                   "block_m_0_conv", "cat"}
    assert "stem_1_conv" not in groups  # its group is itself and its quantizer: nothing shared
    element = svg.split('data-id="chunk"', 1)[1].split("</g>", 1)[0]
    assert f'stroke="{group_color(int(concat_group))}"' in element and "stroke-dasharray" in element


@pytest.mark.parametrize("name", ["captured", "quantized", "integer"])
def test_head_boundary_is_marked(stages, name):
    graph = viz.view(stages[name])
    heads = {n.id for n in graph.nodes if n.head}
    layers = {"head_box_0_1", "head_cls_0_1", "head_box_1_1", "head_cls_1_1"}
    expected = {"captured": layers, "quantized": layers | {f"activation_quantizers_g{g}" for g in (10, 12, 14, 16)},
                "integer": {f"dequantize_{i}" for i in range(4)}}[name]
    assert heads == expected
    placed = layout(graph, "layered")
    svg = viz.to_svg(graph, engine="layered")
    assert {i for c, i, _, _ in NODE.findall(svg) if "head" in c.split()} == expected
    assert f'stroke="{HEAD}"' in svg
    line_y = float(re.search(r'<line class="boundary" x1="0" x2="[^"]+" y1="([^"]+)"', svg).group(1))
    lowest_head = max(placed.boxes[h][1] + placed.boxes[h][3] / 2 for h in heads)
    _, out_y, _, out_h = placed.boxes["output"]
    assert lowest_head < line_y < out_y - out_h / 2


def test_collapse_boxes_module_prefixes_and_expands_one_box_per_view(stages, tmp_path):
    graph = viz.view(stages["quantized"])
    assert auto_depth(graph) == 1
    shown = collapse(graph, 1)
    boxes = {n.label: set(n.members) for n in shown.nodes if n.is_box}
    assert set(boxes) == {"stem", "block", "down", "sppf", "fuse", "head"}
    assert boxes["block"] == {n.id for n in graph.nodes if n.path[0] == "block"}
    assert {"chunk", "guard_0", "cat", "activation_quantizers_g4", "block_m_0_conv"} <= boxes["block"]
    loose = [n for n in shown.nodes if not n.is_box]
    assert len(loose) + sum(len(m) for m in boxes.values()) == len(graph.nodes) and len(shown.nodes) < len(graph.nodes)
    html = viz.render_html(stages["quantized"], tmp_path / "c.html", collapse_depth=1).read_text()
    on_screen = shown_nodes(html)
    assert len(on_screen) == len(shown.nodes) and f'data-node-count="{len(shown.nodes)}"' in html
    assert sum("box" in c.split() for c, _, _, _ in on_screen) == 6
    views = re.findall(r'<template data-state="([^"]+)"><svg class="yoloq-graph"[^>]* data-node-count="(\d+)"', html)
    assert {k: int(c) for k, c in views} == {f"box:{b}": len(shown.nodes) - 1 + len(m) for b, m in boxes.items()}
    assert len(collapse(graph, 2).nodes) > len(shown.nodes)
    # the integer graph lost its module marks; its cats and views are placed by the modules around them
    integer = collapse(viz.view(stages["integer"]), 1)
    assert {n.label for n in integer.nodes if n.is_box} == set(boxes)
    assert {"chunk", "getitem", "guard_0", "cat", "block_m_0_conv_act"} <= set(integer.node("box:block").members)
    assert "cat_1" in integer.node("box:sppf").members and not integer.node("cat_2").is_box


def test_diff_lists_what_folding_removed_and_quantizing_added(stages, tmp_path):
    captured = stages["captured"].graph_module
    folded, _ = run_pipeline(copy.deepcopy(captured), build_pipeline("folded"))
    batchnorms = {n.name for n in captured.graph.nodes if n.op == "call_module"
                  and isinstance(captured.get_submodule(n.target), torch.nn.BatchNorm2d)}
    found = viz.render_diff(captured, folded, tmp_path / "fold.html", engine="layered")
    assert set(found.removed) == batchnorms and len(batchnorms) == 14 and found.added == ()
    assert set(found.changed) == {n.name for n in captured.graph.nodes if any(u.name in batchnorms for u in n.users)}
    html = (tmp_path / "fold.html").read_text()
    drawn = shown_nodes(html)
    assert {i for c, i, _, _ in drawn if "removed" in c.split()} == batchnorms
    assert len(drawn) == len(captured.graph.nodes) and "14 removed" in html
    assert fill_of(html, "stem_0_bn") == STATUS_FILL["removed"]
    assert fill_of(html, "stem_0_conv") == STATUS_FILL["changed"]

    fused, quantized = stages["fused"], stages["quantized"].graph_module
    found = viz.diff_graphs(fused, quantized)
    quantizers = {n.name for n in quantized.graph.nodes if str(n.target).startswith("activation_quantizers.")}
    assert set(found.added) == quantizers
    assert found.removed == () and "stem_1_conv" in found.changed and "cat" in found.kept


def test_the_page_loads_nothing_from_the_network(stages, tmp_path):
    for path in (viz.render_html(stages["quantized"], tmp_path / "q.html", collapse_depth=1),
                 viz.render_html(stages["integer"], tmp_path / "i.html")):
        html = path.read_text()
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        assert not re.search(r"<link|<script[^>]+src=|<img|@import|url\((?!#)", html)  # url(#arrow) is local
        assert "<script>" in html and "<style>" in html  # the script and styles are inline


@pytest.mark.parametrize("engine", ["layered", "dot"])
def test_layout_is_top_to_bottom_without_overlaps(stages, engine):
    if engine == "dot":
        import shutil

        if not shutil.which("dot"):
            pytest.skip("Graphviz dot is not installed (apt-get install graphviz)")
    graph = viz.view(stages["quantized"])
    placed = layout(graph, engine)
    assert placed.engine == engine and set(placed.boxes) == {n.id for n in graph.nodes}
    for a, b, _ in forward_edges(graph):
        assert placed.boxes[a][1] < placed.boxes[b][1], (a, b)
    boxes = list(placed.boxes.values())
    for i, (x, y, w, h) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1:]:
            assert abs(x - x2) >= (w + w2) / 2 - 0.5 or abs(y - y2) >= (h + h2) / 2 - 0.5
    assert set(placed.edges) == {(a, b) for a, b, _ in graph.edges}


def test_cli_writes_the_page_svg_dot_and_a_diff(tmp_path, capsys):
    page, svg, dot = tmp_path / "g.html", tmp_path / "g.svg", tmp_path / "g.dot"
    assert main(["viz", "--model", "tiny-yolo", "--recipe", "w4a4", "--imgsz", "64", "--collapse-depth", "none",
                 "-o", str(page), "--svg", str(svg), "--dot", str(dot), "--engine", "layered"]) == 0
    assert "wrote" in capsys.readouterr().out
    html = page.read_text()
    assert len(shown_nodes(html)) == 51 and "tiny-yolo · quantized (w4a4)" in html and "SQNR" in html
    assert len(NODE.findall(svg.read_text())) == 51 and dot.read_text().startswith('digraph "tiny-yolo')
    diff = tmp_path / "d.html"
    assert main(["viz", "--model", "tiny-yolo", "--imgsz", "64", "--diff", "captured", "fused", "--collapse-depth",
                 "none", "-o", str(diff), "--engine", "layered"]) == 0
    assert "28 removed, 14 changed" in capsys.readouterr().out
    assert sum("removed" in c.split() for c, _, _, _ in shown_nodes(diff.read_text())) == 28
    with pytest.raises(SystemExit):
        main(["viz", "--model", "tiny-yolo", "--collapse-depth", "0"])
    assert "collapse depth must be at least 1" in capsys.readouterr().err


def _colours(path) -> set[tuple[int, int, int]]:
    image = Image.open(path).convert("RGB")
    return {c for _, c in image.getcolors(maxcolors=1 << 20)}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_quantize_cli_writes_sqnr_and_bit_width_plots(toy_dataset, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert main(["quantize", "--model", "tiny-yolo", "--recipe", "w4a4", "--data", str(toy_dataset), "--imgsz", "64",
                 "--calib-images", "4", "--batch", "4", "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {plots / 'sqnr.png'}" in out and f"wrote {plots / 'bits.png'}" in out
    for name in ("sqnr.png", "bits.png"):
        image = Image.open(plots / name)
        assert image.format == "PNG" and image.height > 400
        assert {_rgb(BITS[4]), _rgb(BITS[8])} <= _colours(plots / name)  # bars of both widths
    assert _rgb(BITS[16]) in _colours(plots / "bits.png")  # the 16-bit pre-activations


@pytest.mark.slow
def test_yolov5n_collapses_to_its_blocks(shared_data, tmp_path, capsys):
    page = tmp_path / "v5.html"
    assert main(["viz", "--model", str(shared_data / "weights" / "yolov5n.pt"), "--stage", "fused", "--imgsz", "256",
                 "-o", str(page), "--engine", "layered"]) == 0  # fused: no calibration, the test stays fast
    assert "collapsed at depth 2" in capsys.readouterr().out
    html = page.read_text()
    total = int(re.search(r'data-graph-nodes="(\d+)"', html).group(1))
    drawn = shown_nodes(html)
    boxes = {i for c, i, _, _ in drawn if "box" in c.split()}
    assert total > 80 and len(drawn) < 40 and f'data-node-count="{len(drawn)}"' in html
    assert {"box:model.2", "box:model.9", "box:model.24"} <= boxes
    assert len(re.findall(r"<template data-state=", html)) == len(boxes)
    assert "[&quot;module&quot;, &quot;C3&quot;]" in html or '["module", "C3"]' in html
