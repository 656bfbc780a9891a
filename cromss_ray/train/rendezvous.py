"""PyTorch's rendezvous kept on 127.0.0.1 when the whole Ray cluster is.

Ray Train's torch backend points ``MASTER_ADDR`` at rank 0's node, but the TCPStore that
rank 0 then serves listens on every interface, whatever address it is given, and gloo binds
its connections to the address the host name resolves to. On a cluster whose every node has
the address 127.0.0.1 (the local instance cromss-ray starts, :func:`~cromss_ray.train.cluster.start_local_ray`),
:class:`LoopbackTorchConfig` instead serves the store from rank 0's worker on a socket bound
to 127.0.0.1, has every rank (rank 0 too) join it as a client (``TORCHELASTIC_USE_AGENT_STORE``,
which ``torch.distributed``'s ``env://`` rendezvous honours) and binds gloo and NCCL to the
loopback interface. On a real cluster the rendezvous spans nodes and is kept inside the
cluster by its network (clusters/README.md, "Security defaults").
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

from cromss_ray.train.cluster import LOCAL_HOST

_SERVED: list[Any] = []
"""Rank 0's store and its listening socket, alive as long as the worker process."""


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    name = "lo0" if sys.platform == "darwin" else "lo"
    if name not in {interface for _, interface in socket.if_nameindex()}:
        raise RuntimeError(f"no loopback interface '{name}' on this machine for torch.distributed to bind to")
    return name


def cluster_is_loopback() -> bool:
    """Whether every live node of the connected Ray cluster has the address 127.0.0.1."""
    return all(node["NodeManagerAddress"] == LOCAL_HOST for node in ray.nodes() if node["Alive"])


def _serve_store(world_size: int) -> int:
    """Serve the rendezvous store in this worker on a 127.0.0.1 socket; its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOCAL_HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        LOCAL_HOST, port, world_size, is_master=True, wait_for_workers=False, master_listen_fd=listener.fileno()
    )
    _SERVED[:] = [listener, store]
    return port


def _join_store(port: int) -> None:
    """Point this worker's ``env://`` rendezvous at the served store and its collectives at the loopback."""
    interface = loopback_interface()
    os.environ.update(
        {
            "MASTER_ADDR": LOCAL_HOST,
            "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "GLOO_SOCKET_IFNAME": interface,
            "NCCL_SOCKET_IFNAME": interface,
        }
    )


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the process group formed on 127.0.0.1 only."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        port = worker_group.execute_single(0, _serve_store, world_size=len(worker_group))
        worker_group.execute(_join_store, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_torch_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """:class:`ray.train.torch.TorchConfig` whose process group listens on 127.0.0.1 only."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend


def rendezvous_config() -> TorchConfig:
    """The torch backend of a run: on 127.0.0.1 when the whole cluster is, Ray Train's own otherwise."""
    return LoopbackTorchConfig() if cluster_is_loopback() else TorchConfig()
