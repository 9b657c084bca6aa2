"""The replication loop the benchmarks share: forked workers, progress every ten, optional CSV.

With `out`, rows are appended to the CSV as each replication finishes, so a run that is stopped
early (a session cut off, a machine needed for something else) still leaves every finished
replication on disk; `read_partial` loads them.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from typing import Callable, Sequence

import pandas as pd


def run_replications(replicate: Callable[[tuple], list[dict]], jobs: Sequence[tuple], workers: int, started: float,
                     out: str = "") -> pd.DataFrame:
    """Rows of `replicate(job)` for every job, in job order; `out` also writes them as CSV as they come.

    Workers are forked (the parent's loaded worlds are shared, not pickled) where the OS can.
    """
    rows: list[dict] = []
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    partial = f"{out}.partial" if out else ""
    if partial and os.path.exists(partial):
        os.remove(partial)
    with context.Pool(workers) as pool:
        for done, part in enumerate(pool.imap(replicate, jobs, chunksize=1), start=1):
            rows.extend(part)
            if partial:
                _append_rows(partial, part)
            if done % 10 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} replications, {time.time() - started:.0f} s", flush=True)
    results = pd.DataFrame(rows)
    if out:
        results.to_csv(out, index=False)  # the whole table, columns aligned across every row
        if os.path.exists(partial):
            os.remove(partial)
    return results


def _append_rows(path: str, rows: list[dict]) -> None:
    """One replication's rows as JSON-per-line (their keys can differ between designs and peers)."""
    import json

    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")


def read_partial(out: str) -> pd.DataFrame:
    """The rows a stopped run left in `out.partial` (one JSON object per line)."""
    return pd.read_json(f"{out}.partial", lines=True)
