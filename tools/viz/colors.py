"""One palette for the graph pages and the report plots, so a 4-bit layer looks the same in both.

Bit widths run from warm (few bits: most error, look here first) to cool (16-bit pre-activations);
float is a neutral grey. Widths the recipe presets never use take the colour of the nearest one.
Scale-sharing groups get a categorical outline colour of their own, and a diff marks added,
removed and changed nodes in the usual green / red / amber.
"""
from __future__ import annotations

FLOAT = "#d9d9d9"
BITS = {2: "#762a83", 3: "#d73027", 4: "#fc8d59", 5: "#fdae61", 6: "#fee08b", 8: "#a6d96a",
        12: "#66bd63", 16: "#74add1"}
GROUPS = ("#1f78b4", "#e31a1c", "#33a02c", "#ff7f00", "#6a3d9a", "#b15928", "#a6cee3", "#fb9a99",
          "#b2df8a", "#cab2d6")
STATUS = {"added": "#1a9850", "removed": "#d73027", "changed": "#f1a340"}
STATUS_FILL = {"added": "#d9f0d3", "removed": "#fddbc7", "changed": "#fee8c8", "": "#ffffff"}
HEAD = "#b2182b"


def bits_color(bits: int | None) -> str:
    if bits is None:
        return FLOAT
    nearest = min(BITS, key=lambda b: (abs(b - bits), b))
    return BITS[nearest]


def group_color(group: int) -> str:
    return GROUPS[group % len(GROUPS)]
