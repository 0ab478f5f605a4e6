"""The HTML report in a real browser: Debian's headless ``chromium``, started by the test itself (no stand-in;
if chromium is missing the test fails: scripts/setup.sh installs it). The page is the report of the synthetic sweep
of tests/report_store.py, so every number read back from the rendered DOM is checked against the values
the store was written with. A copy of the page gets a small script that, after load, records each image's
decoded size and its number of distinct pixel colours as the browser drew it onto a canvas. The Pareto plot
is inline SVG in the page, so its error bars and labels are read back from the rendered DOM as well."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import pytest

from reports import sweep_report
from reports.browser import dump_dom, screenshot
from tests import report_store as rs

PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const px = c.width && c.height ? ctx.getImageData(0, 0, c.width, c.height).data : [];
    const seen = new Set();
    for (let k = 0; k < px.length && seen.size < 1000; k += 4)
      seen.add(((px[k] << 24) | (px[k + 1] << 16) | (px[k + 2] << 8) | px[k + 3]) >>> 0);
    img.dataset.natural = img.naturalWidth + "x" + img.naturalHeight;
    img.dataset.colours = seen.size;
  }
  document.body.dataset.probed = "yes";
});
</script>"""


class DomTables(HTMLParser):
    """Tables (class, rows of (text, td classes)), images (attributes) and headings of a serialised DOM."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.headings = [], [], []
        self._cell = self._heading = None
        self.body = {}
        self.figures = []  # inline SVG figures: aria-label
        self.marks: dict = {}  # SVG <g id=...> -> the "d" of the paths inside it
        self.svg_text: list = []  # text drawn in the SVG figures
        self._mark = None
        self._in_svg_text = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"class": a.get("class", ""), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = ["", set((a.get("class") or "").split())]
            self.tables[-1]["rows"][-1].append(self._cell)
        elif tag == "img":
            self.images.append(a)
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = [tag, ""]
            self.headings.append(self._heading)
        elif tag == "body":
            self.body = a
        elif tag == "figure" and "svg" in (a.get("class") or ""):
            self.figures.append(a.get("aria-label"))
        elif tag == "g" and (a.get("id") or "").startswith("xerr-"):
            self._mark = a["id"]
            self.marks[self._mark] = []
        elif tag == "path" and self._mark is not None:
            self.marks[self._mark].append(a.get("d", ""))
        elif tag == "text":
            self._in_svg_text = True
            self.svg_text.append("")

    def handle_endtag(self, tag):
        if tag == "g":
            self._mark = None
        elif tag == "text":
            self._in_svg_text = False
        if tag in ("td", "th"):
            self._cell = None
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = None

    def handle_data(self, data):
        if self._in_svg_text:
            self.svg_text[-1] += data
        if self._cell is not None:
            self._cell[0] += data
        if self._heading is not None:
            self._heading[1] += data


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    uri, sweep = rs.build_store(root)
    md = sweep_report("devrep", uri, root / "out").read_text()
    page = (root / "out" / "report.html").read_text()
    probe = root / "out" / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = DomTables()
    dom.feed(dump_dom(probe))
    return root, sweep, md, page, dom


def _table(dom: DomTables, css: str) -> list[list]:
    found = [t["rows"] for t in dom.tables if t["class"] == css]
    assert len(found) == 1, f"{len(found)} tables of class {css!r}"
    return found[0]


def _close(text: str, value: float) -> bool:
    """``text`` is ``value`` shown to its last digit: within half a unit of that digit."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-12


def test_the_page_renders_with_the_markdowns_content(rendered):
    _, _, md, _, dom = rendered
    assert dom.body.get("data-probed") == "yes"  # the page loaded and ran to its load event
    assert [h for h in dom.headings if h[0] == "h1"] == [["h1", "Sweep report: devrep"]]
    md_headings = re.findall(r"^#{2,} (.+)$", md, flags=re.M)
    assert [h[1] for h in dom.headings if h[0] != "h1"] == md_headings
    # every Markdown table, cell for cell, is a rendered table (bold and link syntax aside)
    md_tables, cur = [], []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln)
        elif cur:
            md_tables.append(cur)
            cur = []
    assert len(md_tables) == len(dom.tables) == 11
    for lines, table in zip(md_tables, dom.tables):
        want = [[re.sub(r"^\*\*(.*)\*\*$", r"\1", c.strip()).replace("\\|", "|")
                 for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]] for ln in lines[:1] + lines[2:]]
        assert [[c[0] for c in row] for row in table["rows"]] == want


def test_the_tables_hold_the_runs_numbers(rendered):
    _, sweep, _, _, dom = rendered
    rows = _table(dom, "summary")
    head = [c[0] for c in rows[0]]
    col = {h: i for i, h in enumerate(head)}
    seen = set()
    for row in rows[1:]:
        text = [c[0] for c in row]
        key = (text[col["scheme"]], text[col["method"]])
        ppl, lam, hel, host, phone = rs.TRUTH[key]
        checks = {"ppl wiki/seq32": ppl, "vs fp": ppl / 20.0, "lambada acc": lam, "hellaswag acc_norm": hel,
                  "host prefill ms": host[0], "host decode tok/s": host[1], "galaxy-s24 prefill ms": phone[0],
                  "galaxy-s24 decode tok/s": phone[1], "galaxy-s24 mJ/tok": phone[2]}
        for h, v in checks.items():  # a median with its interval: "180 [171, 189]"
            assert _close(text[col[h]].split(" [")[0], v), (key, h, text[col[h]], v)
        seen.add(key)
    assert seen == set(rs.TRUTH) and not any("qnn-sim" in h for h in head)
    # the best of each column carries the class: W8A8 MobileQuant for quality, W4A8 RTN for the device
    # columns whose best is told apart from the rest (not the prefill times: their intervals overlap)
    best = {(row[col["scheme"]][0], row[col["method"]][0], head[i]) for row in rows[1:]
            for i, c in enumerate(row) if "best" in c[1]}
    assert best == {("w8a8", "mobilequant", h) for h in ("ppl wiki/seq32", "vs fp", "lambada acc",
                                                         "hellaswag acc_norm")} | \
        {("w4a8", "rtn", h) for h in ("host decode tok/s", "galaxy-s24 decode tok/s", "galaxy-s24 mJ/tok")}
    # every trial's perplexity and quantize time in the trials table
    trials = _table(dom, "trials")
    tcol = {c[0]: i for i, c in enumerate(trials[0])}
    by_short = {t.short: t for t in sweep.trials}
    assert sorted(r[0][0] for r in trials[1:]) == sorted(by_short)
    for r in trials[1:]:
        t = by_short[r[0][0]]
        if rs.key_of(t) == rs.FAILED:
            assert r[tcol["status"]][0] == "FAILED" and r[tcol["error"]][0] == rs.ERROR
            continue
        assert _close(r[tcol["ppl/wiki/seq32"]][0], rs.TRUTH[rs.key_of(t)][0])
        assert r[tcol["quantize s"]][0] == {"rtn": "0 s", "smoothquant": "3 s", "mobilequant": "4m44s",
                                           "none": "0 s"}[t.config["method"]]
    # confidence intervals of the phone's prefill times, +-5 % of the median
    for r in _table(dom, "devices")[1:]:
        cells = [c[0] for c in r]
        if cells[3] == "galaxy-s24":
            median = rs.TRUTH[(cells[1], cells[2])][4][0]
            assert _close(cells[5], median * 0.95) and _close(cells[6], median * 1.05)


def test_every_plot_is_present_and_not_empty(rendered):
    from PIL import Image

    _, _, md, _, dom = rendered
    alts = re.findall(r"^!\[([^\]]*)\]\(([^)]*)\)$", md, flags=re.M)
    # the Pareto plot is inline SVG on the page (its marks are DOM), the others embedded PNGs
    assert [a for a, p in alts if p != "pareto.png"] == [i.get("alt") for i in dom.images]
    assert [a for a, p in alts if p == "pareto.png"] == dom.figures
    assert {p for _, p in alts} == {"ratio_to_fp.png", "pareto.png", "training_loss.png"}
    for img in dom.images:
        w, h = map(int, img["data-natural"].split("x"))
        assert w > 200 and h > 200 and int(img["data-colours"]) > 50, img["alt"]  # the browser drew a picture
        assert img["src"].startswith("data:image/png;base64,")  # embedded: the page stands alone
        pic = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert pic.size == (w, h)
        lo, hi = zip(*pic.convert("RGB").getextrema())
        assert lo != hi  # not a single colour


def test_a_screenshot_of_the_report_is_a_real_picture(rendered, tmp_path):
    from PIL import Image

    root, _, _, _, _ = rendered
    png = screenshot(root / "out" / "report.html", tmp_path / "shot.png", width=1300, height=1400)
    pic = Image.open(png).convert("RGB")
    assert pic.size == (1300, 1400)
    colours = pic.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 100  # text, bars and table shading, not a blank page


def _bar(d: str) -> tuple[float, float, float]:
    """(x left, x right, y) of an error bar's path ``M x0 y L x1 y``."""
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]
    assert len(nums) == 4 and abs(nums[1] - nums[3]) < 1e-6, d  # one horizontal segment
    return min(nums[0], nums[2]), max(nums[0], nums[2]), nums[1]


def test_ratio_columns_and_error_bars_read_back_from_the_page(rendered):
    """The host's session ratios in the summary table (with their intervals), and the error bars the
    browser drew for them: on the host's linear axis each bar spans its interval, so every bar's pixel
    width over its interval's width is one scale, and its middle sits at the ratio on that scale. The
    frontier points that are not separable say so on the plot."""
    from reports.device_metrics import Interval
    from reports import fmt

    _, sweep, _, _, dom = rendered
    rows = _table(dom, "summary")
    head = [c[0] for c in rows[0]]
    col = {h: i for i, h in enumerate(head)}
    fp_host = rs.TRUTH[("fp", "none")][3]
    seen = 0
    for row in rows[1:]:
        text = [c[0] for c in row]
        key = (text[col["scheme"]], text[col["method"]])
        if key == ("fp", "none"):
            assert text[col["host prefill vs fp"]] == "-"
            continue
        r = rs.TRUTH[key][3][0] / fp_host[0]
        m = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", text[col["host prefill vs fp"]])
        assert m, text[col["host prefill vs fp"]]
        assert _close(m[1], r) and _close(m[2], r * (1 - rs.RATIO_CI)) and _close(m[3], r * (1 + rs.RATIO_CI))
        assert text[col["host prefill vs fp"]] == fmt.interval(Interval(r, r * 0.97, r * 1.03, is_ratio=True))
        seen += 1
    assert seen == 6
    # the error bars: one per point of the host panel but FP (exact), each a horizontal segment
    bars = {k.split("xerr-host-", 1)[1]: _bar(v[0]) for k, v in dom.marks.items() if k.startswith("xerr-host-")}
    assert sorted(bars) == sorted(f"{s}-{m}" for s, m in rs.TRUTH if s != "fp")
    scale, offsets = [], []
    for name, (x0, x1, _) in bars.items():
        s_, m_ = name.split("-", 1)
        r = rs.TRUTH[(s_, m_)][3][0] / fp_host[0]
        px_per_unit = (x1 - x0) / (2 * rs.RATIO_CI * r)
        scale.append(px_per_unit)
        offsets.append((x0 + x1) / 2 - px_per_unit * r)
    assert max(scale) / min(scale) < 1.01 and max(offsets) - min(offsets) < 1.0, (scale, offsets)
    labels = " | ".join(dom.svg_text)
    for s_, m_ in rs.NOT_SEPARABLE:
        assert f"{s_} {m_} (not separable)" in labels
    assert "w8a8 mobilequant (not separable)" not in labels
