"""The stylesheet and script the HTML page inlines (the page loads nothing from anywhere).

The script only switches between views the Python side already laid out (one per collapsed box,
expanded) and fills the details panel from the page's JSON; it computes no layout. A URL fragment
``#click=NODE`` clicks a node on load, through the same click handler as the mouse (expanding its
box first when needed): that is how a headless browser is asked to show a node's details.
"""

CSS = """
body { margin: 0; font: 13px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; }
header { padding: 8px 16px; border-bottom: 1px solid #ddd; background: #fafafa; }
header h1 { font-size: 16px; margin: 0 0 2px 0; }
header .summary, header .hint { color: #555; }
header button { font: inherit; margin-right: 10px; cursor: pointer; }
main { display: flex; height: calc(100vh - 76px); }
#canvas { flex: 1; overflow: auto; }
#details { width: 400px; flex: none; overflow: auto; border-left: 1px solid #ddd; padding: 8px 14px; }
#details h2 { font-size: 14px; margin: 4px 0 8px 0; }
#details table { border-collapse: collapse; width: 100%; }
#details th { text-align: left; vertical-align: top; padding: 2px 10px 2px 0; color: #555; white-space: nowrap;
              font-weight: normal; }
#details td { padding: 2px 0; word-break: break-word; font-family: "DejaVu Sans Mono", Menlo, monospace;
              font-size: 12px; }
.yoloq-graph g.node { cursor: pointer; }
.yoloq-graph g.node:hover { filter: drop-shadow(0 0 3px #555); }
.yoloq-graph g.node.selected { filter: drop-shadow(0 0 5px #1f78b4) drop-shadow(0 0 2px #1f78b4); }
.yoloq-graph g.node.group-lit { filter: drop-shadow(0 0 5px #e31a1c); }
"""

JS = """
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("viz-data").textContent);
  const canvas = document.getElementById("canvas");
  const table = document.getElementById("details-table");
  const heading = document.getElementById("details-title");
  const collapseButton = document.getElementById("collapse-button");
  const initial = canvas.firstElementChild;
  let state = "";

  function nodeElement(id) {
    return canvas.querySelector('g.node[data-id="' + CSS.escape(id) + '"]');
  }

  function showState(key) {
    if (key === state) return;
    let svg = initial;
    if (key !== "") {
      const template = document.querySelector('template[data-state="' + CSS.escape(key) + '"]');
      if (!template) return;
      svg = template.content.firstElementChild.cloneNode(true);
    }
    canvas.replaceChildren(svg);
    state = key;
    document.body.dataset.state = key;
    document.body.dataset.nodeCount = svg.getAttribute("data-node-count");
    collapseButton.hidden = key === "";
    collapseButton.querySelector("span").textContent = key.slice(data.boxPrefix.length);
  }

  function select(id) {
    const rows = data.details[id];
    if (!rows) return false;
    canvas.querySelectorAll("g.node.selected").forEach(g => g.classList.remove("selected"));
    const element = nodeElement(id);
    if (element) element.classList.add("selected");
    heading.textContent = id;
    table.replaceChildren(...rows.map(([key, value]) => {
      const row = document.createElement("tr");
      const th = document.createElement("th");
      const td = document.createElement("td");
      th.textContent = key;
      td.textContent = value;
      row.append(th, td);
      return row;
    }));
    document.getElementById("details").dataset.selected = id;
    return true;
  }

  function activate(id) {
    if (data.states.includes(id)) showState(id);
    select(id);
  }

  function lightGroup(event, on) {
    const element = event.target.closest("g.node[data-group]");
    if (!element) return;
    const group = element.getAttribute("data-group");
    canvas.querySelectorAll('g.node[data-group="' + group + '"]')
      .forEach(g => g.classList.toggle("group-lit", on));
  }

  canvas.addEventListener("click", event => {
    const element = event.target.closest("g.node");
    if (element) activate(element.getAttribute("data-id"));
  });
  canvas.addEventListener("mouseover", event => lightGroup(event, true));
  canvas.addEventListener("mouseout", event => lightGroup(event, false));
  collapseButton.addEventListener("click", () => showState(""));
  document.addEventListener("keydown", event => { if (event.key === "Escape") showState(""); });

  function clickNode(id) {
    const element = nodeElement(id);
    if (element) element.dispatchEvent(new MouseEvent("click", {bubbles: true, cancelable: true}));
    return element !== null;
  }

  function fromHash() {
    const match = /^#click=(.+)$/.exec(location.hash);
    if (!match) return;
    const id = decodeURIComponent(match[1]);
    const home = data.home[id];
    if (!nodeElement(id) && home !== undefined && home !== state) {
      if (state !== "") showState("");
      clickNode(home);
    }
    if (!clickNode(id)) activate(id);
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""
