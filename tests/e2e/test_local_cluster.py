"""A Ray instance that cromss-ray starts itself (no ``RAY_ADDRESS``) is reachable from this
machine only, and only by clients that hold its token; so is the process group of a
2-worker Ray Train run on it (PyTorch's rendezvous store and gloo).

The instance is the suite's shared one, which :func:`~cromss_ray.train.cluster.start_local_ray`
started in this process (tests/local_ray.py), as ``init_ray`` does when no ``RAY_ADDRESS``
names a cluster.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from e2e.local_stack import HOST, addresses_listened_on, process_trees

from cromss_ray.train.cluster import start_local_ray
from cromss_ray.train.rendezvous import rendezvous_config

HOLD_TIMEOUT_S = 300.0
"""How long the run may take to form its process group, and its workers then wait to be released."""

TOKEN_FILE = Path.home() / ".ray" / "auth_token"
"""Where Ray keeps the token of the local instances it starts (created by the first one)."""


def _list_nodes(gcs_address: str, metadata: tuple[tuple[str, str], ...]) -> int:
    """How many nodes the GCS lists, asked over its gRPC API with ``metadata``."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=30)
    return len(reply.node_info_list)


def _ray_processes() -> set[int]:
    """This driver and every process of the Ray instance it started (its servers, agents and workers)."""
    import ray._private.worker

    node = ray._private.worker.global_worker.node
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    return {os.getpid(), *process_trees(roots)}


class ProcessGroupWatch(threading.Thread):
    """Waits until the workers have formed their process group, records the addresses the Ray
    instance's processes listen on while the group is up, then releases the workers."""

    def __init__(self, joined: Path, release: Path) -> None:
        super().__init__(daemon=True)
        self.joined, self.release = joined, release
        self.total = ""
        self.addresses: set[str] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while not (self.joined.exists() and self.joined.read_text()):
                if self.release.exists():
                    raise RuntimeError("the run ended before its workers formed the process group")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no process group after {HOLD_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
            self.total = self.joined.read_text()
            self.addresses = addresses_listened_on(_ray_processes())
        except BaseException as error:
            self.error = error
        finally:
            self.release.touch()


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_instance_listens_on_loopback_only_and_refuses_clients_without_the_token(
    ray_cluster: None, tmp_path: Path
) -> None:
    import grpc
    import ray
    import torch
    import torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    joined, release = tmp_path / "joined", tmp_path / "release"

    def hold_the_process_group(_: dict) -> None:
        total = torch.ones(1)
        dist.all_reduce(total)  # the group is formed and used: its store and gloo connections are up
        if dist.get_rank() == 0:
            joined.write_text(str(int(total.item())))
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not released after {HOLD_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    gcs_address = ray.get_runtime_context().gcs_address
    assert gcs_address.startswith(f"{HOST}:")
    watch = ProcessGroupWatch(joined, release)
    watch.start()
    try:
        TorchTrainer(
            hold_the_process_group,
            train_loop_config={},
            torch_config=rendezvous_config(),
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="rendezvous", storage_path=str(tmp_path / "runs")),
        ).fit()
    finally:
        release.touch()
        watch.join(timeout=HOLD_TIMEOUT_S)
    assert watch.error is None, f"watching the process group failed: {watch.error!r}"
    assert watch.total == "2", "the two workers' all-reduce"
    addresses = sorted(watch.addresses)
    assert watch.addresses == {HOST}, f"Ray's or torch's processes listen beyond the loopback: {addresses}"

    with pytest.raises(grpc.RpcError) as refused:
        _list_nodes(gcs_address, ())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        _list_nodes(gcs_address, (("authorization", "Bearer not-the-token"),))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = TOKEN_FILE.read_text().strip()
    assert _list_nodes(gcs_address, (("authorization", f"Bearer {token}"),)) == 1


def test_a_local_instance_without_token_authentication_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``init_ray`` starts when no ``RAY_ADDRESS`` names a cluster, refused before Ray starts anything."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError) as refused:
        start_local_ray()
    assert "RAY_AUTH_MODE=disabled: a local Ray instance started by cromss-ray uses token authentication" in str(
        refused.value
    )
