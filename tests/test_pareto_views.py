"""The Pareto front (``sweep.pareto``) on hand-made points, and the views built from it (``dashboards``):
CSV, PNG (decoded with PIL) and the self-contained HTML (parsed with ``html.parser``)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from dashboards.layer_html import write_layer_html
from dashboards.pareto_csv import write_pareto_csv
from dashboards.pareto_html import write_pareto_html
from dashboards.pareto_png import plot_pareto_png
from dashboards.poster_reference import poster_reference
from dashboards.scene import build_scene, point_kind
from sweep.pareto import non_dominated_mask, pareto_front, pareto_ranks
from trainables.contract import DROP_KEY, MAP_KEY, TEST_DROP_KEY, TEST_MAP_KEY


def pt(m, mem, status="ok", **extra):
    """A trial's row: ``m`` is the objective (val mAP)."""
    return {MAP_KEY: m, "memory_mib": mem, "status": status, **extra}


# ----------------------------------------------------------------------------------------------------------------
# Pareto front


def test_front_of_hand_made_points():
    points = [
        pt(0.80, 10.0),  # 0 front: best mAP
        pt(0.70, 2.0),  # 1 front
        pt(0.60, 1.0),  # 2 front: smallest
        pt(0.65, 3.0),  # 3 dominated by 1 (worse mAP, bigger)
        pt(0.80, 12.0),  # 4 dominated by 0 (same mAP, bigger)
        pt(0.50, 1.0),  # 5 dominated by 2 (same size, worse mAP)
    ]
    assert non_dominated_mask(points) == [True, True, True, False, False, False]
    assert pareto_ranks(points) == [0, 0, 0, 1, 1, 1]
    assert [p["memory_mib"] for p in pareto_front(points)] == [1.0, 2.0, 10.0]


def test_the_front_is_decided_on_validation_not_test():
    """A better test mAP does not put a point on the front: test is reported beside, never optimized."""
    points = [pt(0.70, 2.0, **{TEST_MAP_KEY: 0.50}), pt(0.60, 3.0, **{TEST_MAP_KEY: 0.90})]
    assert non_dominated_mask(points) == [True, False]


def test_equal_points_are_both_on_the_front():
    points = [pt(0.7, 2.0), pt(0.7, 2.0), pt(0.6, 2.5)]
    assert non_dominated_mask(points) == [True, True, False]
    assert pareto_ranks(points) == [0, 0, 1]


def test_rows_that_cannot_take_part_are_off_the_front_and_dominate_nothing():
    points = [
        pt(0.5, 5.0),  # would be dominated by every excluded row below
        pt(0.99, 0.1, status="failed"),
        pt(0.99, 0.1, status="error"),
        pt(0.99, 0.1, status="running"),
        pt(float("nan"), 0.1),
        pt(0.99, float("inf")),
        pt(None, 0.1),
        {"memory_mib": 0.1, "status": "ok", TEST_MAP_KEY: 0.99},  # val mAP missing
        pt(True, 0.1),  # a bool is not a metric
    ]
    assert non_dominated_mask(points) == [True] + [False] * 8
    assert pareto_ranks(points) == [0] + [None] * 8


def test_layers_of_the_non_dominated_sort():
    # Three staircases (mAP grows with memory inside each); staircase L+1 is dominated by staircase L only.
    points = [
        pt(0.5 + 0.1 * i - 0.2 * layer, 1.0 + i + layer, layer=layer) for layer in range(3) for i in range(3)
    ]
    random.Random(0).shuffle(points)
    ranks = pareto_ranks(points)
    assert ranks == [p["layer"] for p in points]
    assert non_dominated_mask(points) == [p["layer"] == 0 for p in points]


def brute_force_ranks(points, objectives):
    def vec(p):
        return tuple(-p[k] if d == "max" else p[k] for k, d in objectives.items())

    remaining = set(range(len(points)))
    ranks = [None] * len(points)
    rank = 0
    while remaining:
        front = {
            i
            for i in remaining
            if not any(
                all(a <= b for a, b in zip(vec(points[j]), vec(points[i])))
                and vec(points[j]) != vec(points[i])
                for j in remaining
            )
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


@pytest.mark.parametrize("n_objectives", [2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_fast_sort_matches_brute_force(seed, n_objectives):
    rng = random.Random(seed)
    objectives = dict(list({"mAP": "max", "memory_mib": "min", "latency": "min"}.items())[:n_objectives])
    # Few distinct values so ties and duplicates happen.
    points = [
        {
            "mAP": rng.choice([0.5, 0.6, 0.7]),
            "memory_mib": rng.choice([1, 2, 3]),
            "latency": rng.choice([1, 2]),
        }
        for _ in range(40)
    ]
    assert pareto_ranks(points, objectives) == brute_force_ranks(points, objectives)
    mask = non_dominated_mask(points, objectives)
    assert mask == [r == 0 for r in pareto_ranks(points, objectives)]


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="'maximize'.*'max' or 'min'"):
        non_dominated_mask([pt(0.5, 1.0)], {MAP_KEY: "maximize"})
    with pytest.raises(ValueError, match="at least one"):
        pareto_ranks([pt(0.5, 1.0)], {})


def test_empty_input():
    assert non_dominated_mask([]) == [] and pareto_ranks([]) == [] and pareto_front([]) == []


# ----------------------------------------------------------------------------------------------------------------
# views

NASTY = "<b>bold</b> & \"quotes\" 'single' </script>"


def make_rows() -> list[dict]:
    """8 finished trials on a known front of 4, 2 failed (one with no metrics, one NaN), 1 still running."""
    rows = [
        pt(0.80, 8.0, config={"threshold": 0.1, "bits": 8}),
        pt(0.75, 2.0, config={"threshold": 0.5, "bits": 6}),
        pt(0.60, 0.9, config={"threshold": 1.2, "bits": 4}),
        pt(0.40, 0.5, config={"threshold": 2.0, "bits": 2, "note": NASTY}),
        pt(0.70, 3.0, config={"threshold": 0.6, "bits": 8}),
        pt(0.55, 1.5, config={"threshold": 1.0, "bits": 5}),
        pt(0.78, 9.5, config={"threshold": 0.1, "bits": 7}),
        pt(0.30, 0.95, config={"threshold": 1.9, "bits": 2}),
        pt(None, None, status="failed", config={"threshold": 3.0, "bits": 1}),
        pt(float("nan"), 0.4, config={"threshold": 2.5, "bits": 1}),
        pt(None, None, status="running", config={"threshold": 0.3, "bits": 3}),
    ]
    for i, (row, on) in enumerate(zip(rows, non_dominated_mask(rows))):
        row["trial_id"] = f"trial_{i:02d}"
        row["pareto"] = on
        finished = isinstance(row[MAP_KEY], float) and math.isfinite(row[MAP_KEY])
        # Test a little below val, so a view that swaps them shows.
        row[TEST_MAP_KEY] = row[MAP_KEY] - 0.03 if finished else None
        row[DROP_KEY] = 1 - row[MAP_KEY] / 0.82 if finished else None
        row[TEST_DROP_KEY] = 1 - row[TEST_MAP_KEY] / 0.79 if finished else None
    return rows


BASE = {MAP_KEY: 0.82, TEST_MAP_KEY: 0.79, "memory_mib": 40.0}
#: The baselines on the axis' split: thumbnails are the best zero-byte one, above two front points (0.40, 0.60).
BASELINES = {"random": 0.02, "thumbnails": 0.62, "histogram": 0.45, "off_the_shelf": 0.70}


def test_point_kinds_of_the_fixture():
    kinds = [point_kind(r) for r in make_rows()]
    assert kinds.count("front") == 4 and kinds.count("dominated") == 4
    assert kinds[8:] == ["failed", "failed", "pending"]


def test_csv_has_the_columns_and_a_row_per_trial(tmp_path):
    rows = make_rows()
    path = write_pareto_csv(rows, tmp_path / "pareto.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows)
    assert list(table[0])[:6] == ["trial_id", "status", "pareto", MAP_KEY, TEST_MAP_KEY, "memory_mib"]
    assert {DROP_KEY, TEST_DROP_KEY, "config.threshold", "config.bits", "config.note"} <= set(table[0])
    assert "below_zero_byte_baseline" not in table[0]  # no baselines given
    # Front first, by memory; then dominated by memory; then failed and unfinished.
    assert [r["pareto"] for r in table] == ["true"] * 4 + ["false"] * 7
    front_mem = [float(r["memory_mib"]) for r in table[:4]]
    assert front_mem == sorted(front_mem) == [0.5, 0.9, 2.0, 8.0]
    assert [r["status"] for r in table[-3:]] == ["failed", "ok", "running"]
    by_id = {r["trial_id"]: r for r in table}
    assert by_id["trial_03"]["config.note"] == NASTY  # csv quoting round-trips anything
    assert by_id["trial_08"][MAP_KEY] == "" and by_id["trial_09"][MAP_KEY] == "nan"
    assert float(by_id["trial_01"][MAP_KEY]) == 0.75
    assert float(by_id["trial_01"][TEST_MAP_KEY]) == pytest.approx(0.72)


def test_csv_marks_trials_below_the_best_zero_byte_baseline(tmp_path):
    path = write_pareto_csv(make_rows(), tmp_path / "pareto.csv", baselines=BASELINES)
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[6] == "below_zero_byte_baseline"
    below = {r["trial_id"]: r["below_zero_byte_baseline"] for r in table}
    # Front 0.40 and 0.60 < thumbnails 0.62; 0.75 and 0.80 above; failed/unfinished: nothing to say.
    assert [below[f"trial_{i:02d}"] for i in (3, 2, 1, 0)] == ["true", "true", "false", "false"]
    assert below["trial_05"] == "true" and below["trial_04"] == "false"  # dominated rows are marked too
    assert below["trial_08"] == below["trial_09"] == below["trial_10"] == ""


def test_png_is_written_and_decodes(tmp_path):
    path = plot_pareto_png(
        make_rows(), tmp_path / "pareto.png", base=BASE, reference=poster_reference("alexnet", "oxford5k")
    )
    assert path.stat().st_size > 20_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (960, 600)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50  # a plot, not a blank canvas


@pytest.mark.parametrize("reference", [None, ("alexnet", "oxford5k")], ids=["own-trials", "with-poster"])
def test_axes_have_readable_ticks(reference):
    """Both renderers draw the scene's ticks: at least 3 per axis, distinct plain-decimal labels, in order."""
    ref = poster_reference(*reference) if reference else None
    scene = build_scene(make_rows(), base=BASE, reference=ref)
    lo, hi = scene.x_range
    for name, ticks in (("x", scene.x_ticks), ("ratio", scene.ratio_ticks), ("y", scene.y_ticks)):
        labels = [t.label for t in ticks]
        assert len(ticks) >= 3, (name, labels)
        assert len(set(labels)) == len(labels), (name, labels)
        assert all("e" not in label and "^" not in label for label in labels), (name, labels)
        values = [t.value for t in ticks]
        assert values == sorted(values), (name, labels)
    for t in scene.x_ticks:
        assert lo <= math.log10(t.value) <= hi and float(t.label) == pytest.approx(t.value)
    for t in scene.ratio_ticks:  # a ratio tick stands where memory = base / ratio
        assert lo - 1e-9 <= math.log10(t.value) <= hi + 1e-9
        assert float(t.label.rstrip("×")) == pytest.approx(BASE["memory_mib"] / t.value)
    assert [t.label for t in scene.y_ticks] == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8"]


def test_baselines_are_lines_on_the_axis():
    """The best zero-byte baseline and the off-the-shelf network are always on the y axis; a weaker zero-byte
    baseline far below the front (a random ranking) is named, not drawn, so the front is not squashed."""
    rows = [r for r in make_rows() if r[MAP_KEY] is None or r[MAP_KEY] >= 0.75]  # a front far above the lines
    scene = build_scene(
        rows, base=BASE, baselines={**BASELINES, "thumbnails": 0.3, "histogram": 0.25, "off_the_shelf": 0.2}
    )
    drawn = {b.name: b for b in scene.baselines}
    assert list(drawn) == ["thumbnails", "histogram", "off_the_shelf"]  # the contract's order
    assert [b.name for b in scene.baselines_off_axis] == ["random"]
    assert scene.best_baseline.name == "thumbnails" and drawn["thumbnails"].best
    assert not drawn["histogram"].best and not drawn["off_the_shelf"].zero_byte
    lo, hi = scene.y_range
    assert lo < 0.2 and hi > 0.82
    assert drawn["thumbnails"].text == "16×16 thumbnails 0.3 (best zero-byte)"
    assert scene.front_below == []
    # NaN (a baseline that could not be measured) is left out; no zero-byte baseline, no best one.
    scene = build_scene(rows, baselines={"thumbnails": float("nan"), "off_the_shelf": 0.5})
    assert [b.name for b in scene.baselines] == ["off_the_shelf"] and scene.best_baseline is None
    assert build_scene(rows).baselines == []


def test_png_draws_the_baselines(tmp_path):
    """The best zero-byte baseline's colour (purple) and the below-baseline ring (red) appear only with them."""

    def pixels(path):
        with Image.open(path) as im:
            return {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20)}

    purple = (0x94, 0x67, 0xBD)
    without = pixels(plot_pareto_png(make_rows(), tmp_path / "a.png", base=BASE))
    with_lines = pixels(plot_pareto_png(make_rows(), tmp_path / "b.png", base=BASE, baselines=BASELINES))
    assert purple in with_lines and purple not in without


@pytest.mark.parametrize("memories", [[1.0], [0.9, 1.6], [0.5, 40.0], [0.05, 500.0], [1e-3, 1e4]])
def test_memory_ticks_on_narrow_and_wide_ranges(memories):
    rows = [pt(0.5 + 0.01 * i, m, trial_id=str(i), pareto=True) for i, m in enumerate(memories)]
    scene = build_scene(rows, base={MAP_KEY: 0.6, "memory_mib": max(memories) * 2})
    for ticks in (scene.x_ticks, scene.ratio_ticks):
        labels = [t.label for t in ticks]
        assert 3 <= len(labels) <= 10 and len(set(labels)) == len(labels), labels


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [pt(None, None, status="failed", trial_id="x", config={})],
        [pt(0.5, 1.0, trial_id="a", pareto=True)],
    ],
    ids=["no-trials", "all-failed", "single-point"],
)
def test_png_and_html_handle_degenerate_sweeps(tmp_path, rows):
    plot_pareto_png(rows, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        im.verify()
    write_pareto_html(rows, tmp_path / "p.html")
    doc = parse_html(tmp_path / "p.html")
    assert doc.errors == []
    assert doc.find("svg", id="pareto-plot")


class Doc(HTMLParser):
    """Elements with their attributes (unescaped by the parser) and a check that tags nest."""

    VOID = {
        "meta",
        "br",
        "img",
        "input",
        "link",
        "hr",
        "area",
        "base",
        "col",
        "embed",
        "source",
        "track",
        "wbr",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.texts.append(data)

    def find(self, tag=None, **attrs):
        return [
            a
            for t, a in self.elements
            if (tag is None or t == tag) and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]

    def elements_of(self, tag):
        return [a for t, a in self.elements if t == tag]

    def with_class(self, tag, *classes):
        return [
            a for t, a in self.elements if t == tag and set(classes) <= set((a.get("class") or "").split())
        ]


def parse_html(path: Path) -> Doc:
    doc = Doc()
    doc.feed(path.read_text(encoding="utf-8"))
    doc.close()
    if doc.stack:
        doc.errors.append(f"unclosed: {doc.stack}")
    return doc


def assert_self_contained(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "//cdn" not in text
    doc = parse_html(path)
    for tag, attrs in doc.elements:
        for key in ("src", "href", "xlink:href", "action", "srcset"):
            assert key not in attrs, f"<{tag} {key}=...> would load something"
        assert tag not in ("link", "iframe", "img", "object", "embed")
    csp = doc.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_a_stopped_trial_is_drawn_as_stopped_early_at_its_early_memory(tmp_path):
    stopped = pt(None, None, status="stopped", config={"threshold": 0.2, "bits": 3})
    stopped.update(trial_id="trial_stop", pareto=False, early_memory_mib=1.2, stopped_reason="dominated by …")
    rows = [*make_rows(), stopped]
    assert point_kind(stopped) == "stopped"
    scene = build_scene(rows)
    (point,) = [p for p in scene.stuck if p.kind == "stopped"]
    assert point.x_log == pytest.approx(math.log10(1.2))  # where the file it would have shipped sits
    doc = parse_html(write_pareto_html(rows, tmp_path / "pareto.html"))
    (circle,) = doc.with_class("circle", "point", "stopped")
    assert circle["data-trial-id"] == "trial_stop"
    assert len(doc.with_class("circle", "point", "pending")) == 1  # the running trial only
    assert "1 stopped early" in (tmp_path / "pareto.html").read_text(encoding="utf-8")
    plot_pareto_png(rows, tmp_path / "pareto.png")
    assert Image.open(tmp_path / "pareto.png").size[0] > 0


def test_html_shows_front_dominated_failed_base_and_references(tmp_path):
    rows = make_rows()
    ref = poster_reference("alexnet", "oxford5k")
    path = write_pareto_html(rows, tmp_path / "pareto.html", base=BASE, reference=ref, subtitle="sweep x")
    doc = parse_html(path)
    assert doc.errors == []
    assert_self_contained(path)
    assert len(doc.find("svg", id="pareto-plot")) == 1
    front = doc.with_class("circle", "point", "front")
    assert len(front) == 4
    assert len(doc.with_class("circle", "point", "dominated")) == 4
    assert len(doc.with_class("circle", "point", "failed")) == 2
    assert len(doc.with_class("circle", "point", "pending")) == 1
    assert len(doc.with_class("circle", "point")) == len(rows)  # the legend does not count as points
    assert len(doc.find(id="base-point")) == 1
    assert len(doc.with_class("rect", "reference-point")) == len(ref) == 7
    assert doc.find(id="front-line") and doc.find("script") and doc.find(id="tooltip")
    assert {a["data-trial-id"] for a in front} == {"trial_00", "trial_01", "trial_02", "trial_03"}
    # Front table: one line per front member, smallest first.
    table_rows = [a for t, a in doc.elements if t == "tr" and "data-trial-id" in a]
    assert [a["data-trial-id"] for a in table_rows] == ["trial_03", "trial_02", "trial_01", "trial_00"]
    # Memory grows to the right (log scale), mAP grows upwards.
    by_id = {a["data-trial-id"]: a for a in front}
    assert float(by_id["trial_03"]["cx"]) < float(by_id["trial_02"]["cx"]) < float(by_id["trial_00"]["cx"])
    assert float(by_id["trial_00"]["cy"]) < float(by_id["trial_03"]["cy"])
    text = "".join(doc.texts)
    assert "4</b> on the Pareto front" in path.read_text() and "sweep x" in text


def test_html_tooltips_carry_each_config_escaped(tmp_path):
    rows = make_rows()
    path = write_pareto_html(rows, tmp_path / "pareto.html", base=BASE)
    raw = path.read_text(encoding="utf-8")
    # The nasty config value never appears raw: it could close the attribute or the script.
    assert NASTY not in raw and "<b>bold</b>" not in raw and raw.count("</script>") == 1
    doc = parse_html(path)
    assert doc.errors == []
    points = {a["data-trial-id"]: a for a in doc.with_class("circle", "point")}
    for row in rows:
        attrs = points[row["trial_id"]]
        assert json.loads(attrs["data-config"]) == row["config"]
        tip = attrs["data-tooltip"]
        assert row["trial_id"] in tip
        for key, value in row["config"].items():
            assert f"{key}: {value}" in tip
    assert NASTY in points["trial_03"]["data-tooltip"]  # after unescaping, the exact text
    assert "20.0x smaller than base" in points["trial_01"]["data-tooltip"]
    assert f"{MAP_KEY}: 0.75   {TEST_MAP_KEY}: 0.72" in points["trial_01"]["data-tooltip"]
    assert "below the best zero-byte baseline" not in raw  # no baselines given
    assert not doc.find("line", class_="baseline")


def test_html_draws_the_baselines_and_marks_the_front_below_them(tmp_path):
    rows = make_rows()
    path = write_pareto_html(rows, tmp_path / "pareto.html", base=BASE, baselines=BASELINES)
    doc = parse_html(path)
    assert doc.errors == []
    assert_self_contained(path)
    lines = {a["data-baseline"]: a for a in doc.elements_of("line") if "data-baseline" in a}
    # The random ranking (0.02) is far below the front: named, not drawn.
    assert set(lines) == {"thumbnails", "histogram", "off_the_shelf"}
    assert [n for n, a in lines.items() if "best" in a["class"].split()] == ["thumbnails"]
    assert float(lines["thumbnails"]["data-map"]) == 0.62
    assert "off-the-shelf" in lines["off_the_shelf"]["class"]
    # On the same scale as the points: the line at 0.62 is between the points at 0.60 and 0.75.
    points = {a["data-trial-id"]: a for a in doc.with_class("circle", "point")}
    y_line = float(lines["thumbnails"]["y1"])
    assert float(points["trial_01"]["cy"]) < y_line < float(points["trial_02"]["cy"])
    labels = "".join(doc.texts)
    assert "16×16 thumbnails 0.62 (best zero-byte)" in labels and "off-the-shelf network 0.7" in labels
    assert "Off the axis: random ranking 0.02" in labels
    # The two front points below 0.62 are marked on the plot, in the tooltip and in the table.
    below = {a["data-trial-id"] for a in doc.with_class("circle", "point", "front", "below-baseline")}
    assert below == {"trial_02", "trial_03"}
    assert not doc.with_class("circle", "point", "dominated", "below-baseline")
    assert (
        "below the best zero-byte baseline (16×16 thumbnails, val_mAP 0.62)"
        in points["trial_02"]["data-tooltip"]
    )
    assert "below the best zero-byte baseline" not in points["trial_01"]["data-tooltip"]
    table_rows = [a for t, a in doc.elements if t == "tr" and "data-trial-id" in a]
    assert [a.get("class") for a in table_rows] == ["below-baseline", "below-baseline", None, None]
    assert "2</b> front points below it" in path.read_text()


def test_front_table_shows_test_beside_val(tmp_path):
    path = write_pareto_html(make_rows(), tmp_path / "pareto.html", base=BASE, baselines=BASELINES)
    table = front_table_cells(path)
    assert table[0] == [
        "trial", "memory_mib", "× smaller", MAP_KEY, TEST_MAP_KEY, "val drop", "test drop",
        "vs 16×16 thumbnails (0.62)", "config",
    ]  # fmt: skip
    t01 = next(r for r in table if r[0] == "trial_01")
    assert t01[1:8] == ["2", "20", "0.75", "0.72", "8.5%", "8.9%", "+0.130"]
    t02 = next(r for r in table if r[0] == "trial_02")
    assert t02[7] == "below (-0.020)"
    # Without logged drops, each is computed from the base on its own split.
    rows = [{k: v for k, v in r.items() if k not in (DROP_KEY, TEST_DROP_KEY)} for r in make_rows()]
    path = write_pareto_html(rows, tmp_path / "p2.html", base=BASE)
    t01 = next(r for r in front_table_cells(path) if r[0] == "trial_01")
    assert t01[5:7] == ["8.5%", "8.9%"] and len(t01) == 8  # no baseline column without baselines


class Cells(HTMLParser):
    """The text of each cell of ``table#front-table``, row by row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.inside = self.cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == "front-table"
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.rows[-1].append("")
            self.cell = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cell = False
        elif tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.cell:
            self.rows[-1][-1] += data


def front_table_cells(path: Path) -> list[list[str]]:
    parser = Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.rows


def test_reference_points_need_a_base_and_a_comparable_dataset(tmp_path):
    assert poster_reference("alexnet", "synthetic-test") is None
    assert poster_reference("tiny", "oxford5k") is None
    paris = poster_reference("VGG16", "rparis6k")
    oxford = poster_reference("vgg16", "oxford5k")
    assert [p["memory_mib"] for p in paris] == [529.5, 89.6, 65.1, 40.5, 21.7, 42.1, 21.2]
    assert paris[4][DROP_KEY] == pytest.approx(0.141) and oxford[4][DROP_KEY] == pytest.approx(0.118)
    path = write_pareto_html(make_rows(), tmp_path / "p.html", base=None, reference=oxford)
    doc = parse_html(path)
    assert not doc.with_class("rect", "reference-point") and not doc.find(id="base-point")
    assert "cannot be placed without the base mAP" in path.read_text()


def test_layer_view(tmp_path):
    layers = [
        {
            "name": "backbone.0",
            "group": "conv",
            "params": 864,
            "nonzeros": 432,
            "sparsity": 0.5,
            "bits": 6,
            "bytes": 400,
        },
        {
            "name": "pool.conv",
            "group": "netvlad",
            "params": 2048,
            "nonzeros": 1024,
            "sparsity": 0.5,
            "bits": 4,
            "bytes": 700,
        },
        {
            "name": "whiten",
            "group": "whitening",
            "params": 65536,
            "nonzeros": 6554,
            "sparsity": 0.9,
            "bits": 3,
            "bytes": 4000,
        },
        {
            "name": "whiten.bias<&>",
            "group": "whitening",
            "params": 256,
            "nonzeros": 256,
            "sparsity": 0.0,
            "bits": None,
            "bytes": 512,
            "dtype": "fp16",
        },
    ]
    path = write_layer_html(layers, tmp_path / "layers.html", title="trial <1> layers")
    assert_self_contained(path)
    doc = parse_html(path)
    assert doc.errors == []
    assert len(doc.find("svg", id="layer-plot")) == 1 and len(doc.find("table", id="layer-table")) == 1
    for kind in ("sparsity", "bits", "bytes"):
        bars = doc.with_class("rect", "bar", kind)
        assert len(bars) == len(layers)
    widths = {a["data-layer"]: float(a["width"]) for a in doc.with_class("rect", "bar", "bytes")}
    assert widths["whiten"] > widths["pool.conv"] > widths["backbone.0"]
    assert float(doc.with_class("rect", "bar", "bits")[3]["width"]) == 0.0  # no bits: an empty bar
    table_rows = [a for t, a in doc.elements if t == "tr" and "data-layer" in a]
    assert [a["data-layer"] for a in table_rows] == [layer["name"] for layer in layers]
    text = "".join(doc.texts)
    assert "trial <1> layers" in text and "90.00%" in text and "fp16" in text
    assert "68,704 parameters" in text and "8,266 nonzeros" in text


def test_views_agree_with_the_front_on_random_sweeps(tmp_path):
    rng = random.Random(3)
    rows = []
    for i, (t, b) in enumerate(itertools.product([0.1, 0.5, 1.0, 2.0], [2, 4, 8])):
        mem = 10 * (1 - 0.45 * t) * b / 8 + 0.2
        rows.append(
            pt(
                0.8 - 0.1 * t * t - 0.02 * (8 - b) + rng.gauss(0, 0.02),
                mem,
                trial_id=str(i),
                config={"t": t, "b": b},
            )
        )
    for row, on in zip(rows, non_dominated_mask(rows)):
        row["pareto"] = on
    path = write_pareto_html(rows, tmp_path / "p.html", base=BASE)
    doc = parse_html(path)
    assert len(doc.with_class("circle", "point", "front")) == sum(r["pareto"] for r in rows)
    assert math.isclose(
        len(doc.with_class("circle", "point", "dominated")) + sum(r["pareto"] for r in rows), len(rows)
    )


def test_layer_view_reads_size_report_rows(tmp_path):
    """Rows of ``SizeReport.to_dict()["layers"]`` (``parameters``/``payload_bytes``) go in unchanged."""
    report = pytest.importorskip("trainables.compression.report")
    import dataclasses

    fields = [f.name for f in dataclasses.fields(report.LayerSize)]
    assert {"name", "group", "parameters", "nonzeros", "sparsity", "bits", "payload_bytes"} <= set(fields)
    row = dict.fromkeys(fields, 0)
    row.update(name="pool.conv.weight", group="netvlad", kind="quantized", encoding="csr", parameters=4096)
    row.update(nonzeros=1024, sparsity=0.75, bits=4, payload_bytes=900)
    path = write_layer_html(
        [row], tmp_path / "layers.html", totals={"file_bytes": 1200, "memory_mib": 0.0011}
    )
    doc = parse_html(path)
    assert doc.errors == []
    assert float(doc.with_class("rect", "bar", "bytes")[0]["width"]) > 0
    text = "".join(doc.texts)
    assert "4,096 parameters" in text and "file_bytes = 1,200" in text
