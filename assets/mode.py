"""Demo mode: PRICELAB_DEMO=1 (set by `make demo`) adds the simulator's assets. Without it no
asset simulates anything and sales come only from `input/sales/`."""

import os


def demo_mode() -> bool:
    return os.environ.get("PRICELAB_DEMO", "").strip().lower() in ("1", "true", "yes")
