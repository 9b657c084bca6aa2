"""The experiment report: a results table (with the simulator's truth beside it in demo mode) and
a picture of each estimate with its 95% interval."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd


def results_table(
    results: pd.DataFrame, truth: pd.DataFrame | None = None, experiments: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The columns a person reads first; `truth` (the simulator's effects) adds a check, and the
    true spillover beside each spillover estimate.

    Each estimate is compared with the effect its design identifies: randomising products
    measures the DIRECT effect (own price change, neighbours as assigned); randomising whole
    substitute clusters measures the GLOBAL effect (everything treated vs nothing, cannibalisation
    between substitutes included). `experiments` (name, unit) says which; without it, direct.
    """
    columns = ["experiment", "design"] + [c for c in ("metric", "role") if c in results.columns] + [
        "estimator", "effect", "se", "ci_low", "ci_high", "relative_effect"]
    # decision metrics (issue 16): the relative interval, Holm's p-value, the guardrail's verdict
    columns += [c for c in ("ci_low_rel", "ci_high_rel", "p_holm", "guardrail_status") if c in results.columns]
    columns += ["n_products", "n_trimmed", "spillover_effect", "spillover_se"]
    # the spillover interval (Student t, from the controls' forecasts) and the graph-based IPW beside it
    columns += [c for c in ("spillover_ci_low", "spillover_ci_high", "spillover_ipw") if c in results.columns]
    # precision and carryover, when the results have them: the counterfactual the back-test chose,
    # the variance the regression adjustment removed, and the switchback carryover check
    columns += [c for c in ("counterfactual", "variance_reduction", "carryover_estimate", "carryover_flag",
                            "carryover_bias", "carryover_detectable") if c in results.columns]
    table = results[columns].copy()
    if "carryover_flag" in table.columns:  # a flag reads "flagged" or nothing; a bare "NO" reads like a failed check
        flagged = table["carryover_flag"].astype("boolean").fillna(False).astype(bool)
        table["carryover_flag"] = np.where(flagged, "flagged", "")
    if truth is not None and not truth.empty:
        units = dict(zip(experiments["name"], experiments["unit"])) if experiments is not None else {}
        keys = ["experiment", "metric"] if "metric" in table.columns and "metric" in truth.columns else ["experiment"]
        wanted = keys + [c for c in ("true_direct_effect", "true_global_effect", "true_relative_effect",
                                     "true_global_relative_effect", "true_spillover_effect") if c in truth.columns]
        table = table.merge(truth[wanted], on=keys, how="left")
        table["estimand"] = ["global" if units.get(name) == "cluster" else "direct" for name in table["experiment"]]
        is_global = table["estimand"] == "global"
        table["true_effect"] = table["true_global_effect"].where(is_global, table["true_direct_effect"])
        table["covered"] = (table["ci_low"] <= table["true_effect"]) & (table["true_effect"] <= table["ci_high"])
        if "true_relative_effect" in table.columns:
            relative = table["true_relative_effect"]
            if "true_global_relative_effect" in table.columns:
                relative = table["true_global_relative_effect"].where(is_global, relative)
            table["true_relative"] = relative
            if "ci_low_rel" in table.columns:
                table["covered_rel"] = (table["ci_low_rel"] <= relative) & (relative <= table["ci_high_rel"])
        spill = table.get("true_spillover_effect")
        table = table.drop(columns=[c for c in ("true_direct_effect", "true_global_effect", "true_relative_effect",
                                                "true_global_relative_effect", "true_spillover_effect") if c in table.columns])
        if spill is not None:  # shown where a spillover was estimated
            table["true_spillover"] = spill.where(table["spillover_effect"].notna())
    if "metric" not in table.columns:
        return table.sort_values(["experiment", "estimator"]).reset_index(drop=True)
    # per experiment: the metrics in the file's order (as estimated), each metric's estimators together
    table["_metric"] = table.groupby("experiment", sort=False)["metric"].transform(lambda m: pd.factorize(m)[0])
    table = table.sort_values(["experiment", "_metric", "estimator"], kind="stable").drop(columns="_metric")
    return table.reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """A fixed-width text table for the terminal and Markdown reports (pipe-delimited)."""

    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "NO"
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    header = list(table.columns)
    body = [[cell(v) for v in row] for row in table.itertuples(index=False)]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *[line(r) for r in body]])


def effects_png(table: pd.DataFrame) -> bytes:
    """Each experiment's estimate and 95% interval (and the truth, when known), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.experiment} [{r.estimator}]" for r in table.itertuples()]
    y = np.arange(len(table))[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(table) + 1.4))
    ax.errorbar(
        table["effect"],
        y,
        xerr=[table["effect"] - table["ci_low"], table["ci_high"] - table["effect"]],
        fmt="o",
        color="#1f5fa8",
        capsize=4,
        label="estimate, 95% interval",
    )
    if "true_effect" in table:
        ax.scatter(table["true_effect"], y, marker="x", color="#c0392b", zorder=3, label="simulator truth")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, labels)
    ax.set_xlabel("effect per product-day (metric units)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Experiment effects")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _exposure_section(exposure: pd.DataFrame | None) -> list[str]:
    """Products per exposure condition behind the spillover estimates, and what each estimate can see."""
    if exposure is None or exposure.empty:
        return []
    wide = exposure.pivot_table(index="experiment", columns="condition", values="products", aggfunc="sum", fill_value=0)
    return [
        "## Spillover exposure (products per condition)",
        "",
        format_table(wide.reset_index()),
        "",
        "`spillover_effect` (with its interval) is the controls' departure from their own forecasts: "
        "it needs no graph, and its interval carries the forecasts' common error measured on placebo "
        "windows before the experiment. `spillover_ipw` is the design-based contrast of the exposure "
        "conditions above, measured on the substitution graph's edges and, in blocks randomised whole "
        "for their pooled evidence, on the treated share of the block. Substitutes neither could "
        "detect count as unexposed, so `spillover_ipw` understates spillover the graph cannot see (the "
        "graph's power below gives the smallest cross elasticity it could see); a gap between the two "
        "says so.",
        "",
    ]


def _graph_power_section(graph_power: dict | None) -> list[str]:
    """What the substitution graph could see (`graph.power_summary` of the latest snapshot)."""
    if not graph_power:
        return []
    return [
        f"## What the substitution graph could see (snapshot {graph_power.get('snapshot_date', '')})",
        "",
        f"{graph_power['pairs_tested']} candidate pairs tested in {graph_power['blocks']} blocks; "
        f"{graph_power['edges']} edges ({graph_power['edges_by_shrinkage']} by within-block shrinkage). "
        f"Pair tests detect a cross elasticity of about {graph_power['median_pair_detectable_elasticity']:.2f} "
        f"with 80% power; a block's pooled test a per-product total of about "
        f"{graph_power['median_pooled_detectable_elasticity']:.2f}. Market-wide pooled z: "
        f"{graph_power['market_pooled_z']:.1f}. Blocks randomised whole: {graph_power['blocks_randomised_whole']}.",
        "",
        *[f"- **Warning:** {w}" for w in graph_power["warnings"]],
        "",
        graph_power["table"],
        "",
    ]


def _carryover_section(table: pd.DataFrame) -> list[str]:
    """Switchback experiments whose own data flag carryover and the size of its bias; for the
    others that were checked, the carryover the check could have missed."""
    if "carryover_flag" not in table.columns:
        return []
    flag = table["carryover_flag"].fillna(False).astype(str).isin(["True", "flagged"])
    flagged = table[flag].drop_duplicates("experiment")
    lines = [
        f"- `{r.experiment}` ({r.design}): control days right after a treated day differ by "
        f"{r.carryover_estimate:+.3f} from those after a control day; its estimates are biased by about "
        f"{r.carryover_bias:+.3f} (lag one only). Add blackout days or read the estimate as a lower bound."
        for r in flagged.itertuples()
    ]
    if "carryover_detectable" in table.columns:
        quiet = table[~flag & table["carryover_detectable"].notna() & ~table["experiment"].isin(flagged["experiment"])]
        lines += [
            f"- `{r.experiment}` ({r.design}): no carryover flagged. The check catches a carryover of "
            f"{r.carryover_detectable:.3f} a day (either way) four times in five, smaller ones less often."
            for r in quiet.drop_duplicates("experiment").itertuples()
        ]
    return ["## Carryover", ""] + lines + [""] if lines else []


def report_markdown(
    table: pd.DataFrame, problems: dict[str, str], as_of, exposure: pd.DataFrame | None = None,
    graph_power: dict | None = None, sentences: dict[str, str] | None = None, over_time: bool = False,
) -> str:
    """The report as Markdown: each experiment opened by its business sentence (`sentences`,
    `business_sentence`) and its decision rows, then the full table, the effect over time
    (`over_time`: effect_over_time.png beside it), exposure conditions behind the spillover estimate,
    what the substitution graph could see (`graph.power_summary` of the latest snapshot),
    experiments that could not be estimated, and why."""
    if as_of is None or (not isinstance(as_of, str) and pd.isna(as_of)) or table.empty:
        # nothing estimated: say so plainly, never "sales up to None" over an empty table
        lines = ["# pricelab experiment report: no experiment estimated yet", ""]
        if not problems:
            lines += ["No accepted experiment has published days with sales to analyse: check the "
                      "`experiments` asset's refused files and the `daily_assignments` runs.", ""]
    else:
        lines = [f"# pricelab experiment report (sales up to {as_of})", ""]
        for name, sentence in (sentences or {}).items():
            rows = decision_table(table[table["experiment"] == name])
            lines += [f"## {name}", "", sentence, "", format_table(rows) if len(rows) else "", ""]
        if sentences:
            lines += [HOLM_NOTE, "", "## All results (for the analyst)", ""]
        lines += [format_table(table), ""]
        if over_time:
            lines += ["## Effect over time", "", "The cumulative relative effect by day since start, per experiment "
                      "and metric (DiD on each product's first 7, 14, ... window days; band: 95% delta-method interval). "
                      "`experiment_results_history` keeps every refresh's results (`as_of=YYYY-MM-DD/`).", "",
                      "![effect over time](effect_over_time.png)", ""]
    lines += _exposure_section(exposure) + _graph_power_section(graph_power) + _carryover_section(table)
    if problems:
        lines += ["## Not estimated", ""] + [f"- `{name}`: {why}" for name, why in sorted(problems.items())] + [""]
    lines += ["![effects](effects.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Decision metrics (issue 16): the business sentence, the effect over time, the decision table
# ----------------------------------------------------------------------------------------------

HEADLINE_ESTIMATORS = ("hpte", "did")  # the sentence quotes the first present
HOLM_NOTE = ("p-values (`p_holm`) are adjusted across each experiment's metrics with Holm's step-down method "
             "(family-wise error 5%), separately per estimator; guardrails hold when the whole 95% relative "
             "interval lies on the safe side of their tolerance, are breached when it lies wholly beyond it, "
             "and are inconclusive otherwise.")


def _percent(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value * 100:.0f}%".replace("-", "\u2212")


def _article(number_text: str) -> str:
    return "An" if number_text.startswith(("8", "11", "18")) else "A"


def _population_text(spec) -> str:
    population = spec.population or {}
    parts = []
    if population.get("categories"):
        parts.append(", ".join(population["categories"]))
    if population.get("subclasses"):
        parts.append("subclass " + ", ".join(population["subclasses"]))
    if population.get("product_ids"):
        parts.append(f"{len(population['product_ids'])} listed products")
    return " / ".join(parts) or "the whole catalogue"


def business_sentence(spec, rows: pd.DataFrame) -> str:
    """One plain sentence for a business partner: the price change, on what, for how long, and
    each metric's relative effect with its 95% interval, then the guardrails' verdict.

    `spec`: the `ExperimentSpec`; `rows`: its experiment_results rows (all metrics, one estimator
    is quoted: HPTE when present, else DiD)."""
    change = spec.price_change
    size = f"{abs(change) * 100:.0f}"
    what = "price cut" if change < 0 else "price rise"
    estimator = next((e for e in HEADLINE_ESTIMATORS if (rows["estimator"] == e).any()), None)
    if estimator is None:
        return f"{_article(size)} {size}% {what} on {_population_text(spec)}: not estimated yet."
    quoted = rows[rows["estimator"] == estimator]
    duration = f"{spec.n_days // 7} weeks" if spec.n_days % 7 == 0 else f"{spec.n_days} days"
    n_products = int(quoted["n_products"].max())
    clauses = []
    for row in quoted.itertuples():
        interval = f"[{_percent(row.ci_low_rel)}, {_percent(row.ci_high_rel)}]"
        if not np.isfinite(row.relative_effect):
            clauses.append((0, f"{row.metric}: no relative effect (no positive counterfactual level)"))
        elif row.relative_effect >= 0:
            clauses.append((1, f"{row.metric} by {_percent(row.relative_effect)} {interval}"))
        else:
            clauses.append((-1, f"{row.metric} by {_percent(-row.relative_effect)} {interval}"))
    text, previous = [], None
    for sign, clause in clauses:  # consecutive metrics moving the same way share a verb
        if sign == previous and sign != 0:
            text[-1] += f" and {clause}"
        else:
            verb = {1: "raised ", -1: "lowered ", 0: ""}[sign]
            text.append(verb + clause)
        previous = sign
    sentence = f"{_article(size)} {size}% {what} on {_population_text(spec)} ({n_products} products, {duration}) " + "; ".join(text)
    guards = quoted[quoted["guardrail_status"].fillna("") != ""] if "guardrail_status" in quoted.columns else quoted.iloc[:0]
    if len(guards):
        statuses = set(guards["guardrail_status"])
        if statuses == {"held"}:
            sentence += "; guardrails held"
        else:
            sentence += "; " + ", ".join(f"the {r.metric} guardrail {'was ' if r.guardrail_status == 'breached' else 'is '}"
                                         f"{r.guardrail_status}" for r in guards.itertuples())
    return sentence + f" ({estimator.upper()} estimate, 95% intervals)."


def decision_table(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a decision needs, one row per experiment, metric and estimator (with the
    simulator's truth beside each metric when `results_table` had it)."""
    wanted = ["experiment", "metric", "role", "estimator", "effect", "ci_low", "ci_high", "true_effect",
              "relative_effect", "ci_low_rel", "ci_high_rel", "true_relative", "covered_rel", "p_holm", "guardrail_status"]
    return table[[c for c in wanted if c in table.columns]]


def effect_over_time_png(over_time: pd.DataFrame, truth: pd.DataFrame | None = None) -> bytes:
    """Cumulative relative effect by day since start with its 95% band: one panel per experiment
    (rows) and metric (columns); the simulator's truth as a dashed line when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = list(dict.fromkeys(over_time["experiment"]))
    metrics = list(dict.fromkeys(over_time["metric"]))
    fig, axes = plt.subplots(len(experiments), len(metrics), figsize=(3.2 * len(metrics), 2.3 * len(experiments)),
                             squeeze=False, sharex=True)
    for i, name in enumerate(experiments):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            rows = over_time[(over_time["experiment"] == name) & (over_time["metric"] == metric)].sort_values("day")
            if rows.empty:
                ax.set_axis_off()
                continue
            ax.fill_between(rows["day"], rows["ci_low_rel"] * 100, rows["ci_high_rel"] * 100, color="#9ab8dc", alpha=0.6)
            ax.plot(rows["day"], rows["relative_effect"] * 100, "o-", color="#1f5fa8", ms=3)
            if truth is not None and {"experiment", "metric", "true_relative"} <= set(truth.columns):
                value = truth[(truth["experiment"] == name) & (truth["metric"] == metric)]["true_relative"]
                if len(value) and np.isfinite(value.iloc[0]):
                    ax.axhline(value.iloc[0] * 100, color="#c0392b", ls="--", lw=1)
            ax.axhline(0, color="grey", lw=0.7)
            ax.set_title(f"{name}: {metric}", fontsize=8)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("effect, % of counterfactual", fontsize=7)
            if i == len(experiments) - 1:
                ax.set_xlabel("days since start", fontsize=7)
    fig.suptitle("Cumulative effect by day since start (DiD, 95% band; dashed: simulator truth)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
