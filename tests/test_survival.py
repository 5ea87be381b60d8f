"""`cohort survival`: the table (case ids, slides per case, censoring, what is left out), the statistics
against lifelines directly, the corrected p-value under no effect, and the report with its plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.errors import ConfigError
from edge.study.survival import (
    DAYS_PER_YEAR,
    aggregate,
    analyze_variable,
    build_table,
    cutoff_result,
    lausen_schumacher_p,
    parse_cutoffs,
    read_clinical,
    simulated_cohort,
)

lifelines = pytest.importorskip("lifelines", reason='lifelines is not installed: pip install "mitosis-edge[cohort]"')


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _arrays(seed: int, hr: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, clinical = simulated_cohort(n, hazard_ratio=hr, seed=seed)
    return (np.array([float(r["hotspot_mc"]) for r in rows]), np.array([float(c["OS.time"]) for c in clinical]),
            np.array([int(c["OS"]) for c in clinical]))


def test_several_slides_of_a_case_are_aggregated_worst_first_by_default() -> None:
    rows = [
        {"slide_path": f"/a/{case}-01Z-00-{dx}.svs", "case_id": case, "status": "done", "hotspot_mc": mc}
        for case, dx, mc in (("TCGA-AA-0001", "DX1", "4"), ("TCGA-AA-0001", "DX2", "9"), ("TCGA-AA-0002", "DX1", "2"))
    ]
    clinical = {"TCGA-AA-0001": (100.0, 1), "TCGA-AA-0002": (200.0, 0)}
    assert build_table(rows, clinical).values["mc"].tolist() == [9.0, 2.0]
    assert build_table(rows, clinical, per_case="mean").values["mc"].tolist() == [6.5, 2.0]
    assert build_table(rows, clinical, per_case="first").values["mc"].tolist() == [4.0, 2.0]
    assert build_table(rows, clinical).slides_per_case == {"TCGA-AA-0001": 2, "TCGA-AA-0002": 1}
    assert math.isnan(aggregate([math.nan], "max"))


def test_failed_slides_and_cases_without_clinical_data_are_listed_not_dropped() -> None:
    rows = [
        {"slide_path": "/a/x.svs", "case_id": "x", "status": "failed", "error": "CorruptSlideError: damaged"},
        {"slide_path": "/a/y.svs", "case_id": "y", "status": "done", "hotspot_mc": "3"},
        {"slide_path": "/a/z.svs", "case_id": "z", "status": "done", "hotspot_mc": "5"},
    ]
    table = build_table(rows, {"z": (10.0, 1), "w": (20.0, 0)})
    assert table.case_ids == ["z"]
    assert table.unmatched["failed slides"] == ["/a/x.svs: CorruptSlideError: damaged"]
    assert table.unmatched["slides without clinical data"] == ["/a/y.svs (case y)"]
    assert table.unmatched["clinical cases without a slide"] == ["w"]


def test_follow_up_beyond_the_horizon_is_censored_there() -> None:
    rows = [{"slide_path": "a", "case_id": "a", "status": "done", "hotspot_mc": "1"}]
    table = build_table(rows, {"a": (20 * DAYS_PER_YEAR, 1)}, horizon_days=10 * DAYS_PER_YEAR)
    assert (table.time_days[0], table.event[0]) == (10 * DAYS_PER_YEAR, 0)


def test_tcga_cdr_columns_work_as_they_are_and_others_are_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "cdr.csv", [
        {"bcr_patient_barcode": "TCGA-AA-0001", "OS": "1", "OS.time": "300", "PFI": "0", "PFI.time": "400"},
        {"bcr_patient_barcode": "TCGA-AA-0002", "OS": "#N/A", "OS.time": "", "PFI": "1", "PFI.time": "50"},
    ])
    table, unusable = read_clinical(path)
    assert table == {"TCGA-AA-0001": (300.0, 1)} and "TCGA-AA-0002" in unusable[0]
    assert read_clinical(path, endpoint="PFI")[0] == {"TCGA-AA-0001": (400.0, 0), "TCGA-AA-0002": (50.0, 1)}
    with pytest.raises(ConfigError, match=r"no column\(s\) \['patient'\].*--id-col"):
        read_clinical(path, id_col="patient")


def test_the_statistics_at_a_cutoff_are_lifelines_own() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.statistics import logrank_test

    x, t, e = _arrays(seed=3, hr=2.0, n=150)
    got = cutoff_result(x, t, e, 11)
    high = x > 11
    cph = CoxPHFitter().fit(pd.DataFrame({"T": t, "E": e, "high": high.astype(float)}), "T", "E")
    row = cph.summary.loc["high"]
    lr = logrank_test(t[high], t[~high], e[high], e[~high])
    assert got.hazard_ratio == pytest.approx(row["exp(coef)"])
    assert (got.ci_low, got.ci_high) == (pytest.approx(row["exp(coef) lower 95%"]),
                                         pytest.approx(row["exp(coef) upper 95%"]))
    assert got.cox_p == pytest.approx(row["p"])
    assert got.logrank_p == pytest.approx(lr.p_value)
    assert (got.n_low, got.n_high, got.events_low + got.events_high) == (int((~high).sum()), int(high.sum()), e.sum())


def test_the_cutoff_search_finds_a_planted_effect_near_its_cutoff() -> None:
    x, t, e = _arrays(seed=1004, hr=2.0, n=300)
    r = analyze_variable("mc", x, t, e, prespecified=[11])
    assert r.best is not None and abs(r.best.cutoff - 11) <= 3
    assert r.best.ci_low is not None and r.best.ci_high is not None and r.best.ci_low <= 2.0 <= r.best.ci_high
    assert r.corrected_p is not None and r.corrected_p < 0.01
    assert r.prespecified[0].cutoff == 11 and r.continuous["hazard_ratio_per_unit"] is not None
    assert min(r.best.n_low, r.best.n_high) >= 30  # 10 % of 300


def test_without_an_effect_the_corrected_p_value_stays_large_while_the_raw_minimum_does_not() -> None:
    raw, corrected = [], []
    for seed in range(6):
        x, t, e = _arrays(seed=seed, hr=1.0, n=150)
        r = analyze_variable("mc", x, t, e)
        assert r.best is not None and r.corrected_p is not None and r.best.cox_p is not None
        assert r.corrected_p >= r.best.cox_p  # the correction never makes a p-value smaller
        raw.append(r.best.cox_p)
        corrected.append(r.corrected_p)
    assert sum(p >= 0.05 for p in corrected) >= 5
    assert min(raw) < 0.05  # choosing the best cutoff finds "significance" in noise


def test_lausen_schumacher_matches_r_maxstat() -> None:
    # R: sapply(c(0.5, 2, 2.5, 3.5), maxstat::pLausen92, minprop = 0.1, maxprop = 0.9)
    # (the reference values in ranger's maxstat tests, taken from R)
    expected = [1.0, 0.463872768757117, 0.189802453892004, 0.0133240079314344]
    got = [lausen_schumacher_p(b, 0.1, 0.9) for b in (0.5, 2.0, 2.5, 3.5)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_cutoffs_on_the_command_line_are_checked() -> None:
    assert parse_cutoffs(["mc=11", "slide_ratio=0.11"]) == {"mc": [11.0], "slide_ratio": [0.11]}
    with pytest.raises(ConfigError, match="VARIABLE one of mc, hotspot_ratio"):
        parse_cutoffs(["grade=2"])


@pytest.mark.slow
def test_cohort_survival_writes_the_report_plots_and_every_number(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rows, clinical = simulated_cohort(120, hazard_ratio=2.5, seed=7)
    rows.append({**rows[0], "slide_id": "bad", "slide_path": "/archive/bad.svs", "case_id": "TCGA-XX-0000",
                 "status": "failed", "error": "CorruptSlideError: damaged", "hotspot_mc": ""})
    (tmp_path / "run").mkdir()
    _write(tmp_path / "run" / "slides.csv", rows)
    _write(tmp_path / "cdr.csv", clinical[:-2])
    out = tmp_path / "report"
    code = main(["cohort", "survival", "--results", str(tmp_path / "run"), "--clinical", str(tmp_path / "cdr.csv"),
                 "--out", str(out), "--cutoff", "slide_ratio=0.11"])
    assert code == 0
    text = capsys.readouterr().out
    assert "corrected p" in text and "slides without clinical data: 2" in text
    data = json.loads((out / "survival.json").read_text())
    assert data["cases"] == 118
    assert data["unmatched"]["failed slides"] == ["/archive/bad.svs: CorruptSlideError: damaged"]
    mc = next(v for v in data["variables"] if v["key"] == "mc")
    assert [c["cutoff"] for c in mc["prespecified"]] == [7.0, 14.0]  # the mitotic-score cutoffs at 2 mm²
    ratio = next(v for v in data["variables"] if v["key"] == "slide_ratio")
    assert [c["cutoff"] for c in ratio["prespecified"]] == [0.11]  # as given
    assert "Lausen & Schumacher" in mc["corrected_p_method"]
    for name in ("km_mc.png", "km_mc.svg", "report.md", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "km_mc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "km_mc.png" in (out / "report.html").read_text()


def test_survival_refuses_a_results_folder_without_slides_csv(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "cdr.csv", [{"bcr_patient_barcode": "a", "OS": "1", "OS.time": "3"}])
    assert main(["cohort", "survival", "--results", str(tmp_path), "--clinical", str(tmp_path / "cdr.csv"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "has no slides.csv; give the --out folder of a cohort run" in capsys.readouterr().err
