"""What the visualizer draws: a plain graph of ``VizNode``s, independent of torch.fx.

``describe`` turns a GraphModule into a ``VizGraph``; ``collapse`` and ``diff`` make new ones from
it; layout, SVG, DOT and HTML only read it. Keeping the drawing side off fx means a collapsed box
or a node that one stage removed is just another node.
"""
from __future__ import annotations

import dataclasses

BOX_PREFIX = "box:"  # ids of collapsed boxes; fx node names are identifiers, so they never clash


@dataclasses.dataclass(frozen=True)
class VizNode:
    id: str  # the fx node name, or BOX_PREFIX + module prefix for a collapsed box
    label: str  # first line: the qualified name (or node name when it has none)
    kind: str  # module class, function or method name, or the op
    path: tuple[str, ...]  # module path used for collapsing ("model", "2", "cv1", "conv")
    bits: int | None = None  # the precision this node works at (weights of a layer); None: float
    sublabel: str = ""  # second line: bit widths and shape
    group: int | None = None  # scale-sharing group, only when the group is shared by several nodes
    head: bool = False  # a raw head output: the float decoder runs after it
    sqnr_db: float | None = None  # the lowest SQNR of its quantizers (with a report)
    status: str = ""  # in a diff: "added", "removed", "changed" or "" (kept as it was)
    details: tuple[tuple[str, str], ...] = ()  # what the details panel and the tooltip list
    members: tuple[str, ...] = ()  # a collapsed box: the ids of the nodes inside

    @property
    def is_box(self) -> bool:
        return bool(self.members)

    def tooltip(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.details) or self.label


@dataclasses.dataclass(frozen=True)
class VizGraph:
    title: str
    nodes: tuple[VizNode, ...]
    edges: tuple[tuple[str, str, str], ...]  # (source id, target id, diff status or "")
    expanded: str = ""  # the box id whose members this view shows expanded ("" for none)
    module_types: dict[str, str] = dataclasses.field(default_factory=dict)  # "model.2" -> "C3"
    diff: bool = False  # node and edge statuses are what to show (fill by status, not bit width)

    def node(self, node_id: str) -> VizNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def bit_widths(self) -> list[int | None]:
        """The widths present, float (None) last: what the legend lists."""
        present = {n.bits for n in self.nodes}
        return sorted(b for b in present if b is not None) + ([None] if None in present else [])
