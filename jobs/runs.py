"""Runs whose process died (killed, machine rebooted) stay STARTED in the Dagster instance for
ever, since nobody is left to record their end. Every run records its process (`pricelab/pid`,
`pricelab/host`, set when its resources start); `fail_dead_runs` marks a STARTED run FAILURE when
that process is gone. The `pricelab` CLI calls it before each command and the experiment-files
sensor on each tick, so the UI shows the truth within a minute.
"""
from __future__ import annotations

import os
import socket

import dagster as dg

PID_TAG = "pricelab/pid"
HOST_TAG = "pricelab/host"


def process_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


# Runs made in-process (`make demo`, `pricelab`) carry the code location's label, as runs
# launched from the UI do, so the UI lists them under their jobs (`dagster dev -m
# jobs.definitions` and workspace.yaml both name the location "jobs.definitions").
CODE_LOCATION = "jobs.definitions"
REPOSITORY_LABEL = f"__repository__@{CODE_LOCATION}"


def run_tags() -> dict[str, str]:
    """Tags for a run executed in this process: its process and the code location's label."""
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

    return {**process_tags(), REPOSITORY_LABEL_TAG: REPOSITORY_LABEL}


def record_run_process(instance: dg.DagsterInstance | None, run_id: str | None) -> None:
    """Tag the run with this process (the process that executes its steps)."""
    if instance is None or not run_id:
        return
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(PID_TAG) != str(os.getpid()):
        instance.add_run_tags(run_id, process_tags())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark FAILURE every STARTED run of this host whose recorded process is gone; their ids."""
    host = socket.gethostname()
    marked = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        pid = run.tags.get(PID_TAG)
        if run.tags.get(HOST_TAG) != host or not pid or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        instance.report_run_failed(
            run, message=f"run {run.run_id[:8]} of {run.job_name} was left STARTED by process {pid}, which is gone "
            "(killed?): marked failed; re-run it (publishing is idempotent, published days never change)"
        )
        marked.append(run.run_id)
    return marked
