"""Progress of long work, with an estimate of the time left, as plain log lines.

`Progress` counts units of work done in the driver (experiments estimated, snapshots built);
`spark_progress` watches the Spark job running meanwhile (the graph's one task per group of
blocks, Leiden per component) through the session's status tracker, from a background thread,
and reports tasks done / total. Both only call the `log` function they are given (the asset's
`context.log.info`), so the same lines reach the CLI's console and the Dagster run log.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(label: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """'label: 3/8 unit done (38%), 12s elapsed, ~20s left' (the estimate from the mean rate so far)."""
    share = done / total if total else 1.0
    left = f", ~{_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
    return f"{label}: {done}/{total} {unit} done ({share:.0%}), {_duration(elapsed)} elapsed{left}"


class Progress:
    """Counts `total` units of driver-side work and logs a line (with time left) after each."""

    def __init__(self, label: str, total: int, unit: str, log: Callable[[str], None]):
        self.label, self.total, self.unit, self.log = label, total, unit, log
        self.done = 0
        self.started = time.monotonic()
        log(f"{label}: {total} {unit} to do")

    def step(self, what: str = "") -> str:
        self.done += 1
        line = progress_line(self.label, self.done, self.total, self.unit, time.monotonic() - self.started)
        self.log(line + (f" (last: {what})" if what else ""))
        return line


@contextlib.contextmanager
def spark_progress(spark, label: str, log: Callable[[str], None], every_seconds: float = 10.0):
    """While the block runs, log the running Spark stage's tasks done / total every
    `every_seconds` (only when it moved), with an estimate of the time left for that stage.
    Does nothing on Spark Connect (no status tracker on the client)."""
    try:
        tracker = spark.sparkContext.statusTracker()
    except Exception:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()
    first_seen: dict[int, float] = {}
    last: dict[int, int] = {}

    def watch() -> None:
        while not stop.wait(every_seconds):
            try:
                stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
            except Exception:
                return
            stages = [s for s in stages if s is not None and s.numTasks > 1]
            if not stages:
                continue
            stage = max(stages, key=lambda s: s.numTasks)
            first_seen.setdefault(stage.stageId, time.monotonic())
            if last.get(stage.stageId) == stage.numCompletedTasks:
                continue
            last[stage.stageId] = stage.numCompletedTasks
            elapsed = time.monotonic() - first_seen[stage.stageId]
            log(progress_line(f"{label} (Spark stage {stage.stageId})", stage.numCompletedTasks, stage.numTasks,
                              "tasks", elapsed) + f"; {_duration(time.monotonic() - started)} since the start")

    thread = threading.Thread(target=watch, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_seconds + 1)
