"""A local Delta table read on the driver by delta-rs (the `deltalake` package), without Spark or
a JVM: `validate-inputs` reads running experiments this way, and the warehouse lists a table's
partitions from its log instead of running a Spark job."""
from __future__ import annotations

import os


def read_local_delta(path: str | os.PathLike):
    """The `deltalake.DeltaTable` at a local `path`, or None when there is no table there or
    delta-rs cannot read this one (a table feature it lacks): the caller falls back or says so."""
    try:
        from deltalake import DeltaTable

        return DeltaTable(str(path))
    except Exception:  # noqa: BLE001 - any reason
        return None
