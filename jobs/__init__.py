"""Dagster wiring: resources, partitions, jobs, schedules and the one `Definitions` object."""
