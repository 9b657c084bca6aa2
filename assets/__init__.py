"""Dagster assets, one module per stage: thin wrappers that read inputs, call `pipelines`, write
outputs and attach metadata and checks. Resources are requested by key (`spark`, `warehouse`)
so this package never imports `jobs`."""
