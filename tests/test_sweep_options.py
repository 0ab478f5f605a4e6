"""`farm sweep` options a newcomer needs: a dry run of any size never asks for --yes, and --resources
overrides a sweep file's per-trial resources (so a GPU grid can be tried on a CPU machine) without
changing trial ids. The override run uses real local Ray and a real sqlite MLflow store."""

from __future__ import annotations

import textwrap

import pytest
from mlflow import MlflowClient

from farm.cli import main
from farm.plan.spec import GRID_LIMIT, load_sweep
from tests.farm_env import HELPER, contained_env

BASE = """\
name: opts
base: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: rtn}
eval: {perplexity: {limit: 2}}
"""


def write(folder, text: str, name: str = "s.yaml"):
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def test_a_dry_run_of_a_big_grid_needs_no_yes(tmp_path, capsys):
    seeds = ", ".join(str(i) for i in range(GRID_LIMIT + 36))
    p = write(tmp_path, BASE + f"grid: {{seed: [{seeds}]}}\n")
    data = tmp_path / "data"
    assert main(["sweep", str(p), "--data", str(data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sweep opts ({p}): {GRID_LIMIT + 36} trials, 0 done, {GRID_LIMIT + 36} to run" in out
    assert f"running it needs --yes: {GRID_LIMIT + 36} trials is more than {GRID_LIMIT}" in out
    assert main(["sweep", str(p), "--data", str(data)]) == 2  # running it still does
    assert f"expands to {GRID_LIMIT + 36} trials, more than {GRID_LIMIT}; pass --yes" in capsys.readouterr().err
    assert not (data / "mlflow.db").exists()


def test_resources_override_the_sweep_file_and_keep_trial_ids(tmp_path, capsys):
    p = write(tmp_path, BASE + "grid: {method: [rtn]}\nresources: {cpu: 1, gpu: 1, memory_gb: 2}\n")
    data = tmp_path / "data"
    assert main(["sweep", str(p), "--data", str(data), "--dry-run", "--resources", "gpu=0,cpu=2"]) == 0
    assert "per trial: 2 CPU, 0 GPU;" in capsys.readouterr().out
    assert main(["sweep", str(p), "--data", str(data)]) == 2  # the file alone asks for a GPU
    assert "trials need CPU 1, GPU 1 but this machine has" in capsys.readouterr().err
    for bad, msg in (("gpus=0", "--resources: unknown key 'gpus'; known: cpu, gpu, memory_gb, custom.<name>"),
                     ("cpu=0", "--resources: cpu: Input should be greater than 0, got 0.0"),
                     ("gpu", "--resources: 'gpu' is not KEY=VALUE (e.g. --resources cpu=1,gpu=0)"),
                     ("gpu=none", "--resources: gpu='none' is not a number")):
        assert main(["sweep", str(p), "--data", str(data), "--dry-run", "--resources", bad]) == 2
        assert capsys.readouterr().err.strip() == f"farm sweep: error: {msg}"


@pytest.mark.slow
def test_a_gpu_sweep_runs_on_this_machine_with_resources_overridden(tmp_path, capsys):
    with contained_env() as root:
        p = write(root, BASE + f"""\
grid: {{method: [fake]}}
plugins: {{methods: {{fake: "{HELPER}"}}}}
resources: {{cpu: 1, gpu: 1}}
""")
        data = root / "data"
        ids = [t.id for t in load_sweep(p).trials]
        assert main(["sweep", str(p), "--data", str(data), "--num-cpus", "1", "--resources", "gpu=0"]) == 0
        client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("opts").experiment_id], "tags.farm_role = 'trial'")
        assert [r.data.tags["trial_id"] for r in runs] == ids and runs[0].info.status == "FINISHED"
        assert runs[0].data.params["resources.gpu"] == "0.0" and runs[0].data.params["resources.cpu"] == "1.0"
        assert (data / "trials" / ids[0] / "result.json").exists()
