"""Tracking URIs are made absolute for Ray workers and stripped of credentials before logging."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cromss_ray.tracking import absolute_tracking_uri, redact_uri
from cromss_ray.tracking.uris import is_local_sqlite, sqlite_database_path


def test_relative_sqlite_uri_is_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    with_query = absolute_tracking_uri("sqlite:///runs/db.sqlite?timeout=5")
    assert with_query == f"sqlite:///{tmp_path}/runs/db.sqlite?timeout=5"


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////srv/mlflow/mlflow.db",
        "sqlite:///:memory:",
        "sqlite://",
        "http://127.0.0.1:5000",
        "https://alice:secret@mlflow.example.org/prefix",
        "databricks",
        "databricks://profile",
        "postgresql://user:pw@db.example.org:5432/mlflow",
    ],
)
def test_absolute_in_memory_and_server_uris_are_unchanged(uri):
    assert absolute_tracking_uri(uri) == uri


def test_plain_paths_and_file_uris_become_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("file:///srv/mlruns") == "file:///srv/mlruns"


def test_sqlite_database_path_of_local_and_other_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_database_path("sqlite:///a/mlflow.db") == tmp_path / "a" / "mlflow.db"
    assert not is_local_sqlite("sqlite:///:memory:") and not is_local_sqlite("http://host:5000")
    with pytest.raises(ValueError, match="not a local sqlite tracking URI"):
        sqlite_database_path("https://alice:secret@host")


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("https://alice:s3cr3t@mlflow.example.org:8443/api?x=1", "https://mlflow.example.org:8443/api?x=1"),
        ("http://token@127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://u:pw@db/mlflow?password=pw&sslmode=require", "postgresql://db/mlflow?sslmode=require"),
        ("https://host/path?access_token=abc&api_key=k&page=2#top", "https://host/path?page=2#top"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
        ("s3://bucket/shards", "s3://bucket/shards"),
        ("data/noldo-synth", "data/noldo-synth"),
    ],
)
def test_redact_uri_removes_user_info_and_secret_query_values(uri, redacted):
    assert redact_uri(uri) == redacted


USERINFO_CHARACTERS = string.ascii_letters + string.digits + "-_.~!$&'()*+,;=%"
"""What RFC 3986 allows in a URI's user and password (besides ':' between them)."""
credential_text = st.text(alphabet=USERINFO_CHARACTERS, min_size=1)
host_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5}){1,2}", fullmatch=True)


@given(user=credential_text, password=credential_text, host=host_names)
def test_redacted_uri_is_the_uri_without_its_credentials(user, password, host):
    assert redact_uri(f"https://{user}:{password}@{host}:5000/mlflow") == f"https://{host}:5000/mlflow"


def test_relative_store_resolves_to_the_same_file_from_every_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = absolute_tracking_uri("sqlite:///mlflow.db")
    monkeypatch.chdir(Path("/"))
    assert absolute_tracking_uri(resolved) == resolved
