"""Tracking-store URIs: made absolute before they travel to Ray workers, redacted before they are logged.

A relative ``sqlite:///mlflow.db`` means a different file in every working directory,
and Ray workers run in their own; the driver therefore resolves it once. Credentials
in a URI (``https://user:password@host``, ``?password=...``) never reach params, tags
or artifacts: everything this package logs goes through :func:`redact_uri`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

SQLITE_PREFIX = "sqlite:///"
SENSITIVE_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key", "credential", "signature")


def _absolute_path(path: str) -> Path:
    return Path(path).expanduser().resolve()


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a local sqlite database or file store turned into an absolute location.

    ``sqlite:///mlflow.db`` becomes ``sqlite:////<cwd>/mlflow.db``; a plain path or a
    ``file:`` URI becomes an absolute ``file:///`` URI; in-memory sqlite, server
    (``http(s)://``), ``databricks`` and database-server URIs are returned unchanged.
    """
    if uri.startswith(SQLITE_PREFIX):
        location, sep, query = uri[len(SQLITE_PREFIX) :].partition("?")
        if not location or location == ":memory:" or location.startswith("/"):
            return uri
        return f"{SQLITE_PREFIX}{_absolute_path(location)}{sep}{query}"
    if uri.startswith("file:"):
        return _absolute_path(urlsplit(uri).path or ".").as_uri()
    if "://" in uri or uri.startswith("databricks"):
        return uri
    return _absolute_path(uri).as_uri()


def is_local_sqlite(uri: str) -> bool:
    """Whether ``uri`` names a sqlite database file on this machine."""
    location = uri[len(SQLITE_PREFIX) :].partition("?")[0] if uri.startswith(SQLITE_PREFIX) else ""
    return bool(location) and location != ":memory:"


def sqlite_database_path(uri: str) -> Path:
    """The database file of a local sqlite ``uri`` (made absolute against the working directory)."""
    if not is_local_sqlite(uri):
        raise ValueError(f"'{redact_uri(uri)}' is not a local sqlite tracking URI")
    return _absolute_path(uri[len(SQLITE_PREFIX) :].partition("?")[0])


def carries_credentials(uri: str) -> bool:
    """Whether ``uri`` holds a ``user:password@`` or a secret-looking query value."""
    return redact_uri(uri) != uri


def redact_uri(uri: str) -> str:
    """``uri`` without credentials: no ``user:password@`` and no secret-looking query values."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(key, value) for key, value in pairs if not any(word in key.lower() for word in SENSITIVE_QUERY_KEYS)]
    if netloc == parts.netloc and len(kept) == len(pairs):
        return uri
    query = f"?{urlencode(kept)}" if kept else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}{fragment}"
