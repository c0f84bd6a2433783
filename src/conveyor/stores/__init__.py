"""The stores: the Store protocol (base.py) and one module per backend holding all its SQL.
open_store(url) picks the backend for a database URL."""

from __future__ import annotations

from .base import Store

__all__ = ["Store", "describe_database", "open_store"]


def open_store(url: str, read_only: bool = False) -> Store:
    """The store for a database URL: sqlite:///path or postgresql://... A read-only store never
    creates or migrates a database: one that is missing or has no conveyor tables is a UsageError."""
    scheme = _scheme(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(url, read_only=read_only)
    from .postgres import PostgresStore

    return PostgresStore(url, read_only=read_only)


def describe_database(url: str) -> str:
    """The database a URL names, for a log line: a SQLite file's absolute path, a PostgreSQL URL
    without its password."""
    if _scheme(url) == "sqlite":
        from .sqlite import describe
    else:
        from .postgres import describe
    return describe(url)


def _scheme(url: str) -> str:
    """'sqlite' or 'postgresql', or a UsageError saying what is wrong with the URL."""
    from ..errors import UsageError, shown

    if not isinstance(url, str) or not url.strip():
        raise UsageError("database URL is empty: give sqlite:///path.db or postgresql://user@host/db")
    scheme, sep, _ = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise UsageError(f"database URL {shown(url)} has no scheme: use sqlite:///path.db or postgresql://user@host/db")
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        return "postgresql"
    raise UsageError(
        f"unknown database URL scheme {shown(scheme)} in {shown(url)}: conveyor supports 'sqlite' and 'postgresql'"
    )
