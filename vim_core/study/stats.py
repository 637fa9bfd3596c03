"""Study statistics: per-arm mean and sd over seeds, and a 95% Welch interval and verdict per arm pair.

Seeds are the unit of replication: each (arm, seed) run gives one value per metric, and a difference
between arms counts only when its confidence interval excludes zero. Whether two seed ranges overlap is
not a test (with 2 seeds per arm, ranges of one distribution fail to overlap one time in three).
"""

import math

METHOD = "Welch's t interval (unequal variances, Welch-Satterthwaite df), 95%, over seeds"
LEVEL = 0.95


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; None for one seed) and the values themselves."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n, "values": values}


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df (possibly fractional) degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def welch_interval(a: list[float], b: list[float], level: float = LEVEL) -> dict:
    """The difference mean(a) - mean(b) with its Welch t interval; ci None when an arm has one seed.

    When both arms have zero spread the standard error is 0, and the interval is the difference itself
    (df is then undefined: None).
    """
    sa, sb = summarize(a), summarize(b)
    diff = sa["mean"] - sb["mean"]
    out = {"diff": diff, "ci": None, "df": None, "se": None, "n_a": sa["n"], "n_b": sb["n"]}
    if sa["n"] < 2 or sb["n"] < 2:
        return out
    va, vb = sa["sd"] ** 2 / sa["n"], sb["sd"] ** 2 / sb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return {**out, "ci": [diff, diff], "se": 0.0}
    df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return {**out, "ci": [diff - half, diff + half], "df": df, "se": se}


def verdict(a: str, b: str, interval: dict, better: str | None) -> str | None:
    """ "<a> better", "<b> better" or "not distinguishable at n seeds"; None for a metric with no direction."""
    if better is None:
        return None
    ci = interval["ci"]
    if ci is None or ci[0] <= 0 <= ci[1]:
        n_a, n_b = interval["n_a"], interval["n_b"]
        seeds = f"{n_a}" if n_a == n_b else f"{n_a} ({a}) and {n_b} ({b})"
        return f"not distinguishable at {seeds} seeds"
    a_higher = ci[0] > 0
    return f"{a} better" if a_higher == (better == "higher") else f"{b} better"


def pairs(compare: list[str]) -> list[tuple[str, str]]:
    """The arm pairs a study compares: the two named, or the first named against each of the others."""
    if len(compare) < 2:
        return []
    return [(compare[0], other) for other in compare[1:]]


def compare_arms(a: str, b: str, values_a: dict, values_b: dict, directions: dict) -> dict:
    """metric key -> difference, CI and verdict, for every metric both arms have.

    values_*: metric key -> per-seed values; directions: metric key -> "lower" | "higher" | None.
    """
    out = {}
    for key, better in directions.items():
        if key not in values_a or key not in values_b:
            continue
        interval = welch_interval(values_a[key], values_b[key])
        out[key] = {
            "diff": interval["diff"],
            "ci95": interval["ci"],
            "ci_note": None if interval["ci"] is not None else "n/a (1 seed)",
            "df": interval["df"],
            "n_a": interval["n_a"],
            "n_b": interval["n_b"],
            "better": better,
            "verdict": verdict(a, b, interval, better),
        }
    return out
