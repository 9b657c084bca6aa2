"""Peer estimators for the benchmark: FeedX, cluster-experiments and pyfixest on pricelab's data.

Benchmark-only (optional dependency group `bench`: `make bench-setup`); `pipelines/` never imports
them. Each peer is called the way its documentation and source describe, on the same experiment
rows pricelab analyses: daily assignments joined with sales, blackout days dropped, and each
product's 8 weeks before its first enrolled day as the pre-period (as in the side-by-side run of
/work/shared/reference/peers.md). Effects are units per product-day.

- FeedX (`feedx`, item-level experiments on weekly data): time_bound through
  `experiment_analysis.analyze_experiment` (CUPED on the pre-test weeks, Yuen-Welch t-test;
  its per item-week difference / 7); crossover through the same call with `is_crossover=True`,
  one washout week per phase (the blackout week) and the ratio metric units / days (already per
  product-day); triggered has no FeedX design, so its pivoted table (window mean per day, pre-period
  mean per day) is built by hand for `analyze_single_metric`; random days is no FeedX design
  either: `statistics.yuens_t_test_paired` on each product's treated-day and control-day means.
  Designs FeedX cannot express (a crossover with more than two phases) return None.
- cluster-experiments: `ClusteredOLSAnalysis(cluster_cols=['unit_id'], target_col='units',
  treatment_col='arm', treatment='treatment', covariates=['pre_units'])` on the daily rows, with
  the phase as a further covariate for a crossover; `get_inference_results(df, 0.05)`.
- pyfixest: `feols('units ~ treated | product_id + date', vcov={'CRV1': 'unit_id'})` on the
  pre-period and window rows; triggered adds the in-window event indicator (the trigger's own
  demand effect; date effects cannot absorb windows that start on different days).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pandas as pd

PRE_WEEKS = 8
PEERS = ("feedx", "cluster_experiments", "pyfixest")


def experiment_frames(spec, assignments: pd.DataFrame, sales: pd.DataFrame, events: pd.DataFrame | None,
                      event_days: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(window rows, pre-period rows) of one experiment: product_id, unit_id, date, units, arm,
    treated, first_day, day (days since the experiment start), event_on; blackout days dropped."""
    rows = assignments[assignments["experiment"] == spec.name].copy()
    rows["date"] = pd.to_datetime(rows["date"])
    first = rows.groupby("product_id")["date"].min().rename("first_day")
    units = rows.drop_duplicates("product_id").set_index("product_id")["unit_id"]
    sales = sales[sales["product_id"].isin(first.index)][["product_id", "date", "units"]].copy()
    sales["date"] = pd.to_datetime(sales["date"])
    window = rows[~rows["blackout"]].merge(sales, on=["product_id", "date"], how="inner")
    window["treated"] = (window["arm"] == "treatment").astype(float)
    pre = sales.join(first, on="product_id")
    pre = pre[(pre["date"] < pre["first_day"]) & (pre["date"] >= pre["first_day"] - pd.Timedelta(days=7 * PRE_WEEKS))]
    pre = pre.assign(unit_id=pre["product_id"].map(units), arm="pre", treated=0.0)
    window = window.join(first, on="product_id")
    start = pd.Timestamp(spec.start)
    for frame in (window, pre):
        frame["day"] = (frame["date"] - start).dt.days
        frame["event_on"] = 0.0
    if events is not None and len(events):
        starts = events.assign(date=pd.to_datetime(events["date"]))[["product_id", "date"]]
        on = pd.concat([starts.assign(date=starts["date"] + pd.Timedelta(days=k)) for k in range(event_days)]).drop_duplicates()
        on["on"] = 1.0
        for name in ("window", "pre"):
            frame = window if name == "window" else pre
            merged = frame.merge(on, on=["product_id", "date"], how="left")
            frame["event_on"] = merged["on"].fillna(0.0).to_numpy()
    pre_units = pre.groupby("product_id")["units"].mean()
    window["pre_units"] = window["product_id"].map(pre_units)
    window = window[window["pre_units"].notna()]
    return window.reset_index(drop=True), pre.reset_index(drop=True)


def _result(effect: float, se: float, low: float, high: float) -> dict:
    return {"effect": float(effect), "se": float(se), "ci_low": float(low), "ci_high": float(high)}


def _quiet(call):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return call()


# ------------------------------------------------------------------------------------------------
# FeedX
# ------------------------------------------------------------------------------------------------

def feedx_estimate(spec, window: pd.DataFrame, pre: pd.DataFrame) -> dict | None:
    from feedx import experiment_analysis, statistics
    from feedx.experiment_design import ExperimentDesign

    weeks = spec.n_days // 7
    n_items = window["unit_id"].nunique()
    if spec.design == "random_days":
        means = window.groupby(["unit_id", "arm"])["units"].mean().unstack()
        means = means.dropna()
        r = _quiet(lambda: statistics.yuens_t_test_paired(means["treatment"].to_numpy(), means["control"].to_numpy(),
                                                           trimming_quantile=0.0))
        return _result(r.absolute_difference, r.standard_error, r.absolute_difference_lower_bound,
                       r.absolute_difference_upper_bound)
    if spec.design == "triggered":
        design = ExperimentDesign(n_items_before_trimming=n_items, runtime_weeks=max(1, spec.duration_days // 7),
                                  primary_metric="units", pretest_weeks=PRE_WEEKS, is_crossover=False,
                                  pre_trim_top_percentile=0.0, pre_trim_bottom_percentile=0.0, post_trim_percentile=0.0)
        test = window.groupby("unit_id").agg(test=("units", "mean"), treatment_assignment=("treated", "max"))
        test["pretest"] = pre.groupby("unit_id")["units"].mean()
        test = test.dropna().reset_index().rename(columns={"unit_id": "item_id"})
        test["treatment_assignment"] = test["treatment_assignment"].astype(int)
        pivoted = test.set_index(["item_id", "treatment_assignment"])[["test", "pretest"]]
        pivoted.columns = pd.MultiIndex.from_product([["units"], ["test", "pretest"]])
        r = _quiet(lambda: experiment_analysis.analyze_single_metric(pivoted, design=design, metric_name="units"))
        return _result(r.absolute_difference, r.standard_error, r.absolute_difference_lower_bound,
                       r.absolute_difference_upper_bound)
    frame = pd.concat([window.assign(period="window"), pre.assign(period="pre")], ignore_index=True)
    frame["week_id"] = np.floor_divide(frame["day"], 7)
    if spec.design == "time_bound":
        design = ExperimentDesign(n_items_before_trimming=n_items, runtime_weeks=weeks, primary_metric="units",
                                  pretest_weeks=PRE_WEEKS, is_crossover=False, pre_trim_top_percentile=0.0,
                                  pre_trim_bottom_percentile=0.0, post_trim_percentile=0.0)
        arm = window.groupby("unit_id")["treated"].max()
        weekly = frame.groupby(["unit_id", "week_id"], as_index=False)["units"].sum()
        weekly["treatment_assignment"] = weekly["unit_id"].map(arm).astype(int)
        weekly = weekly.rename(columns={"unit_id": "item_id"})
        r = _quiet(lambda: experiment_analysis.analyze_experiment(
            weekly, metrics=[experiment_analysis.Metric("units", "units")], design=design)).iloc[0]
        return _result(r["absolute_difference"] / 7, r["standard_error"] / 7, r["absolute_difference_lower_bound"] / 7,
                       r["absolute_difference_upper_bound"] / 7)
    if spec.design == "crossover":
        phases = spec.n_days // spec.phase_days
        if phases != 2 or spec.phase_days % 7 or spec.blackout_days % 7:
            return None  # FeedX's crossover has two periods, each a whole number of weeks after its washout
        washout = spec.blackout_days // 7
        design = ExperimentDesign(n_items_before_trimming=n_items, runtime_weeks=weeks, primary_metric="units",
                                  pretest_weeks=0, is_crossover=True, crossover_washout_weeks=washout,
                                  pre_trim_top_percentile=0.0, pre_trim_bottom_percentile=0.0, post_trim_percentile=0.0)
        first_phase = window[window["day"] < spec.phase_days]
        arm = first_phase.groupby("unit_id")["treated"].max()
        weekly = window.assign(week_id=np.floor_divide(window["day"], 7), days=1.0)
        weekly = weekly.groupby(["unit_id", "week_id"], as_index=False)[["units", "days"]].sum()
        weekly["treatment_assignment"] = weekly["unit_id"].map(arm)
        weekly = weekly.dropna(subset=["treatment_assignment"]).astype({"treatment_assignment": int})
        weekly = weekly.rename(columns={"unit_id": "item_id"})
        r = _quiet(lambda: experiment_analysis.analyze_experiment(
            weekly, metrics=[experiment_analysis.Metric("units", "units", denominator_column="days")], design=design)).iloc[0]
        return _result(r["absolute_difference"], r["standard_error"], r["absolute_difference_lower_bound"],
                       r["absolute_difference_upper_bound"])
    return None


# ------------------------------------------------------------------------------------------------
# cluster-experiments and pyfixest
# ------------------------------------------------------------------------------------------------

def cluster_experiments_estimate(spec, window: pd.DataFrame, pre: pd.DataFrame) -> dict | None:
    from cluster_experiments.experiment_analysis import ClusteredOLSAnalysis

    covariates = ["pre_units"]
    frame = window.copy()
    if spec.design == "crossover":
        frame["phase"] = np.floor_divide(frame["day"], spec.phase_days).astype(float)
        covariates.append("phase")
    analysis = ClusteredOLSAnalysis(cluster_cols=["unit_id"], target_col="units", treatment_col="arm",
                                    treatment="treatment", covariates=covariates)
    r = _quiet(lambda: analysis.get_inference_results(frame, 0.05))
    low, high = r.conf_int.lower, r.conf_int.upper
    return _result(r.ate, r.std_error, low, high)


def pyfixest_estimate(spec, window: pd.DataFrame, pre: pd.DataFrame) -> dict | None:
    import pyfixest as pf

    frame = pd.concat([window, pre], ignore_index=True)[["units", "treated", "product_id", "date", "unit_id", "event_on"]]
    frame["date"] = frame["date"].dt.strftime("%Y-%m-%d")
    formula = "units ~ treated + event_on | product_id + date" if spec.design == "triggered" else "units ~ treated | product_id + date"
    fit = _quiet(lambda: pf.feols(formula, data=frame, vcov={"CRV1": "unit_id"}))
    tidy = fit.tidy().loc["treated"]
    return _result(tidy["Estimate"], tidy["Std. Error"], tidy["2.5%"], tidy["97.5%"])


ESTIMATORS = {"feedx": feedx_estimate, "cluster_experiments": cluster_experiments_estimate, "pyfixest": pyfixest_estimate}


def available_peers() -> list[str]:
    """The peers whose libraries import here (the `bench` dependency group)."""
    found = []
    for name, module in (("feedx", "feedx"), ("cluster_experiments", "cluster_experiments"), ("pyfixest", "pyfixest")):
        try:
            _quiet(lambda: __import__(module))
        except ImportError:
            continue
        found.append(name)
    return found


def peer_estimates(spec, assignments, sales, events, peers) -> dict[str, dict | None]:
    """Every peer's estimate for one experiment (None where the peer cannot handle the design)."""
    window, pre = experiment_frames(spec, assignments, sales, events)
    out = {}
    for name in peers:
        try:
            out[name] = ESTIMATORS[name](spec, window, pre)
        except Exception as exc:  # a peer failing on one world is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return out
