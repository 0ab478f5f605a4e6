"""The driver survives a restart of the event sink (the actor workers report progress to), as when Ray's
memory monitor kills its worker on a full machine: the demo sweep's driver died of an
ActorUnavailableError that way while its trials were fine. Real local Ray."""

from __future__ import annotations

import time

import pytest
import ray

from farm.orchestrate.scheduler import Runner
from tests.farm_env import contained_env


def test_poll_goes_on_while_the_event_sink_restarts(tmp_path):
    with contained_env():
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            runner = Runner(str(tmp_path), {"cpu": 1})
            ray.get(runner.sink.push.remote("t1", "started", {"n": 1}))
            assert runner.poll(0.01) == [("t1", "started", {"n": 1})]
            ray.kill(runner.sink, no_restart=False)  # its worker dies; Ray restarts the actor
            deadline = time.time() + 60
            got = []
            while not got and time.time() < deadline:  # polls never raise; the restarted sink takes events
                try:
                    ray.get(runner.sink.push.remote("t1", "step", {"step": 2}), timeout=5)
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    pass
                got = runner.poll(0.01)
            assert got == [("t1", "step", {"step": 2})]

            ray.kill(runner.sink, no_restart=True)  # gone for good: ray.get raises ActorDiedError from now on
            deadline = time.time() + 60
            while time.time() < deadline:  # the kill is asynchronous: a call may still get through
                try:
                    ray.get(runner.sink.drain.remote())
                except ray.exceptions.ActorDiedError:
                    break
            with pytest.raises(ray.exceptions.ActorDiedError):
                ray.get(runner.sink.drain.remote())
            assert [runner.poll(0.01) for _ in range(3)] == [[], [], []]  # the sweep goes on without progress
        finally:
            ray.shutdown()
