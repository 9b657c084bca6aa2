"""pricelab's computation: plain functions on Spark and pandas DataFrames, no orchestrator.

One module per stage, in the order data flows: inputs -> simulation (demo data) -> graph ->
clustering -> experiments -> assignment -> estimation -> report. `storage` and `spark` are shared
plumbing. Nothing here imports Dagster, so a notebook can call any stage directly.
"""
