"""Draw a yoloq graph at any pipeline stage for a person to inspect (DESIGN §8, issue 8).

    import yoloq
    from yoloq.tools import viz

    qm = yoloq.quantize(model, "w4a4", calib=batches)
    viz.render_html(qm, "graph.html", collapse_depth=2)      # bit widths, scales, SQNR, groups
    viz.render_diff(fused_gm, qm, "diff.html")               # what quantization added and changed
    svg, dot = viz.to_svg(qm), viz.to_dot(qm)
    viz.plot_report(qm.report, "plots/")                      # per-layer SQNR and bit-width PNGs

The page is one file with nothing to fetch: nodes coloured by bit width, shared scales outlined,
the head boundary marked, details on click, module boxes that expand on click. Layout comes from
Graphviz ``dot`` when it is installed, else from a pure-Python layered layout (networkx).
"""
from yoloq.tools.viz.diff import GraphDiff, diff_graphs
from yoloq.tools.viz.plots import plot_report
from yoloq.tools.viz.render import render_diff, render_html, to_dot, to_svg, view

__all__ = ["GraphDiff", "diff_graphs", "plot_report", "render_diff", "render_html", "to_dot", "to_svg", "view"]
