"""Daily partitions, defined once. Today's partition exists (end_offset=1) so the morning
schedule can publish the day's assignments before the day's prices go live. An unknown partition
key is refused naming the valid range (Dagster's own message names only the key)."""

import os

import dagster as dg
from dagster._core.errors import DagsterUnknownPartitionError

PARTITIONS_START = os.environ.get("PRICELAB_PARTITIONS_START", "2026-01-01")


class DailyPartitionsNamingTheRange(dg.DailyPartitionsDefinition):
    """Dagster's daily partitions, whose refusal of an unknown key says which keys exist."""

    def validate_partition_key(self, partition_key: str, context) -> None:
        try:
            super().validate_partition_key(partition_key, context)
        except DagsterUnknownPartitionError:
            last = self.get_last_partition_key()
            raise DagsterUnknownPartitionError(
                f"partition {str(partition_key)[:40]!r} of daily_assignments does not exist: valid keys are days "
                f"YYYY-MM-DD from {self.get_first_partition_key()} to {last} (today's day is the last; "
                "PRICELAB_PARTITIONS_START sets the first)"
            ) from None


daily_partitions = DailyPartitionsNamingTheRange(start_date=PARTITIONS_START, end_offset=1, timezone="UTC")
