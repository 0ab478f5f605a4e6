"""A two-node Ray cluster on loopback (ray.cluster_utils.Cluster): `farm sweep --address` joins it and
trials run on both nodes."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options, run_sweep
from tests.farm_env import contained_env, write_sweep


@pytest.mark.slow
def test_a_sweep_joins_a_two_node_cluster_and_uses_both_nodes():
    import ray
    from ray.cluster_utils import Cluster

    with contained_env() as root:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2})
        try:
            gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 1024 ** 2)
            cluster.wait_for_nodes()
            p = write_sweep(root, "cluster", """\
name: NAME
base: {model: smollm2-135m, layers: 1, samples: 2, seqlen: 32, method: fake}
grid:
  method_config.label: [a, b, c, d]
  method_config.sleep: [1.0]
eval: {perplexity: {limit: 2}}
plugins: {methods: {fake: "HELPER"}}
resources: {cpu: 1}
save_artifacts: false
""")
            data = root / "data"
            out = run_sweep(load_sweep(p), Options(data_dir=data, address=cluster.address, live=False))
            assert out.ok and len(out.results) == 4
            assert out.cluster["nodes"] == 2 and out.cluster["cpus"] == 2
            assert not ray.is_initialized()  # it joined the cluster, and left it at the end
            nodes = {r["node"]["node_id"] for r in out.results.values()}
            assert nodes == {n.node_id for n in cluster.list_all_nodes()}  # both nodes ran trials
            c = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
            exp = c.get_experiment_by_name("cluster")
            runs = c.search_runs([exp.experiment_id], "tags.farm_role = 'trial'")
            assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
            assert {r.data.tags["node_id"] for r in runs} == nodes

            # trials that ask for a GPU go to the node that has one (its GPU is declared, torch sees none)
            gpu = write_sweep(root, "cluster-gpu", p.read_text().replace("name: cluster", "name: NAME").replace(
                "[a, b, c, d]", "[g1, g2, g3]").replace("resources: {cpu: 1}", "resources: {cpu: 1, gpu: 1}"))
            out = run_sweep(load_sweep(gpu), Options(data_dir=data, address=cluster.address, live=False))
            assert out.ok and len(out.results) == 3
            assert {r["node"]["node_id"] for r in out.results.values()} == {gpu_node.node_id}
            assert all(r["node"]["gpu_ids"] for r in out.results.values())
        finally:
            cluster.shutdown()
