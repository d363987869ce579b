"""The frame both HTML views share: a self-contained page (inline CSS and script, a Content-Security-Policy that
forbids fetching anything) with a hover tooltip for every element that has a ``data-tooltip``.

With no external resource of any kind the pages render offline and inside MLflow's sandboxed artifact viewer.
"""

from __future__ import annotations

import html
from typing import Any

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em 0; } p.sub { color: #555; margin: 0 0 .8em 0; }
#summary { margin: .4em 0 .8em 0; } #summary b { font-weight: 600; }
svg text { font-size: 11px; fill: #333; } svg .axis-label { font-size: 12px; }
.grid { stroke: #e5e5e5; } .axis { stroke: #444; }
#tooltip { position: absolute; background: #fffff2; border: 1px solid #999; padding: 6px 8px; font: 12px monospace;
  white-space: pre; pointer-events: none; box-shadow: 0 2px 6px rgba(0,0,0,.2); max-width: 60em; z-index: 10; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; } th { background: #f4f4f4; text-align: left; }
td.text { text-align: left; font-family: monospace; font-size: 12px; }
tr:hover td { background: #f6faff; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
"""

# Shows an element's data-tooltip on hover. textContent only: no data is ever parsed as HTML. The <title>
# children (the tooltip for readers without script) are removed so the browser does not show both.
SCRIPT = """
(function () {
  var tip = document.getElementById("tooltip");
  document.querySelectorAll("[data-tooltip] > title").forEach(function (t) { t.remove(); });
  function place(e) { tip.style.left = (e.pageX + 14) + "px"; tip.style.top = (e.pageY + 14) + "px"; }
  document.querySelectorAll("svg").forEach(function (svg) {
    svg.addEventListener("mousemove", function (e) {
      var el = e.target.closest ? e.target.closest("[data-tooltip]") : null;
      if (!el) { tip.hidden = true; return; }
      tip.textContent = el.getAttribute("data-tooltip");
      tip.hidden = false;
      place(e);
    });
    svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  });
})();
"""


def attr(value: Any) -> str:
    """``value`` as text safe inside a double-quoted attribute."""
    return html.escape(str(value), quote=True)


def esc(value: Any) -> str:
    """``value`` as text safe inside an element."""
    return html.escape(str(value))


def tooltip_attrs(tip: str) -> str:
    """The attribute the script shows on hover; pair it with ``title_element(tip)`` as the element's child."""
    return f'data-tooltip="{attr(tip)}"'


def title_element(tip: str) -> str:
    return f"<title>{esc(tip)}</title>"


def page(title: str, subtitle: str | None, body: str, style: str = "") -> str:
    """A whole document: ``title`` as its heading, ``subtitle`` under it, then ``body`` (HTML, already escaped);
    ``style`` is CSS added after the shared rules."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}{style}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{sub}\n{body}\n"
        '<div id="tooltip" hidden></div>\n'
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
