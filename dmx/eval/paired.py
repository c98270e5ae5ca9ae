"""How sure a perplexity is, and whether two runs differ beyond the evaluation's noise.

A perplexity measured on N windows of a text is a sample: other windows of the same kind of
text would give another number. The unit of sampling is the window (the GPTQ protocol's
non-overlapping chunks, every window scoring the same number of tokens), so:

* ``nll_summary(window_nll, tokens_per_window)``: the mean NLL and perplexity of the
  windows, the standard error of the mean NLL over windows, and a 95 % interval of the
  perplexity (Student t over windows, mapped through exp). Consecutive windows of one text
  are alike (a run's window NLLs had lag-1 autocorrelation 0.1-0.3 on SmolLM2-135M), so
  this standard error is Newey-West's (:func:`newey_west_se`, :func:`newey_west_lags` lags):
  1.1-1.3x the independent-windows one there.
* ``paired(a, b)``: two runs scored on the *same* windows. Their per-window NLLs are
  strongly correlated (a hard window is hard for both), so the difference is judged window
  by window: the mean of ``b_i - a_i`` with its standard error. Reported as the perplexity
  difference ``ppl(b) - ppl(a)`` with a 95 % interval (A's perplexity held fixed:
  ``ppl(a) * (exp(d +- t * se) - 1)``) and a verdict: "lower" / "higher" when the interval
  excludes 0, else "tie". This is much tighter than comparing two unpaired intervals.

What it does not cover: seeds. A search's result also varies with its seed; the spread over
seeds is a separate number (benchmarks report both). The paired differences are treated as
independent: two runs' per-window differences were not measurably autocorrelated
(benchmarks/bench_window_independence.py: lag-1 +0.01, a Newey-West standard error
0.98-1.01x the plain one on average over 78 SmolLM2-135M pairs), so the plain standard
error is kept there.
"""
from __future__ import annotations

import math
from statistics import NormalDist

from dmx.errors import DMXError

__all__ = ["nll_summary", "paired", "t_quantile", "paired_line", "paired_cell",
           "newey_west_se", "newey_west_lags", "difference_interval"]


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher
    expansion about the normal quantile, Abramowitz & Stegun 26.7.5: within 0.2 % of the
    exact value for df >= 3, exact in the limit; df 1 and 2 in closed form)."""
    if df < 1:
        raise ValueError("t_quantile needs df >= 1")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        a = 4 * p * (1 - p)
        return (2 * p - 1) * math.sqrt(2 / a)
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def newey_west_lags(n: int) -> int:
    """Newey and West's (1994) rule of thumb, floor(4 (n / 100)^(2/9)) lags for n values
    (3 for 40 windows, 7 for 1,550), at most n - 2."""
    return max(0, min(n - 2, int(4 * (n / 100) ** (2 / 9))))


def newey_west_se(values, lags: int) -> float:
    """The standard error of the mean of ``values`` (at least 2) allowing autocorrelation
    up to ``lags`` (Bartlett weights 1 - k / (lags + 1), so never negative), times the
    small-sample factor sqrt(n / (n - 1)): ``lags`` 0 is the usual (ddof 1) one."""
    n = len(values)
    mean = math.fsum(values) / n
    c = [v - mean for v in values]
    s = math.fsum(x * x for x in c) / n
    for k in range(1, lags + 1):
        s += 2 * (1 - k / (lags + 1)) * math.fsum(c[i] * c[i - k] for i in range(k, n)) / n
    return math.sqrt(max(s, 0.0) / (n - 1))


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def nll_summary(window_nll, tokens_per_window: int) -> dict:
    """{"ppl", "nll", "scored", "nll_se", "nll_se_lags", "ppl_ci95"} of windows that each
    score ``tokens_per_window`` tokens, in text order (``nll_se``/``ppl_ci95`` None for a
    single window). ``nll_se`` is Newey-West's with ``nll_se_lags`` lags (consecutive
    windows are alike)."""
    n = len(window_nll)
    if not n:
        raise DMXError("no windows to score")
    mean = math.fsum(window_nll) / n
    lags = newey_west_lags(n)
    se = newey_west_se(window_nll, lags) if n > 1 else None
    out = {"ppl": _exp(mean), "nll": mean, "scored": n * tokens_per_window,
           "nll_se": se, "nll_se_lags": lags if n > 1 else None, "ppl_ci95": None}
    if se is not None:
        t = t_quantile(0.975, len(window_nll) - 1)
        out["ppl_ci95"] = [_exp(mean - t * se), _exp(mean + t * se)]
    return out


def paired(a, b) -> dict:
    """``b`` against ``a``, window by window (two lists of per-window mean NLLs on the same
    windows): {"windows", "delta_nll", "delta_nll_se", "ppl_a", "ppl_b", "delta_ppl",
    "delta_ppl_ci95", "verdict"} with verdict "lower" (b better), "higher" or "tie"."""
    if len(a) != len(b):
        raise DMXError(f"the two runs were scored on different windows ({len(a)} vs "
                       f"{len(b)}); score both with the same --data, --seqlen and "
                       "--max-windows")
    if len(a) < 2:
        raise DMXError("a paired comparison needs at least 2 windows; score more "
                       "(--max-windows)")
    d = [y - x for x, y in zip(a, b)]
    mean_d, se = math.fsum(d) / len(d), newey_west_se(d, 0)  # independent differences
    ppl_a, ppl_b = _exp(math.fsum(a) / len(a)), _exp(math.fsum(b) / len(b))
    (lo, hi), verdict = difference_interval(ppl_a, mean_d, se, len(d))
    return {"windows": len(d), "delta_nll": mean_d, "delta_nll_se": se, "ppl_a": ppl_a,
            "ppl_b": ppl_b, "delta_ppl": ppl_b - ppl_a, "delta_ppl_ci95": [lo, hi],
            "verdict": verdict}


def difference_interval(ppl_a: float, mean_d: float, se: float, windows: int):
    """((lo, hi), verdict): the 95 % interval of ``ppl(b) - ppl(a)`` for a mean per-window
    NLL difference ``mean_d`` with standard error ``se`` over ``windows`` windows (Student
    t, A's perplexity held fixed), and "lower" / "higher" when it excludes 0, else "tie"."""
    t = t_quantile(0.975, windows - 1)
    lo, hi = ppl_a * math.expm1(mean_d - t * se), ppl_a * math.expm1(mean_d + t * se)
    return (lo, hi), "lower" if hi < 0 else "higher" if lo > 0 else "tie"


def paired_cell(p: dict) -> str:
    """The table form, e.g. "+0.43 (-0.12..+0.98) tie"."""
    lo, hi = p["delta_ppl_ci95"]
    return f"{p['delta_ppl']:+.2f} ({lo:+.2f}..{hi:+.2f}) {p['verdict']}"


def paired_line(p: dict) -> str:
    """e.g. "+0.43 ppl (95 % CI -0.12..+0.98 over 40 windows): tie"."""
    lo, hi = p["delta_ppl_ci95"]
    return (f"{p['delta_ppl']:+.2f} ppl (95 % CI {lo:+.2f}..{hi:+.2f} over {p['windows']} "
            f"windows): {p['verdict']}")
