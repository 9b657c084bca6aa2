"""The daily schedule's own path: every design published one day at a time, exactly as the
schedule does (one `daily_assignments` run per partition), gives the same days as one range run."""
from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import pytest

from pipelines.storage import Warehouse
from tests.test_assets import TINY, _materialize

FIRST_DAY = dt.date(2026, 1, 4)  # the day before the demo experiments start: nothing active yet
N_DAYS = 12  # past the crossover blackout (days 1-7) into its first analysable days


@pytest.fixture(scope="module")
def built_market(tmp_path_factory):
    from pipelines.simulation import write_demo_inputs

    root = tmp_path_factory.mktemp("daily") / "data"
    write_demo_inputs(root, TINY)
    built = _materialize(root, ["catalog", "sales", "trigger_events", "experiments", "substitution_graph", "product_clusters"])
    assert built.success
    return root


def _published(spark, root) -> pd.DataFrame:
    frame = Warehouse(root).read(spark, "daily_assignments").toPandas()
    frame["date"] = pd.to_datetime(frame["date"]).dt.date
    return frame.sort_values(["date", "experiment", "product_id"]).reset_index(drop=True)


@pytest.mark.slow
def test_one_day_at_a_time_equals_one_range_run(spark, built_market, tmp_path):
    days = [FIRST_DAY + dt.timedelta(days=i) for i in range(N_DAYS)]
    daily, ranged = tmp_path / "daily", tmp_path / "ranged"
    shutil.copytree(built_market, daily)
    shutil.copytree(built_market, ranged)

    for day in days:  # the schedule: one run per partition, in order
        result = _materialize(daily, ["daily_assignments"], partition_key=day.isoformat())
        assert result.success, (day, [e.message for e in result.all_events if e.is_failure])
    tags = {"dagster/asset_partition_range_start": days[0].isoformat(), "dagster/asset_partition_range_end": days[-1].isoformat()}
    assert _materialize(ranged, ["daily_assignments"], tags=tags).success

    one_by_one, at_once = _published(spark, daily), _published(spark, ranged)
    assert Warehouse(daily).partitions("daily_assignments", "date") == [d.isoformat() for d in days]
    assert set(one_by_one["experiment"]) == {"time-bound-kitchen", "triggered-garden", "random-days-toys", "crossover-pets"}
    # the path that used to fail: the triggered experiment's first day published alone, with no trigger yet
    first = dt.date(2026, 1, 5)
    triggered = one_by_one[one_by_one["experiment"] == "triggered-garden"]
    assert triggered["date"].min() > first, "the seed must leave the triggered experiment's first day empty"
    pd.testing.assert_frame_equal(one_by_one, at_once)
