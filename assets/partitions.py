"""Daily partitions, defined once. Today's partition exists (end_offset=1) so the morning
schedule can publish the day's assignments before the day's prices go live."""

import os

import dagster as dg

PARTITIONS_START = os.environ.get("PRICELAB_PARTITIONS_START", "2026-01-01")

daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1, timezone="UTC")
