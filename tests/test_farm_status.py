"""`farm status` on a real sqlite MLflow store written through farm's Tracker: a running trial shows the
last training step it logged, a finished one its metric, the rest pending."""

from __future__ import annotations

import textwrap

from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options, sweep_status
from farm.orchestrate.tracking import Tracker


def test_status_shows_the_last_logged_step_of_a_running_trial(tmp_path):
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        name: st
        base: {model: smollm2-135m, layers: 1, seqlen: 32, scheme: w8a8, method: mobilequant}
        grid: {samples: [2, 4, 8]}
        """))
    sweep = load_sweep(tmp_path / "s.yaml")
    opts = Options(data_dir=tmp_path)
    tr = Tracker(opts.uri, sweep.name)
    tr.start_parent(sweep)
    running = sweep.trials[0]
    rid = tr.start_trial(running, {"cpu": 1})
    tr.log_steps(rid, [{"step": i, "loss": 4.0 / (i + 1), "epoch": 0} for i in range(1, 4)])
    rows, cols, counts = sweep_status(sweep, opts)
    status = {r["trial"]: r["status"] for r in rows}
    assert status[running.short] == "RUNNING step 3 loss 1"
    assert counts == {"total": 3, "done": 0, "running": 1, "pending": 2}
