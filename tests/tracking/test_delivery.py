"""MLflow writes survive a tracking-server outage: queued in order, retried with a bounded backoff,
delivered when the server is back; what cannot be delivered in time is named. No server needed."""

from __future__ import annotations

import pytest
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from cromss_ray.tracking.delivery import MAX_BACKOFF_S, DeliveryQueue, UndeliveredError, is_transient
from cromss_ray.tracking.runs import RunTracker


class FakeTime:
    """A monotonic clock that only the queue's sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Server:
    """Records what reaches it; while ``down``, every write fails as a stopped server's would."""

    def __init__(self) -> None:
        self.down = False
        self.received: list[str] = []
        self.attempts = 0

    def send(self, item: str) -> None:
        self.attempts += 1
        if self.down:
            raise requests.ConnectionError(f"connection refused while sending {item}")
        self.received.append(item)


def _queue(time: FakeTime) -> DeliveryQueue:
    return DeliveryQueue("MLflow run r at http://127.0.0.1:5000", clock=time.clock, sleep=time.sleep)


def test_writes_made_while_the_server_is_away_arrive_in_order_once_it_is_back() -> None:
    time, server = FakeTime(), Server()
    queue = _queue(time)
    queue.put("epoch 1", lambda: server.send("epoch 1"))
    server.down = True
    for item in ("epoch 2", "epoch 3", "epoch 4"):
        queue.put(item, lambda item=item: server.send(item))
        time.now += 0.4
    assert server.received == ["epoch 1"] and queue.pending == ["epoch 2", "epoch 3", "epoch 4"]
    assert server.attempts == 2, "within the first second of backoff, later writes are only queued"
    server.down = False
    time.now += 60.0
    queue.put("epoch 5", lambda: server.send("epoch 5"))
    assert server.received == ["epoch 1", "epoch 2", "epoch 3", "epoch 4", "epoch 5"]
    assert queue.pending == []


class RestartingTime(FakeTime):
    """The clock of a server that comes back once ``restart_at`` seconds have passed."""

    def __init__(self, server: Server, restart_at: float) -> None:
        super().__init__()
        self.server, self.restart_at = server, restart_at

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if self.now >= self.restart_at:
            self.server.down = False


def test_flush_waits_with_a_doubling_bounded_backoff_until_the_server_answers() -> None:
    server = Server()
    time = RestartingTime(server, restart_at=100.0)
    queue = _queue(time)
    server.down = True
    queue.put("metrics of epoch 2", lambda: server.send("metrics of epoch 2"))
    queue.flush(timeout_s=300.0)
    assert server.received == ["metrics of epoch 2"] and queue.pending == []
    assert time.sleeps[:6] == [2.0, 4.0, 8.0, 16.0, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert max(time.sleeps) == MAX_BACKOFF_S and 100.0 <= time.now < 100.0 + MAX_BACKOFF_S


def test_a_lower_backoff_bound_caps_every_pause_and_the_wait_after_the_server_is_back() -> None:
    server = Server()
    time = RestartingTime(server, restart_at=10.0)
    queue = DeliveryQueue("MLflow run r", clock=time.clock, sleep=time.sleep, max_backoff_s=0.5)
    server.down = True
    queue.put("metrics of epoch 2", lambda: server.send("metrics of epoch 2"))
    queue.flush(timeout_s=300.0)
    assert server.received == ["metrics of epoch 2"]
    assert set(time.sleeps) == {0.5} and 10.0 <= time.now < 10.5


def test_flush_gives_up_after_its_timeout_naming_every_write_left() -> None:
    time, server = FakeTime(), Server()
    queue = _queue(time)
    server.down = True
    for item in ("metrics of epoch 1 (train/loss, epoch)", "confusion/val_s2.json"):
        queue.put(item, lambda item=item: server.send(item))
    with pytest.raises(UndeliveredError) as failure:
        queue.flush(timeout_s=45.0)
    message = str(failure.value)
    assert "MLflow run r at http://127.0.0.1:5000: 2 write(s) not delivered after waiting 45 s" in message
    assert "metrics of epoch 1 (train/loss, epoch); confusion/val_s2.json" in message
    assert "tracking.flush_timeout_s" in message and "connection refused" in message
    assert failure.value.writes == queue.pending, "nothing is dropped by giving up"
    assert time.now == 45.0


def test_a_write_the_server_refuses_raises_at_once_and_leaves_the_queue() -> None:
    time, server = FakeTime(), Server()
    queue = _queue(time)

    def refused() -> None:
        raise MlflowException("param changed", INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="param changed"):
        queue.put("params", refused)
    queue.put("metrics", lambda: server.send("metrics"))
    assert server.received == ["metrics"] and queue.pending == []


def test_transient_errors_are_the_ones_sending_again_can_mend() -> None:
    assert is_transient(MlflowException("gone", TEMPORARILY_UNAVAILABLE))
    assert is_transient(MlflowException("API request failed with exception ConnectionRefused"))
    assert is_transient(requests.ConnectionError("refused")) and is_transient(requests.Timeout("slow"))
    assert is_transient(ConnectionRefusedError("refused"))
    assert not is_transient(MlflowException("bad", INVALID_PARAMETER_VALUE))
    assert not is_transient(ValueError("a bad value"))


class DownClient:
    """An MlflowClient whose server is stopped until ``down`` is cleared."""

    def __init__(self) -> None:
        self.down = True
        self.batches: list[list[Metric]] = []
        self.texts: list[str] = []
        self.terminated: list[str] = []

    def _reach(self) -> None:
        if self.down:
            raise MlflowException("API request to http://127.0.0.1:5000 failed with exception ConnectionRefused")

    def log_batch(self, run_id: str, metrics: list[Metric]) -> None:
        self._reach()
        self.batches.append(metrics)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._reach()
        self.texts.append(path)

    def set_terminated(self, run_id: str, status: str) -> None:
        self._reach()
        self.terminated.append(status)


def test_a_tracker_keeps_logging_through_an_outage_and_delivers_every_epoch_at_the_end() -> None:
    client = DownClient()
    tracker = RunTracker(client, "run-1", "0", "http://127.0.0.1:5000", flush_timeout_s=30.0)  # type: ignore[arg-type]
    restarts: list[float] = []

    def server_back_after_a_pause(seconds: float) -> None:
        restarts.append(seconds)
        client.down = False

    tracker.writes = DeliveryQueue(tracker.writes.destination, sleep=server_back_after_a_pause)
    for epoch in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / epoch}, epoch)
    tracker.log_text("note", "notes/outage.txt")
    assert client.batches == [] and len(tracker.writes.pending) == 4
    tracker.finish("FINISHED")
    assert restarts, "finish waited for the server"
    assert [[(m.key, m.step, m.value) for m in batch] for batch in client.batches] == [
        [("train/loss", epoch, 1.0 / epoch), ("epoch", epoch, float(epoch))] for epoch in (1, 2, 3)
    ]
    assert client.texts == ["notes/outage.txt"] and client.terminated == ["FINISHED"]


def test_a_failed_run_does_not_hide_its_error_behind_an_unreachable_server() -> None:
    client = DownClient()
    tracker = RunTracker(client, "run-2", "0", "http://127.0.0.1:5000")  # type: ignore[arg-type]
    tracker.log_metrics({"train/loss": 1.0}, 1)
    with pytest.raises(ZeroDivisionError):
        with tracker:
            raise ZeroDivisionError("the training's own error")
    assert client.terminated == [] and tracker.writes.pending == ["metrics of epoch 1 (train/loss, epoch)"]
