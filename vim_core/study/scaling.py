"""A compute-scaling curve: each series' metric against training FLOPs, fitted with a power law plus a floor.

The form, y = floor + a * (x / x_ref) ** -b, says the metric falls as a power of compute towards a floor it
cannot pass at this data and model size. It is fitted by least squares over every run (every seed at every
budget), and its uncertainty comes from a residual bootstrap: refit on the fitted curve plus resampled
residuals, many times. With five budgets and three parameters the fit is loose; the intervals say how loose.

For the first two series (A, B) the report gives:
- the measured gap A - B at each budget, with a Welch interval where both have two seeds or more;
- whether the leading arm's lead (at the smallest budget) shrinks or grows up to the largest budget, as the
  fitted change with its bootstrap interval and a verdict;
- where the fits cross, if they do between the smallest budget and 16x the largest (beyond the largest,
  an extrapolation), with the share of bootstrap fits that cross and their crossing FLOPs' interval;
- the fitted gap A - B and ratio A / B at each budget, with bootstrap intervals: where the metric spans
  decades (rFID from 100 to 1), a lead of a few points at the top budget is a large ratio, and a lead in
  points measured at the smallest budget is within that budget's noise.
"""

import math

import numpy as np

from vim_core.study.stats import summarize, welch_interval

FORM = "y = floor + a * (x / x_ref) ** -b"
BOUNDS = ([0.0, 0.0, 0.0], [np.inf, 4.0, np.inf])  # a >= 0, 0 <= b <= 4, floor >= 0
DRAWS = 1000
CROSS_SPAN = 16.0  # look for a crossing up to this multiple of the largest budget


def power_floor(x, a: float, b: float, floor: float, x_ref: float):
    return floor + a * (np.asarray(x, dtype=float) / x_ref) ** -b


def fit(x: np.ndarray, y: np.ndarray, x_ref: float) -> np.ndarray | None:
    """(a, b, floor) by bounded least squares; None when the optimiser fails."""
    from scipy.optimize import curve_fit

    floor0 = 0.5 * float(y.min())
    p0 = [max(float(y.max()) - floor0, 1e-6), 0.5, floor0]
    try:
        params, _ = curve_fit(
            lambda x, a, b, f: power_floor(x, a, b, f, x_ref), x, y, p0=p0, bounds=BOUNDS, maxfev=20000
        )
    except (RuntimeError, ValueError):
        return None
    return params


def bootstrap(x: np.ndarray, y: np.ndarray, x_ref: float, params: np.ndarray, rng, draws: int) -> np.ndarray:
    """Refits on the fitted curve plus residuals resampled with replacement (scaled for the 3 fitted
    parameters); the rows that converged."""
    fitted = power_floor(x, *params, x_ref)
    resid = (y - fitted) * math.sqrt(len(y) / max(len(y) - 3, 1))
    out = []
    for _ in range(draws):
        again = fit(x, fitted + rng.choice(resid, size=len(resid), replace=True), x_ref)
        if again is not None:
            out.append(again)
    return np.array(out).reshape(-1, 3)


def _interval(values) -> list[float] | None:
    values = np.asarray(values, dtype=float)
    return (
        None if values.size == 0 else [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    )


def crossings(grid: np.ndarray, gap: np.ndarray) -> list[float]:
    """Every x of the grid where the gap's sign differs from its sign at the previous grid point."""
    signs = np.sign(gap)
    return [float(grid[i]) for i in range(1, len(grid)) if signs[i] != signs[i - 1] and signs[i - 1] != 0]


def first_crossing(grid: np.ndarray, gap: np.ndarray) -> float | None:
    """The first x of the grid where the gap's sign differs from its sign at the grid's start."""
    sign = np.sign(gap[0])
    flipped = np.nonzero(np.sign(gap) != sign)[0] if sign != 0 else np.array([], dtype=int)
    return float(grid[flipped[0]]) if flipped.size else None


def analyse(series: dict[str, list[dict]], seed: int = 0, draws: int = DRAWS) -> dict:
    """series: name -> budgets in increasing order, each {"arm", "x": [per run], "y": [per run]}."""
    rng = np.random.default_rng(seed)
    all_x = np.array([v for pts in series.values() for p in pts for v in p["x"]], dtype=float)
    x_ref = float(np.exp(np.log(all_x).mean()))
    out: dict = {
        "form": FORM,
        "x_ref": x_ref,
        "method": f"bounded least squares over every run; 95% intervals from {draws} residual-bootstrap refits",
        "series": {},
    }
    fits, boots = {}, {}
    for name, points in series.items():
        x = np.array([v for p in points for v in p["x"]], dtype=float)
        y = np.array([v for p in points for v in p["y"]], dtype=float)
        params = fit(x, y, x_ref)
        entry: dict = {
            "points": [{**p, "x_mean": summarize(p["x"])["mean"], "y": summarize(p["y"])} for p in points]
        }
        if params is None:
            entry["fit"] = None
        else:
            fits[name] = params
            boots[name] = bootstrap(x, y, x_ref, params, rng, draws)
            rmse = float(np.sqrt(np.mean((y - power_floor(x, *params, x_ref)) ** 2)))
            entry["fit"] = {
                **dict(zip(("a", "b", "floor"), map(float, params), strict=True)),
                "rmse": rmse,
                "ci95": {k: _interval(boots[name][:, i]) for i, k in enumerate(("a", "b", "floor"))},
                "bootstrap_fits": len(boots[name]),
            }
        out["series"][name] = entry
    names = list(series)[:2]
    out["gap"] = _gap(series, names)
    if all(n in fits for n in names):
        out["trend"] = _trend(series, names, fits, boots, x_ref)
    return out


def _gap(series: dict, names: list[str]) -> list[dict]:
    """The measured difference A - B at each budget, with a Welch interval where both have 2+ runs."""
    a, b = names
    rows = []
    for pa, pb in zip(series[a], series[b], strict=True):
        w = welch_interval(list(pa["y"]), list(pb["y"]))
        rows.append({"arms": [pa["arm"], pb["arm"]], "x_mean": summarize(pa["x"] + pb["x"])["mean"], **w})
    return rows


def _trend(series: dict, names: list[str], fits: dict, boots: dict, x_ref: float) -> dict:
    a, b = names
    xs = np.array([v for p in series[a] + series[b] for v in p["x"]], dtype=float)
    x_min, x_max = float(xs.min()), float(xs.max())
    grid = np.geomspace(x_min, CROSS_SPAN * x_max, 400)

    def gaps(pa, pb, at):
        return power_floor(at, *pa, x_ref) - power_floor(at, *pb, x_ref)

    lead = np.sign(gaps(fits[a], fits[b], x_min))  # +1: B is lower at the smallest budget
    change = float(lead * (gaps(fits[a], fits[b], x_max) - gaps(fits[a], fits[b], x_min)))
    n = min(len(boots[a]), len(boots[b]))
    changes, crossings_boot = [], []
    for pa, pb in zip(boots[a][:n], boots[b][:n], strict=True):
        changes.append(lead * (gaps(pa, pb, x_max) - gaps(pa, pb, x_min)))
        crossings_boot.append(first_crossing(grid, gaps(pa, pb, grid)) if lead != 0 else None)
    budgets = [summarize(pa["x"] + pb["x"])["mean"] for pa, pb in zip(series[a], series[b], strict=True)]
    ci = _interval(changes)
    if ci is None or ci[0] <= 0 <= ci[1]:
        verdict = "not distinguishable: the change of the lead's size has an interval that includes 0"
    else:
        verdict = "the lead shrinks with compute" if ci[1] < 0 else "the lead grows with compute"
    crossed = [c for c in crossings_boot if c is not None]
    point = first_crossing(grid, gaps(fits[a], fits[b], grid)) if lead != 0 else None
    return {
        "x_min": x_min,
        "x_max": x_max,
        "leader_at_x_min": b if lead > 0 else a,
        "lead_at_x_min": float(abs(gaps(fits[a], fits[b], x_min))),
        "lead_at_x_max": float(lead * gaps(fits[a], fits[b], x_max)),
        "lead_change": change,
        "lead_change_ci95": ci,
        "verdict": verdict,
        "crossing": {
            "searched": [x_min, CROSS_SPAN * x_max],
            "fitted_at": point,
            "extrapolated": point is not None and point > x_max,
            "bootstrap_share": len(crossed) / n if n else None,
            "bootstrap_ci95": _interval(crossed),
            "all_fitted": crossings(grid, gaps(fits[a], fits[b], grid)),
        },
        "fitted_at_budgets": [_fitted_pair(fits, boots, (a, b), x, x_ref, n) for x in budgets],
    }


def _fitted_pair(fits: dict, boots: dict, names: tuple[str, str], x: float, x_ref: float, n: int) -> dict:
    """The fitted A - B and A / B at one budget, each with its 95% bootstrap interval."""
    a, b = names
    ya, yb = power_floor(x, *fits[a], x_ref), power_floor(x, *fits[b], x_ref)
    ba = np.array([power_floor(x, *p, x_ref) for p in boots[a][:n]])
    bb = np.array([power_floor(x, *p, x_ref) for p in boots[b][:n]])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ba / bb
    ratio = float(ya / yb) if yb > 0 else None
    return {
        "x": float(x),
        "gap": float(ya - yb),
        "gap_ci95": _interval(ba - bb),
        "ratio": ratio,
        "ratio_ci95": _interval(ratios[np.isfinite(ratios)]),
    }
