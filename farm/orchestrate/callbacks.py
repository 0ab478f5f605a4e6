"""What hangs off a running sweep, in Ray Tune's style (``tune.Callback``): the controller
(farm.orchestrate.sweep.SweepController) owns the sweep's state and calls every callback of its list, in
list order, on each event; a callback reads the controller (``run.trials``, ``run.outcome``,
``run.attempts``, ``run.label(tid)``) and keeps its own state. Two come by default: ``TrackingCallback``
does all the MLflow writing, ``ProgressCallback`` all the drawing of the progress line.

The contract, which the controller keeps:
- its own state changes first: a finished trial's result file is saved, and the outcome updated,
  before any callback hears of it, so a callback that raises loses no result;
- a trial's ``on_trial_start`` comes before its ``on_trial_result`` or ``on_trial_error`` (when the result
  overtook its "started" event, the start is made from the result), and nothing of a trial comes after
  its result or error but its device results;
- ``on_trial_step`` gets only steps of the trial's current attempt;
- a callback that raises stops the sweep like any error, and ``on_sweep_end`` still reaches every
  callback (each its own try), so what one opened is closed.
"""

from __future__ import annotations

import sys

from .progress import Progress
from .results import primary_metric


class Callback:
    """Every hook is optional; ``run`` is the controller."""

    def setup(self, run) -> None:
        """The sweep lock is held; nothing is read or run yet."""

    def on_trial_restore(self, run, tid: str, result: dict) -> None:
        """A trial finished by an earlier invocation (its result file); it will not run."""

    def on_sweep_start(self, run) -> None:
        """The cluster is connected (``run.outcome.cluster``, ``run.slots``); trials are about to start."""

    def on_trial_start(self, run, tid: str, info: dict) -> None:
        """An attempt began (``run.attempts[tid]``; count > 1: Ray re-ran it after its worker died).
        ``info``: the worker's event (``time``, ``node_ip``, ``node_id``, ``host``)."""

    def on_trial_step(self, run, tid: str, step: dict) -> None:
        """A training step of the current attempt (``step``, ``loss``, ...)."""

    def on_trial_result(self, run, tid: str, result: dict) -> None:
        """The trial finished; its result file is saved. ``result["steps"]`` holds every step, of which
        ``run.attempts[tid].steps`` came through ``on_trial_step`` when the attempt keys match."""

    def on_trial_error(self, run, tid: str, error: dict) -> None:
        """The trial failed (``error``, ``traceback``, ``kind``)."""

    def on_device_result(self, run, tid: str, summary: dict) -> None:
        """A device target measured (or failed to measure) a finished trial's model; saved already."""

    def on_note(self, run, msg: str) -> None:
        """A line for the person watching."""

    def on_poll(self, run) -> None:
        """After each round of events (about twice a second while anything runs)."""

    def on_sweep_end(self, run, status: str) -> None:
        """``status``: "finished", "interrupted" (Ctrl-C, SIGTERM) or "error" (the exception then reaches
        the caller). ``run.outcome.wall_s`` is set."""


class TrackingCallback(Callback):
    """The sweep in MLflow (farm.orchestrate.tracking): the parent run, one run per trial attempt in flight
    (``runs``), the finished runs that device results go into, the registry at the end."""

    def __init__(self, tracker, runs: dict | None = None):
        self.tracker = tracker
        self.runs = {} if runs is None else runs  # trial id -> MLflow run id of the attempt in flight
        self.finished: dict = {}  # trial id -> MLflow run id of its finished run
        self.logged: dict = {}  # trial id -> finished run in the store when the sweep began

    def setup(self, run) -> None:
        run.outcome.parent_run_id = self.tracker.start_parent(run.sweep)
        stale = self.tracker.kill_stale()
        if stale:
            run.note(f"marked {stale} run(s) left RUNNING by an earlier driver as KILLED")
        self.logged = self.tracker.finished_trials()  # after kill_stale: those are not finished

    def on_trial_restore(self, run, tid: str, result: dict) -> None:
        if tid not in self.logged:  # done earlier but not logged in this store: log it from the file
            rid = self.tracker.start_trial(run.trials[tid], run.resources, result.get("started_at"),
                                           {"from_cache": "true"})
            self.tracker.log_steps(rid, result.get("steps", []))
            self.tracker.finish_trial(rid, result)
            self.tracker.log_devices(rid, result.get("devices", {}))
            run.outcome.logged_from_cache.append(tid)
            self.logged[tid] = rid
        self.finished[tid] = self.logged[tid]

    def on_sweep_start(self, run) -> None:
        run.note(f"tracking: MLflow {self.tracker.uri}")

    def on_trial_start(self, run, tid: str, info: dict) -> None:
        count = run.attempts[tid].count
        if tid not in self.runs:
            node = info.get("node_ip") or info.get("host", "")
            self.runs[tid] = self.tracker.start_trial(run.trials[tid], run.resources, info.get("time"),
                                                      {"node": node, "node_id": info.get("node_id", "")})
        else:  # Ray re-ran the trial after its worker died: the same run, one more attempt
            self.tracker.client.set_tag(self.runs[tid], "attempts", str(count))

    def on_trial_step(self, run, tid: str, step: dict) -> None:
        if tid in self.runs:
            self.tracker.log_steps(self.runs[tid], [step])

    def on_trial_result(self, run, tid: str, result: dict) -> None:
        att = run.attempts.get(tid)
        if tid not in self.runs:  # a start that failed to open its run
            self.runs[tid] = self.tracker.start_trial(run.trials[tid], run.resources, result.get("started_at"))
        logged = att.steps if att and att.key == result.get("attempt") else 0
        self.tracker.log_steps(self.runs[tid], result.get("steps", [])[logged:])
        # the worker's on-disk count: it also sees attempts whose "started" event never arrived
        self.tracker.finish_trial(self.runs[tid], result, {"attempts": result.get("attempt_count", 1)})
        self.finished[tid] = self.runs[tid]
        del self.runs[tid]  # only now: an interrupt inside finish_trial must still find the run to close

    def on_trial_error(self, run, tid: str, error: dict) -> None:
        if tid not in self.runs:
            self.runs[tid] = self.tracker.start_trial(run.trials[tid], run.resources)
        self.tracker.fail_trial(self.runs[tid], error["error"], error.get("traceback", ""), error.get("kind", ""))
        del self.runs[tid]

    def on_device_result(self, run, tid: str, summary: dict) -> None:
        rid = self.finished.get(tid)
        if rid is not None:  # the run may be FINISHED already: device results come after the trial
            self.tracker.log_devices(rid, {summary["label"]: summary})

    def on_sweep_end(self, run, status: str) -> None:
        if status == "error":
            self.tracker.kill(list(self.runs.values()), note="the sweep stopped on an error")
            self.runs.clear()
            if self.tracker.parent_id is not None:
                self.tracker.client.set_terminated(self.tracker.parent_id, status="FAILED")
            return
        if status == "interrupted":
            self.tracker.kill(list(self.runs.values()))
            self.runs.clear()
            if self.tracker.parent_id is None:
                return  # interrupted before the parent run existed: nothing else is open
            self.tracker.kill_stale("interrupted (Ctrl-C)")  # one caught between create_run and self.runs
        elif run.sweep.spec.register_best:
            try:
                run.outcome.registered = self.tracker.register_best(run.trials, run.outcome.results,
                                                                    primary_metric)
            except Exception as e:  # the registry is a convenience: never lose a finished sweep over it
                run.note(f"model registry: skipped ({type(e).__name__}: {e})")
        o = run.outcome
        counts = {"total": len(run.sweep.trials), "finished": len(o.results), "failed": len(o.failed),
                  "executed": len(o.executed)}
        self.tracker.end_parent("KILLED" if status == "interrupted" else "FINISHED", counts, o.wall_s)


class ProgressCallback(Callback):
    """The live line (farm.orchestrate.progress.Progress) once trials start, and every note: plain lines
    before the line exists, above it after."""

    def __init__(self, out=None, live: bool | None = None):
        self.out = out or sys.stderr
        self.live = live
        self.progress: Progress | None = None

    def on_sweep_start(self, run) -> None:
        self.progress = Progress(len(run.sweep.trials), len(run.outcome.results), run.slots, self.out, self.live)

    def on_note(self, run, msg: str) -> None:
        if self.progress is not None:
            self.progress.note(msg)
        else:
            print(msg, file=self.out)

    def on_trial_start(self, run, tid: str, info: dict) -> None:
        count = run.attempts[tid].count
        if count > 1:
            self.on_note(run, f"retry  {run.label(tid)}: attempt {count} after the worker died")
        if self.progress is not None:
            self.progress.started(tid)

    def on_trial_result(self, run, tid: str, result: dict) -> None:
        name, value = primary_metric(result)
        note = f"{name}={value:.3f}" if name else ""
        if self.progress is not None:
            self.progress.finished(tid, run.label(tid), result.get("timing", {}).get("total_s"), True, note)

    def on_trial_error(self, run, tid: str, error: dict) -> None:
        if self.progress is not None:
            self.progress.finished(tid, run.label(tid), None, False, error["error"])

    def on_device_result(self, run, tid: str, summary: dict) -> None:
        from .device_metrics import metrics_and_tags

        lbl = summary["label"]
        if not summary.get("ok"):
            self.on_note(run, f"device {run.label(tid)} on {lbl}: FAILED {run.outcome.device_failed[f'{tid}/{lbl}']}")
            return
        metrics, _ = metrics_and_tags(summary)
        shown = [f"{k.rsplit('/', 1)[1]}={v:.4g}" for k, v in metrics.items()
                 if k.endswith(("/prefill_ms", "/decode_tok_s", "/energy_mj_per_tok"))]
        for base, by_graph in (summary.get("ratios") or {}).items():
            for graph in ("prefill", "decode"):
                r = by_graph.get(graph)
                if r:
                    shown.append(f"{graph} x{base}={r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        self.on_note(run, f"device {run.label(tid)} on {lbl}: {' '.join(shown)}")

    def on_poll(self, run) -> None:
        if self.progress is not None:
            self.progress.redraw()

    def on_sweep_end(self, run, status: str) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if status == "interrupted":
            print(f"\ninterrupted: {len(run.in_flight())} trial(s) stopped; run the same command again to "
                  "finish the rest", file=self.out)
