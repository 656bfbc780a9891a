"""A Ray instance that cromss-ray starts itself (no ``RAY_ADDRESS``) is reachable from this
machine only, and only by clients that hold its token; so is the process group of a
2-worker Ray Train run on it (PyTorch's rendezvous store and gloo)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e.local_stack import HOST, START_TIMEOUT_S, listening_addresses, log_tail, service_environment, session_process

from cromss_ray.train.cluster import start_local_ray

DRIVER = """
import sys
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cromss_ray.train.cluster import init_ray
from cromss_ray.train.rendezvous import rendezvous_config

joined, storage = Path(sys.argv[1]), sys.argv[2]


def hold_the_process_group(_):
    total = torch.ones(1)
    dist.all_reduce(total)  # the group is formed and used: its store and gloo connections are up
    if dist.get_rank() == 0:
        joined.write_text(str(int(total.item())))
    time.sleep(600)


init_ray()
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
TorchTrainer(
    hold_the_process_group,
    train_loop_config={},
    torch_config=rendezvous_config(),
    scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
    run_config=RunConfig(name="rendezvous", storage_path=storage),
).fit()
"""

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


def _gcs_address(log: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("GCS "):
                return line.split()[1]
        if process.poll() is not None:
            raise RuntimeError(f"the driver exited with {process.returncode}:\n{log_tail(log)}")
        time.sleep(0.5)
    raise TimeoutError(f"no local Ray instance after {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}")


def _wait_for(path: Path, log: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if process.poll() is not None:
            raise RuntimeError(f"the driver exited with {process.returncode}:\n{log_tail(log)}")
        time.sleep(0.5)
    raise TimeoutError(f"no process group after {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}")


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_instance_listens_on_loopback_only_and_refuses_clients_without_the_token(tmp_path: Path) -> None:
    log, joined = tmp_path / "driver.log", tmp_path / "joined"
    command = [sys.executable, "-c", DRIVER, str(joined), str(tmp_path / "runs")]
    with session_process(command, log, service_environment()) as driver:
        gcs_address = _gcs_address(log, driver)
        assert gcs_address.startswith(f"{HOST}:")
        assert _wait_for(joined, log, driver) == "2", "the two workers' all-reduce"
        addresses = listening_addresses(driver)
        assert addresses == {HOST}, f"Ray's or torch's processes listen beyond the loopback: {sorted(addresses)}"

        import grpc

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
