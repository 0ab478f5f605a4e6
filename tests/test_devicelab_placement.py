"""Placement of a sweep's device stages on a ray.cluster_utils cluster (two nodes on loopback) where only one
node advertises `phone:sm8650`: every device stage (each trial's export, and the measurement session that
times them together) runs on that node, and never two at once.

The host backend stands in for the phone (what is under test is where Ray places the stage and that the
phone is never double-booked); the export step is the tiny QDQ export (tests.devicelab_fixtures). A module
of its own: the sweep tests keep a local Ray instance up, and this one must join the cluster instead.
"""

from __future__ import annotations

import pytest

from farm.plan.spec import load_sweep
from farm.orchestrate.sweep import Options, run_sweep
from tests.devicelab_fixtures import tiny_exporter
from tests.farm_env import contained_env, write_sweep
from tests.test_devicelab_sweep import HEAD


@pytest.mark.slow
def test_device_stages_run_on_the_node_with_the_phone_one_at_a_time():
    import ray
    from ray.cluster_utils import Cluster

    with contained_env() as root:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2})
        try:
            phone_node = cluster.add_node(num_cpus=2, resources={"phone:sm8650": 1},
                                          object_store_memory=100 * 1024 ** 2)
            cluster.wait_for_nodes()
            # the host backend stands in for the phone; what is under test is where Ray places the stage
            p = write_sweep(root, "placement", HEAD + """\
grid: {scheme: [w8a8, w4a8]}
baselines: []
devices: [{device: host, graphs: [prefill], repeats: 40, warmup: 2, resources: {"phone:sm8650": 1}}]
""")
            data = root / "data"
            out = run_sweep(load_sweep(p), Options(data_dir=data, address=cluster.address, live=False,
                                                   exporter=tiny_exporter))
            assert out.ok and len(out.results) == 2
            stages = [r["devices"]["host"] for r in out.results.values()]
            assert {s["node"]["node_id"] for s in stages} == {phone_node.node_id}  # the session
            assert {s["prepare"]["node"]["node_id"] for s in stages} == {phone_node.node_id}  # the exports
            assert len({s["session"]["key"] for s in stages}) == 1 and stages[0]["session"]["models"] == 2
            # whole Ray tasks, not only the benchmark inside the device lock: Ray itself never runs two
            # stages at once on the phone's node, though it has two free CPUs
            spans = sorted([(s["prepare"]["started_at"], s["prepare"]["ended_at"]) for s in stages]
                           + [(stages[0]["session"]["started_at"], stages[0]["session"]["ended_at"])])
            assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
            assert not ray.is_initialized()
        finally:
            cluster.shutdown()
