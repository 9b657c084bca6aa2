"""Asset kinds shown in the Dagster UI (`kinds=`): how an asset is computed and stored."""

SPARK = {"spark"}  # computed with Spark
DELTA_TABLE = {"spark", "delta"}  # computed with Spark, stored as a Delta Lake table of the warehouse
