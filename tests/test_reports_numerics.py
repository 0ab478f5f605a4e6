"""Reports flag the trials another numerics version made, reading MLflow only: a real sqlite store written
through farm's Tracker with one sweep expanded at today's numerics version and again at the next (as after a bump)."""

from __future__ import annotations

import textwrap

import quant
from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options
from farm.orchestrate.tracking import Tracker
from reports import sweep_report
from reports.numerics import flagged, version_of
from reports.runs import load_trials


def _finish(tracker: Tracker, trial, ppl: float) -> None:
    rid = tracker.start_trial(trial, {"cpu": 1})
    tracker.finish_trial(rid, {"metrics": {"ppl/wiki/seq32": ppl}, "ended_at": 1.0e9})


def test_a_report_flags_the_trials_of_an_older_numerics_version(tmp_path, monkeypatch):
    (tmp_path / "n.yaml").write_text(textwrap.dedent("""\
        name: n
        base: {model: smollm2-135m, layers: 1, seqlen: 32, samples: 2}
        grid: {method: [rtn, smoothquant]}
        include: [{scheme: fp}]
        """))
    opts = Options(data_dir=tmp_path)
    old = load_sweep(tmp_path / "n.yaml")
    tracker = Tracker(opts.uri, old.name)
    tracker.start_parent(old)
    for t, ppl in zip(old.trials, (40.0, 30.0, 20.0)):
        _finish(tracker, t, ppl)
    v = quant.NUMERICS_VERSION  # the version of today's code; the sweep is then re-expanded as after a bump
    monkeypatch.setattr(quant.numerics, "NUMERICS_VERSION", v + 1)
    new = load_sweep(tmp_path / "n.yaml")
    _finish(tracker, new.trials[0], 41.0)  # one trial rerun with the new code so far

    trials = load_trials("n", opts.uri)
    assert sorted(version_of(t) for t in trials) == [v, v, v, v + 1]
    newest, other = flagged(trials)
    assert newest == v + 1 and sorted(t.trial_id for t in other) == sorted(t.id for t in old.trials)

    text = sweep_report("n", opts.uri, tmp_path / "report").read_text()
    assert "## Numerics versions differ" in text
    assert f"**Not comparable:** 3 of 4 trials were made with another numerics version than the newest here ({v + 1})" in text
    section = text.split("## Numerics versions differ")[1].split("\n## ")[0]
    assert sorted(t.short for t in old.trials if t.short in section) == sorted(t.short for t in old.trials)
    assert new.trials[0].short not in section


def test_one_version_gives_no_flag(tmp_path):
    (tmp_path / "m.yaml").write_text("name: m\nbase: {model: smollm2-135m, layers: 1, seqlen: 32, samples: 2}\n"
                                     "grid: {method: [rtn]}\n")
    opts = Options(data_dir=tmp_path)
    sweep = load_sweep(tmp_path / "m.yaml")
    tracker = Tracker(opts.uri, sweep.name)
    tracker.start_parent(sweep)
    _finish(tracker, sweep.trials[0], 40.0)
    trials = load_trials("m", opts.uri)
    assert flagged(trials) == (quant.NUMERICS_VERSION, [])
    assert "Numerics versions differ" not in sweep_report("m", opts.uri, tmp_path / "report").read_text()
