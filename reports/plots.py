"""The report's pictures (PNG, matplotlib's Agg backend): the ratio to FP per method and scheme, and the
quality/latency/energy Pareto view per device. Value labels use ``reports.fmt``, as the tables do.
Each function returns False and writes nothing when there is nothing to draw."""

from __future__ import annotations

from pathlib import Path

from . import fmt
from .summary import RATIO, ParetoPoint, _is_fp
from .tables import sort_key

DPI = 110


def mark_id(kind: str, device: str, label: str) -> str:
    """The SVG id of a plot mark (``xerr-host-w8a8-rtn``): letters, digits and dashes only."""
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", f"{kind}-{device}-{label}").strip("-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_bars(rows: list[dict], path: Path, title: str) -> bool:
    """Grouped bars, one panel per model: methods along x, one bar per scheme, height = ratio to FP (the
    dashed line at 1 is FP). A log axis when ratios span more than 20x (a diverged run would flatten the
    rest)."""
    pts = [r for r in rows if r.get(RATIO) is not None and not _is_fp(r)]
    if not pts:
        return False
    plt = _pyplot()
    models = sorted({(r["model"], r.get("layers")) for r in pts}, key=lambda m: tuple(sort_key(v) for v in m))
    schemes = sorted({r["scheme"] for r in pts}, key=sort_key)
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.0, 1.3 * len(schemes) * 3) * len(models) ** 0.5 + 2,
                                                      4.0), dpi=DPI, squeeze=False)
    ratios = [r[RATIO] for r in pts]
    log = max(ratios) / max(min(ratios), 1e-9) > 20
    colours = plt.get_cmap("tab10")
    for ax, (model, layers) in zip(axes[0], models):
        mine = [r for r in pts if (r["model"], r.get("layers")) == (model, layers)]
        methods = sorted({r["method"] for r in mine}, key=sort_key)
        width = 0.8 / len(schemes)
        for si, scheme in enumerate(schemes):
            xs, hs = [], []
            for mi, method in enumerate(methods):
                hit = [r[RATIO] for r in mine if r["scheme"] == scheme and r["method"] == method]
                if hit:
                    xs.append(mi - 0.4 + width * (si + 0.5))
                    hs.append(hit[0])
            if not xs:
                continue
            bars = ax.bar(xs, hs, width * 0.92, label=scheme, color=colours(si % 10))
            ax.bar_label(bars, labels=[fmt.ratio(h) for h in hs], fontsize=7, padding=2)
        ax.axhline(1.0, color="#444", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel("perplexity / FP perplexity")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, max(r[RATIO] for r in mine) * 1.15)
        ax.set_title(f"{model}" + ("" if layers is None else f" ({layers} layer{'' if layers == 1 else 's'})"),
                     fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(title="scheme", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _front(ax, pts: list[ParetoPoint], x, on, judged: bool = False) -> None:
    """The frontier as a step line, its points ringed and named; ``judged``: the x axis has intervals, and a
    frontier point that another point of no worse quality could match within them is ringed dashed and
    named "not separable"."""
    front = sorted((p for p in pts if on(p)), key=lambda p: (x(p), p.ratio))
    if front:
        ax.step([x(p) for p in front], [p.ratio for p in front], where="post", color="#c0392b", linewidth=1.5,
                label="Pareto frontier", zorder=1)
        for i, p in enumerate(front):  # alternate above/below: neighbours on the frontier sit close
            shaky = judged and not p.separable
            ax.scatter([x(p)], [p.ratio], s=160, facecolors="none", edgecolors="#c0392b", linewidths=1.5,
                       linestyle="--" if shaky else "-", zorder=3)
            ax.annotate(p.label + (" (not separable)" if shaky else ""), (x(p), p.ratio), textcoords="offset points",
                        xytext=(6, 6 if i % 2 else -11), fontsize=7)


def pareto(points: dict[str, list[ParetoPoint]], path: Path, title: str) -> bool:
    """Per device a row: ratio to FP against prefill latency and, where measured, against energy per
    token; colour = method, marker = scheme, the frontier drawn and its points ringed and named."""
    devices = [d for d, pts in points.items() if pts]
    if not devices:
        return False
    plt = _pyplot()
    panels = 2 if any(p.energy is not None for d in devices for p in points[d]) else 1
    fig, axes = plt.subplots(len(devices), panels, figsize=(5.4 * panels + 1.6, 3.8 * len(devices)), dpi=DPI,
                             squeeze=False)
    all_pts = [p for d in devices for p in points[d]]
    methods = sorted({p.row["method"] for p in all_pts}, key=sort_key)
    schemes = sorted({p.row["scheme"] for p in all_pts}, key=sort_key)
    colours, markers = plt.get_cmap("tab10"), "osD^vP*X"
    for row_axes, d in zip(axes, devices):
        pts = points[d]
        lat_label = ("prefill time / FP32 prefill time (same session)" if pts and pts[0].latency_is_ratio
                     else "prefill latency (ms)")
        specs = [(lat_label, lambda p: float(p.latency) if p.latency is not None else p.prefill_ms,
                  lambda p: p.on_latency_front)]
        if panels == 2:
            specs.append(("energy per token (mJ)", lambda p: p.energy, lambda p: p.on_energy_front))
        for ax, (xlabel, x, on) in zip(row_axes, specs):
            shown = [p for p in pts if x(p) is not None]
            if not shown:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{d}: {xlabel.split(' (')[0]} not measured", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            latency_axis = xlabel == lat_label
            for p in shown:
                colour = colours(methods.index(p.row["method"]) % 10)
                ax.scatter(x(p), p.ratio, color=colour,
                           marker=markers[schemes.index(p.row["scheme"]) % len(markers)], s=50, zorder=2)
                iv = p.latency if latency_axis else None
                if iv is not None and getattr(iv, "high", None) is not None and iv.high > iv.low:
                    # the measurement's interval: what the point's latency could be within its noise
                    bars = ax.errorbar(x(p), p.ratio, xerr=[[x(p) - iv.low], [iv.high - x(p)]], fmt="none",
                                       ecolor=colour, elinewidth=1.2, capsize=3, zorder=2)
                    bars[2][0].set_gid(mark_id("xerr", d, p.label))  # the SVG names the bar
            _front(ax, shown, x, on, judged=latency_axis)
            if latency_axis and pts[0].latency_is_ratio:
                ax.axvline(1.0, color="#444", linestyle=":", linewidth=1)
            xs = [x(p) for p in shown]
            if min(xs) > 0 and max(xs) / min(xs) > 8:  # FP on a phone is 20x slower: keep the rest readable
                from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt.measured(v)))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity / FP perplexity")
            ax.set_title(f"{d}: lower left is better", fontsize=10)
            ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=m)
               for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], color="#555", marker=markers[i % len(markers)], linestyle="", label=s)
                for i, s in enumerate(schemes)]
    handles.append(plt.Line2D([], [], color="#c0392b", label="Pareto frontier"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib

    # text stays text and ids stay stable, so the page's copy can be read back (reports.render.Image.svg)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "mqfarm"}):
        fig.savefig(Path(path).with_suffix(".svg"))
    plt.close(fig)
    return True
