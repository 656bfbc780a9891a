"""Shards read through a real S3-compatible server (moto's standalone server on 127.0.0.1)
give the same samples as from the local disk; filesystem resolution of URIs (spec 9)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
from moto.server import ThreadedMotoServer

from cromss_ray.config import DataConfig
from cromss_ray.data import storage
from cromss_ray.data.pipeline import open_shards, pretrain_datasets, resolve_filesystem, set_epoch
from cromss_ray.data.storage import READ_ATTEMPTS, retried_read

BUCKET = "cromss-test"
ACCESS_KEY = "moto-access-key"
SECRET = "moto-secret-key"
SESSION_TOKEN = "moto-session-token"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with dummy credentials in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION"):
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def uploaded(s3_endpoint: str, pretrain_shards: Path) -> Path:
    """The synthetic pretraining shards, uploaded as ``s3://BUCKET/noldo/``."""
    local = pretrain_shards
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), BUCKET, f"noldo/{path.name}")
    client.put_object(Bucket=BUCKET, Key="broken/part-00000.parquet", Body=b"PAR1 not a parquet file")
    return local


def test_resolve_local_paths_and_uris(tmp_path: Path) -> None:
    filesystem, path = resolve_filesystem(str(tmp_path))
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path)
    assert resolve_filesystem(f"file://{tmp_path}")[1] == str(tmp_path)
    assert resolve_filesystem("relative/dir")[1] == os.path.join(os.getcwd(), "relative/dir")
    with pytest.raises(ValueError, match=r"s3:///prefix: an S3 URI needs a bucket"):
        resolve_filesystem("s3:///prefix")
    with pytest.raises(ValueError, match=r"nosuch://x: not a supported filesystem URI"):
        resolve_filesystem("nosuch://x")


def test_resolve_s3_with_endpoint_override(s3_endpoint: str) -> None:
    filesystem, path = resolve_filesystem("s3://bucket/some/prefix/", s3_endpoint)
    options = filesystem.__reduce__()[1][0]
    assert path == "bucket/some/prefix" and filesystem.type_name == "s3"
    assert options["endpoint_override"] == s3_endpoint.removeprefix("http://")
    assert options["scheme"] == "http" and options["region"] == "us-east-1"


def test_the_s3_filesystem_carries_no_credentials(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pickled for Ray read tasks, the filesystem holds the endpoint and region only: each worker
    resolves credentials from its own environment or instance profile, so temporary ones refresh."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    filesystem, _ = resolve_filesystem("s3://bucket/prefix", s3_endpoint)
    options = filesystem.__reduce__()[1][0]
    assert (options["access_key"], options["secret_key"], options["session_token"]) == (None, None, None)
    assert not options["anonymous"]
    pickled = pickle.dumps(filesystem)
    assert not [secret for secret in (ACCESS_KEY, SECRET, SESSION_TOKEN) if secret.encode() in pickled]
    assert pickle.loads(pickled).__reduce__()[1][0]["endpoint_override"] == options["endpoint_override"]


@pytest.mark.ray
def test_s3_shards_give_the_local_samples(ray_cluster: None, s3_endpoint: str, uploaded: Path) -> None:
    uri = f"s3://{BUCKET}/noldo"
    _, meta = open_shards(uri, s3_endpoint)
    _, local_meta = open_shards(str(uploaded))
    assert meta == local_meta
    config = DataConfig(uri=uri, s3_endpoint=s3_endpoint, crop=32, val_fraction=0.25, s2_bands=9)
    remote = pretrain_datasets(config, seed=2)
    local = pretrain_datasets(config.model_copy(update={"uri": str(uploaded), "s3_endpoint": None}), seed=2)
    assert (remote.num_train, remote.num_val) == (local.num_train, local.num_val)
    assert remote.num_train + remote.num_val == 12
    set_epoch(remote.clock, 1)
    set_epoch(local.clock, 1)
    remote_samples = dict(_by_key(remote.train))
    local_samples = dict(_by_key(local.train))
    assert set(remote_samples) == set(local_samples) and len(remote_samples) == local.num_train
    for key, sample in local_samples.items():
        for name in ("season", "s1", "s2", "label", "labels_all", "clean_label"):
            np.testing.assert_array_equal(remote_samples[key][name], sample[name])


@pytest.mark.ray
def test_bad_object_is_named_with_its_uri(ray_cluster: None, s3_endpoint: str, uploaded: Path) -> None:
    message = rf"s3://{BUCKET}/broken/part-00000.parquet: not a readable Parquet file"
    with pytest.raises(ValueError, match=message) as info:
        open_shards(f"s3://{BUCKET}/broken", s3_endpoint)
    assert SECRET not in str(info.value)
    with pytest.raises(FileNotFoundError, match=rf"s3://{BUCKET}/missing: no such directory or object prefix"):
        open_shards(f"s3://{BUCKET}/missing", s3_endpoint)


def _by_key(dataset: ray.data.Dataset) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for batch in dataset.iter_batches(batch_size=4, batch_format="numpy"):
        for index, key in enumerate(batch["key"].tolist()):
            yield key, {name: values[index] for name, values in batch.items()}


def test_object_store_reads_are_tried_again_while_the_store_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", pauses.append)
    attempts: list[int] = []

    def read_failing(times: int) -> Callable[[], str]:
        def read() -> str:
            attempts.append(1)
            if len(attempts) <= times:
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection refused")
            return "rows"

        return read

    s3 = pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", region="us-east-1", anonymous=True)
    assert retried_read(s3, read_failing(2)) == "rows" and pauses == [0.5, 1.0]
    attempts.clear()
    pauses.clear()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        retried_read(s3, read_failing(READ_ATTEMPTS))
    assert len(attempts) == READ_ATTEMPTS and pauses == [0.5, 1.0, 2.0, 4.0, 8.0]
    attempts.clear()
    with pytest.raises(OSError):
        retried_read(pafs.LocalFileSystem(), read_failing(1))
    assert len(attempts) == 1, "a local read is not repeated"
