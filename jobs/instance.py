"""The Dagster instance's storage, chosen by one setting.

`dagster.yaml` names `jobs.instance.PricelabStorage` as its storage. With `PRICELAB_POSTGRES_URL`
unset it is Dagster's SQLite storage under `$DAGSTER_HOME` (exactly what Dagster uses by
default); set to a PostgreSQL URL (`postgresql://user:password@host:5432/db`) it is
`dagster-postgres`. The URL is rewritten to name the psycopg2 driver
(`postgresql+psycopg2://...`): SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which is
not installed, and dagster-postgres is written for psycopg2. The CLI, `dagster dev` and the
daemon all read the instance through this class, so they share the one setting.
"""
from __future__ import annotations

import os
import re

from dagster import Field, StringSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClass

POSTGRES_URL_ENV = "PRICELAB_POSTGRES_URL"
_SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)


class InstanceSettingError(ValueError):
    """PRICELAB_POSTGRES_URL is not a PostgreSQL URL."""


def psycopg2_url(url: str) -> str:
    """`postgresql://`, `postgres://` or `postgresql+<driver>://` -> `postgresql+psycopg2://`."""
    url = url.strip()
    if not _SCHEME.match(url):
        raise InstanceSettingError(
            f"{POSTGRES_URL_ENV} must be a PostgreSQL URL such as postgresql://user:password@host:5432/dbname "
            f"(got one starting {url[:16]!r})"
        )
    return _SCHEME.sub("postgresql+psycopg2://", url, count=1)


class PricelabStorage(DagsterStorage, ConfigurableClass):
    """Instance storage: PostgreSQL when PRICELAB_POSTGRES_URL is set, else SQLite under base_dir
    (default $DAGSTER_HOME). Never instantiated itself: `from_config_value` returns the storage
    it chooses (Dagster's own classes)."""

    @classmethod
    def config_type(cls):
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        url = os.environ.get(POSTGRES_URL_ENV, "").strip()
        if url:
            from dagster_postgres import DagsterPostgresStorage

            return DagsterPostgresStorage(postgres_url=psycopg2_url(url), inst_data=inst_data)
        from dagster._core.storage.sqlite_storage import DagsterSqliteStorage

        base_dir = config_value.get("base_dir") or os.environ.get("DAGSTER_HOME") or os.getcwd()
        return DagsterSqliteStorage(base_dir=base_dir, inst_data=inst_data)
