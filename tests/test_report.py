"""The report compares each estimate with the effect its design identifies."""
from __future__ import annotations

import pandas as pd

from pipelines import estimation, report


def _results():
    rows = []
    for name, effect in (("by-product", 3.0), ("by-cluster", 0.1)):
        row = dict.fromkeys(estimation.RESULT_COLUMNS)
        row.update(experiment=name, design="time_bound", estimator="did", effect=effect, se=0.3,
                   ci_low=effect - 0.6, ci_high=effect + 0.6, n_products=10, n_trimmed=0)
        rows.append(row)
    return pd.DataFrame(rows)


def test_cluster_designs_are_judged_against_the_global_effect():
    truth = pd.DataFrame(
        {"experiment": ["by-product", "by-cluster"], "true_direct_effect": [3.1, 3.0], "true_global_effect": [0.2, 0.2]}
    )
    experiments = pd.DataFrame({"name": ["by-product", "by-cluster"], "unit": ["product", "cluster"]})
    table = report.results_table(_results(), truth, experiments).set_index("experiment")
    assert table.loc["by-product", "estimand"] == "direct" and table.loc["by-product", "true_effect"] == 3.1
    assert table.loc["by-cluster", "estimand"] == "global" and table.loc["by-cluster", "true_effect"] == 0.2
    assert table["covered"].all()
    assert "true_spillover" not in table  # the truth given has no spillover
    results = _results().assign(spillover_effect=[-1.0, None], spillover_se=[0.4, None])
    spill = report.results_table(results, truth.assign(true_spillover_effect=[-1.2, -0.1]), experiments)
    spill = spill.set_index("experiment")["true_spillover"]
    assert spill["by-product"] == -1.2 and pd.isna(spill["by-cluster"])  # shown only beside an estimate
    # judged against the direct effect, the cluster design's interval would miss
    assert not report.results_table(_results(), truth).set_index("experiment").loc["by-cluster", "covered"]


def test_report_markdown_lists_unestimated_experiments_and_exposure():
    table = report.results_table(_results())
    exposure = pd.DataFrame({"experiment": ["by-product"] * 2, "condition": ["control_exposed", "treated"], "products": [4, 5]})
    text = report.report_markdown(table, {"late": "no sales yet"}, "2026-02-15", exposure)
    assert "`late`: no sales yet" in text and "control_exposed" in text and "| by-cluster" in text
    assert "understates spillover the graph cannot see" in text  # the reader is told what it cannot see
    assert "needs no graph" in text  # and which estimate does not depend on it
    assert report.effects_png(table)[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_names_the_counterfactual_and_flags_carryover():
    results = _results().assign(design=["random_days", "time_bound"], counterfactual=["level_4w (10)", "trend+seasonality (10)"],
                                variance_reduction=[0.1, 0.3], carryover_estimate=[0.8, float("nan")],
                                carryover_se=[0.2, float("nan")], carryover_flag=[True, False], carryover_bias=[-0.4, float("nan")])
    table = report.results_table(results)
    assert {"counterfactual", "variance_reduction", "carryover_flag"} <= set(table.columns)
    text = report.report_markdown(table, {}, "2026-02-15")
    assert "## Carryover" in text and "`by-product` (random_days)" in text and "-0.400" in text
    assert "by-cluster` (" not in text.split("## Carryover")[1]  # not flagged, not listed
    quiet = results.assign(carryover_flag=[False, False], carryover_detectable=[0.55, float("nan")])
    text = report.report_markdown(report.results_table(quiet), {}, "2026-02-15")
    carry = text.split("## Carryover")[1]
    assert "`by-product` (random_days): no carryover flagged" in carry and "0.550" in carry  # what it could miss
    assert "by-cluster` (" not in carry


def test_report_says_what_the_graph_could_see():
    from pipelines import graph

    blocks = graph.block_evidence(pd.DataFrame({
        "block": ["a", "b"], "pooled_z": [0.5, 0.2], "pooled_z_per_elasticity": [3.0, 3.0],
        "z_all": [10.0, 5.0], "z_edges": [0.0, 0.0],
    })).assign(products=25, pairs_tested=300, edges=0, edges_by_shrinkage=0, pair_detectable_elasticity=1.2)
    power = graph.power_summary(blocks)
    assert power["edges"] == 0 and power["median_pair_detectable_elasticity"] == 1.2
    assert any("cluster randomisation equals product randomisation" in w for w in power["warnings"])
    text = report.report_markdown(report.results_table(_results()), {}, "2026-02-15", graph_power=power)
    assert "What the substitution graph could see" in text and "1.20" in text and "**Warning:**" in text
