"""Where a piece of work ran (host, process, Ray node, GPUs), recorded with every trial and device job."""

from __future__ import annotations

import os
import socket


def node_info() -> dict:
    # ray comes with farm (the `farm` extra); imported here, not at the top, so that farm.core stays
    # cheap to import for the driver's planning and the CLI
    import ray

    info = {"host": socket.gethostname(), "pid": os.getpid()}
    if ray.is_initialized():  # a trial run in-process (tests, debugging) has no Ray context
        ctx = ray.get_runtime_context()
        info["node_id"] = ctx.get_node_id()
        info["node_ip"] = ray.util.get_node_ip_address()
        gpus = ray.get_gpu_ids()
        if gpus:
            info["gpu_ids"] = [str(g) for g in gpus]
    return info
