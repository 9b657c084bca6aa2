"""The replication loop the benchmarks share: forked workers, progress every ten, optional CSV."""
from __future__ import annotations

import multiprocessing
import os
import time
from typing import Callable, Sequence

import pandas as pd


def run_replications(replicate: Callable[[tuple], list[dict]], jobs: Sequence[tuple], workers: int, started: float,
                     out: str = "") -> pd.DataFrame:
    """Rows of `replicate(job)` for every job, in job order; `out` also writes them as CSV.

    Workers are forked (the parent's loaded worlds are shared, not pickled) where the OS can.
    """
    rows: list[dict] = []
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with context.Pool(workers) as pool:
        for done, part in enumerate(pool.imap(replicate, jobs, chunksize=1), start=1):
            rows.extend(part)
            if done % 10 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} replications, {time.time() - started:.0f} s", flush=True)
    results = pd.DataFrame(rows)
    if out:
        results.to_csv(out, index=False)
    return results
