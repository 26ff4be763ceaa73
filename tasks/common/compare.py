"""Results grouped over seeds: the mean and a 95% confidence interval of each setting, and its paired
difference to a baseline setting, seed by seed (``ddim runs --group-by KEY... --over train.seed``).

The input is the runs table (:func:`tasks.common.tracking.compare_runs`: one row per training run and sampling
config). Only rows measured the same way are pooled: a group is one value of the ``--group-by`` keys *and* one
sampling config (sampler, steps, spacing, eta, image counts), so an FID of 500 images never averages with one
of 10,000. The interval is Student's t over the seeds, ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` (sd with
n - 1); the paired difference is the same interval over the per-seed differences to the baseline group's
run of the same seed, the honest comparison when seeds share data order and initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from tasks.common.errors import UserError

METRICS = ("final_mse", "final_loss", "fid")
SAMPLING = ("sampler", "steps", "spacing", "order", "variant", "base_step", "eta", "num_samples", "reference_count")


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy's, imported here: it is only needed for grouped tables)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def interval(values: Sequence[float]) -> tuple[int, float, float]:
    """``(n, mean, half-width of the 95% interval)`` of the finite ``values``; the half-width is NaN below two."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return 0, math.nan, math.nan
    mean = sum(finite) / n
    if n < 2:
        return n, mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return n, mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def _keys(table: pd.DataFrame, by: Sequence[str], over: str) -> list[str]:
    missing = [k for k in (*by, over) if k not in table.columns]
    if missing:
        known = ", ".join(c for c in table.columns if "." in c) or "none"
        raise UserError(
            f"no runs differ in {', '.join(missing)} (params that differ between runs: {known}): "
            "group by one of those, or train runs that differ in it"
        )
    return [*by, *(k for k in SAMPLING if k in table.columns)]


def group_runs(
    table: pd.DataFrame,
    by: Sequence[str],
    over: str = "train.seed",
    baseline: dict[str, str] | None = None,
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """One row per group: its keys, the seeds, and for each of ``metrics`` the mean, the 95% interval's
    half-width and the paired difference to ``baseline`` (``{key: value}`` of the ``by`` keys; default: the
    first group in sort order) over the seeds both groups have."""
    keys = _keys(table, by, over)
    table = table.astype({k: "string" for k in keys}).fillna({k: "" for k in keys})
    groups = {name if isinstance(name, tuple) else (name,): rows for name, rows in table.groupby(keys, sort=True)}
    for name, rows in groups.items():
        repeated = rows[over][rows[over].duplicated()].tolist()
        if repeated:
            raise UserError(f"{over}={repeated[0]} has several runs in the group {dict(zip(keys, name, strict=True))}")
    base = _baseline(groups, keys, by, baseline)
    summaries = [_summary(keys, name, rows, groups.get(base(name)), over, metrics) for name, rows in groups.items()]
    return pd.DataFrame(summaries)


def _baseline(groups: dict, keys: list[str], by: Sequence[str], baseline: dict[str, str] | None):
    """A function from a group's key to the key of its baseline group (the same sampling config)."""
    wanted = baseline or dict(zip(by, next(iter(groups), ()), strict=False))
    unknown = [k for k in wanted if k not in by]
    if unknown:
        raise UserError(f"--baseline names {', '.join(unknown)}, which is not a --group-by key")
    if groups and not any(all(dict(zip(keys, n, strict=True))[k] == str(v) for k, v in wanted.items()) for n in groups):
        raise UserError(f"no group has {', '.join(f'{k}={v}' for k, v in wanted.items())}: name an existing value")
    return lambda name: tuple(str(wanted[k]) if k in wanted else v for k, v in zip(keys, name, strict=True))


def _summary(
    keys: list[str], name: tuple, rows: pd.DataFrame, base: pd.DataFrame | None, over: str, metrics: Sequence[str]
) -> dict:
    row: dict[str, Any] = dict(zip(keys, name, strict=True))
    row["n"], row["seeds"] = len(rows), " ".join(sorted(rows[over].astype(str), key=lambda s: (len(s), s)))
    for metric in metrics:
        if metric not in rows.columns:
            continue
        _, row[f"{metric}_mean"], row[f"{metric}_ci95"] = interval(rows[metric].tolist())
        if base is not None:
            paired = rows.merge(base, on=over, suffixes=("", "_base"))
            diffs = (paired[metric].astype(float) - paired[f"{metric}_base"].astype(float)).tolist()
            _, row[f"{metric}_diff"], row[f"{metric}_diff_ci95"] = interval(diffs)
    return row


def format_groups(groups: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """The grouped table for reading: each metric as ``mean ± half-width`` (FID to 2 decimals, the rest to
    5) and its paired difference as ``diff ± half-width``; keys that are the same in every group left out."""
    keys = [c for c in groups.columns if c not in ("n", "seeds") and not c.startswith(tuple(metrics))]
    shown = [k for k in keys if groups[k].nunique() > 1] or keys[:1]
    out = groups[[*shown, "n", "seeds"]].copy()
    for metric in metrics:
        if f"{metric}_mean" not in groups:
            continue
        digits = 2 if metric in ("fid", "nfe") else 5
        out[metric] = [
            _pm(m, h, digits) for m, h in zip(groups[f"{metric}_mean"], groups[f"{metric}_ci95"], strict=True)
        ]
        if f"{metric}_diff" in groups:
            pairs = zip(groups[f"{metric}_diff"], groups[f"{metric}_diff_ci95"], strict=True)
            out[f"{metric} - baseline"] = [_pm(d, h, digits) for d, h in pairs]
    return out


def _pm(value: float, half: float, digits: int) -> str:
    if math.isnan(value):
        return ""
    return f"{value:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")
