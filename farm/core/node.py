"""Where a piece of work ran (host, process, Ray node, GPUs), recorded with every trial and device job."""

from __future__ import annotations

import os
import socket


def node_info() -> dict:
    info = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
            gpus = ray.get_gpu_ids()
            if gpus:
                info["gpu_ids"] = [str(g) for g in gpus]
    except ImportError:
        pass
    return info
