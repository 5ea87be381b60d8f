"""The survival targets of the cohort issue on simulated cohorts (figures for the closing note).

A planted effect (HR 2.0 above MC 11, 300 cases, exponential times, 30 % censoring): is the true HR
inside the 95 % CI of the estimate at the chosen cutoff, and is the chosen cutoff within ±3 of 11?
No effect (HR 1.0), 50 seeds: how often is the corrected p-value >= 0.05, and the raw minimum Cox p?

    python tools/survival_simulation.py [--seeds 50] [--cases 300]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from edge.study.survival import DAYS_PER_YEAR, analyze_variable, censor_at, simulated_cohort


def arrays(seed: int, hr: float, cases: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, clinical = simulated_cohort(cases, hazard_ratio=hr, seed=seed)
    mc = np.array([float(r["hotspot_mc"]) for r in rows])
    t = np.array([float(c["OS.time"]) for c in clinical])
    e = np.array([int(c["OS"]) for c in clinical])
    t, e = censor_at(t, e, 10 * DAYS_PER_YEAR * 100)  # the simulation's own censoring only
    return mc, t, e


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--effect-seeds", type=int, default=10)
    args = ap.parse_args()
    hits_ci = hits_cut = 0
    for seed in range(args.effect_seeds):
        mc, t, e = arrays(1000 + seed, 2.0, args.cases)
        r = analyze_variable("mc", mc, t, e)
        b = r.best
        assert b is not None and b.ci_low is not None and b.ci_high is not None
        in_ci = b.ci_low <= 2.0 <= b.ci_high
        near = abs(b.cutoff - 11) <= 3
        hits_ci += in_ci
        hits_cut += near
        print(f"effect seed {seed}: censored {1 - e.mean():.0%}, cutoff {b.cutoff:g}, HR {b.hazard_ratio:.2f} "
              f"({b.ci_low:.2f}-{b.ci_high:.2f}) {'contains' if in_ci else 'MISSES'} 2.0, "
              f"raw p {b.cox_p:.2g}, corrected p {r.corrected_p:.2g}")
    print(f"planted HR 2.0 at MC>11: CI contains 2.0 in {hits_ci}/{args.effect_seeds}, "
          f"cutoff within ±3 in {hits_cut}/{args.effect_seeds}")
    raw_ok = corr_ok = 0
    for seed in range(args.seeds):
        mc, t, e = arrays(seed, 1.0, args.cases)
        r = analyze_variable("mc", mc, t, e)
        raw = r.best.cox_p if r.best and r.best.cox_p is not None else math.nan
        corr = r.corrected_p if r.corrected_p is not None else math.nan
        raw_ok += raw >= 0.05
        corr_ok += corr >= 0.05
    print(f"no effect, {args.seeds} seeds: corrected p >= 0.05 in {corr_ok}/{args.seeds} "
          f"({corr_ok / args.seeds:.0%}); raw minimum Cox p >= 0.05 in {raw_ok}/{args.seeds} "
          f"({raw_ok / args.seeds:.0%})")


if __name__ == "__main__":
    main()
