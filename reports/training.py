"""Training curves of a sweep's trials, from the per-step losses farm logs to MLflow (``train/loss``, and
``train/layer`` for block-wise methods).

The question a scaling study asks of them is whether training was still improving when it stopped. So
each curve is summarised by its *late change*: the mean loss of the last tenth of the steps over the mean
of the tenth before, minus one (negative: still falling). End to end that is one curve; block-wise it is
one curve per layer, and the summary is the median over layers. The plot shows the end-to-end curves
(moving average over a twentieth of the run) and, for block-wise trials, each layer's final loss.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .runs import TrialRun


@dataclass
class Curve:
    mode: str                    # "end-to-end" | "block-wise"
    steps: int
    first: float
    last: float                  # mean of the last tenth (block-wise: of the last layer's steps)
    late_change: float | None    # see the module's note; None when there are too few steps
    points: list = field(default_factory=list)  # (step, smoothed loss) or (layer, final loss)


def _tenths(values: list[float]) -> tuple[float, float | None]:
    k = max(1, len(values) // 10)
    last = statistics.fmean(values[-k:])
    if len(values) < 2:  # from two values on there are always two tenths of k
        return last, None
    before = statistics.fmean(values[-2 * k:-k])
    return last, (last / before - 1.0 if before else None)


def curve(loss: list[tuple[int, float]], layer: list[tuple[int, float]] | None = None) -> Curve | None:
    """Summarise one trial's ``(step, value)`` histories; ``layer`` present means block-wise."""
    loss = sorted(loss)
    if not loss:
        return None
    values = [v for _, v in loss]
    if layer:
        by_step = dict(layer)
        per_layer: dict[int, list[float]] = {}
        for s, v in loss:
            per_layer.setdefault(int(by_step.get(s, -1)), []).append(v)
        summaries = {ly: _tenths(vs) for ly, vs in sorted(per_layer.items())}
        changes = [c for _, c in summaries.values() if c is not None]
        last_layer = max(summaries)
        return Curve("block-wise", len(values), values[0], summaries[last_layer][0],
                     statistics.median(changes) if changes else None,
                     [(ly, s[0]) for ly, s in summaries.items()])
    last, change = _tenths(values)
    w = max(1, len(values) // 20)
    smooth = [(loss[i][0], statistics.fmean(values[max(0, i - w + 1):i + 1])) for i in range(len(values))]
    return Curve("end-to-end", len(values), values[0], last, change, smooth)


def histories(client, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` of metric ``key`` for each run. A SQL store answers in one query per 200 runs
    (its ``get_metric_history_bulk``, which MlflowClient does not expose: one call per run costs about 10 ms
    of ORM work, 3-5 s on a 300-trial sweep); any other store gets one call per run, 8 at a time."""
    out: dict[str, list] = {r: [] for r in run_ids}
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    if bulk is not None:
        for i in range(0, len(run_ids), 200):
            for m in bulk(run_ids[i:i + 200], key, max_results=1 << 62):
                out[m.run_id].append((m.step, m.value))
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:  # a server: the calls wait on the network, not on this CPU
        for rid, hist in zip(run_ids, pool.map(lambda r: client.get_metric_history(r, key), run_ids)):
            out[rid] = [(m.step, m.value) for m in hist]
    return out


def load_curves(trials: list[TrialRun], tracking_uri: str) -> dict[str, Curve]:
    """The curves of the trials that logged a training loss, by trial id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    trained = [t for t in trials if "train/loss" in t.metrics]
    loss = histories(client, [t.run_id for t in trained], "train/loss")
    layer = histories(client, [t.run_id for t in trained if "train/layer" in t.metrics], "train/layer")
    out = {}
    for t in trained:
        c = curve(loss[t.run_id], layer.get(t.run_id) if "train/layer" in t.metrics else None)
        if c is not None:
            out[t.trial_id] = c
    return out


MAX_LABELLED = 12  # beyond this many curves a legend entry per trial is unreadable (and slow to draw)


def plot(curves: dict[str, Curve], labels: dict[str, str], path, title: str,
         groups: dict[str, str] | None = None) -> bool:
    """One panel per mode. Up to ``MAX_LABELLED`` curves each gets a legend entry (``labels``); more are
    drawn thin and coloured by ``groups`` (trial id -> group name, e.g. its method), one entry per group."""
    if not curves:
        return False
    grouped = groups is not None and len(curves) > MAX_LABELLED
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("end-to-end", "block-wise") if any(c.mode == m for c in curves.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.0 * len(modes) + 2.4, 4.2), dpi=110, squeeze=False)
    names = sorted(set(groups.values())) if grouped else []
    colours = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        labelled: set = set()
        for tid, c in sorted(curves.items(), key=lambda kv: labels.get(kv[0], kv[0])):
            if c.mode != mode:
                continue
            if grouped:
                g = groups.get(tid, "?")
                ax.plot(*zip(*c.points), color=colours(names.index(g) % 10) if g in names else "#888",
                        linewidth=0.7, alpha=0.5, label=None if g in labelled else g)
                labelled.add(g)
            else:
                ax.plot(*zip(*c.points), label=labels.get(tid, tid[:8]), marker="o" if mode == "block-wise" else None,
                        markersize=3)
        ax.set_yscale("log")
        ax.set_xlabel("step" if mode == "end-to-end" else "decoder layer")
        ax.set_ylabel("training loss (moving average)" if mode == "end-to-end" else "final loss of the layer")
        ax.set_title(f"{title}: {mode}")
        ax.grid(True, alpha=0.3)
        if ax is axes[0][-1]:  # outside the last panel: never over the lines
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
