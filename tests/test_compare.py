"""``ddim runs --group-by``: means, 95% intervals and paired differences over seeds, on known inputs."""

from __future__ import annotations

import io
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import cli_env

from tasks.common.compare import format_groups, group_runs, interval
from tasks.common.errors import UserError

# Student's t quantiles in closed form: one degree of freedom is Cauchy's tan(pi (p - 1/2)); two are
# (2p - 1) / sqrt(2 p (1 - p)).
T1 = math.tan(math.pi * 0.475)
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def test_interval_is_students_t_over_the_values():
    assert interval([1.0, 2.0, 3.0]) == pytest.approx((3, 2.0, T2 * 1.0 / math.sqrt(3)))
    assert interval([4.0, 6.0]) == pytest.approx((2, 5.0, T1 * math.sqrt(2) / math.sqrt(2)))
    n, mean, half = interval([7.0, float("nan"), None])
    assert (n, mean) == (1, 7.0) and math.isnan(half)
    assert interval([]) == (0, pytest.approx(math.nan, nan_ok=True), pytest.approx(math.nan, nan_ok=True))


def runs(rows):
    columns = ["train.lambda_reg", "train.seed", "final_mse", "final_loss", "fid", "sampler", "num_samples"]
    return pd.DataFrame(rows, columns=columns)


TABLE = runs(
    [
        ("0", "0", 0.030, 0.030, 80.0, "ddim", 500),
        ("0", "1", 0.032, 0.032, 84.0, "ddim", 500),
        ("0", "2", 0.031, 0.031, 82.0, "ddim", 500),
        ("0.1", "0", 0.029, 0.035, 81.0, "ddim", 500),
        ("0.1", "1", 0.033, 0.039, 86.0, "ddim", 500),
        ("0.1", "2", 0.030, 0.036, 85.0, "ddim", 500),
        ("0.1", "0", 0.029, 0.035, 70.0, "ddim", 1000),  # another image count: another group
    ]
)


def test_groups_pool_seeds_of_one_setting_and_one_sampling_config():
    out = group_runs(TABLE, ["train.lambda_reg"]).set_index(["train.lambda_reg", "num_samples"])
    assert list(out.index) == [("0", "500"), ("0.1", "1000"), ("0.1", "500")]
    plain = out.loc[("0", "500")]
    assert plain["n"] == 3 and plain["seeds"] == "0 1 2"
    assert plain["fid_mean"] == pytest.approx(82.0) and plain["fid_ci95"] == pytest.approx(T2 * 2 / math.sqrt(3))
    assert plain["final_mse_mean"] == pytest.approx(0.031)
    assert plain["final_mse_ci95"] == pytest.approx(T2 * 0.001 / math.sqrt(3))


def test_the_paired_difference_is_taken_seed_by_seed_against_the_baseline():
    out = group_runs(TABLE, ["train.lambda_reg"], baseline={"train.lambda_reg": "0"})
    row = out.set_index(["train.lambda_reg", "num_samples"]).loc[("0.1", "500")]
    # per seed: 81-80, 86-84, 85-82 = 1, 2, 3
    assert row["fid_diff"] == pytest.approx(2.0) and row["fid_diff_ci95"] == pytest.approx(T2 / math.sqrt(3))
    # the unpaired intervals overlap (82 +- 5.0 and 84 +- 6.6); the paired one excludes 0
    assert row["fid_ci95"] > row["fid_diff"]
    assert row["final_loss_diff"] == pytest.approx((0.005 + 0.007 + 0.005) / 3)
    alone = out.set_index(["train.lambda_reg", "num_samples"]).loc[("0.1", "1000")]
    assert math.isnan(alone["fid_diff"]), "no baseline run at 1,000 images: no paired difference"


def test_bad_keys_and_baselines_are_one_clear_line():
    with pytest.raises(UserError, match=r"no runs differ in train\.ema_decay \(params that differ between runs: train"):
        group_runs(TABLE, ["train.ema_decay"])
    with pytest.raises(UserError, match=r"no group has train\.lambda_reg=7"):
        group_runs(TABLE, ["train.lambda_reg"], baseline={"train.lambda_reg": "7"})
    with pytest.raises(UserError, match=r"--baseline names train\.seed, which is not a --group-by key"):
        group_runs(TABLE, ["train.lambda_reg"], baseline={"train.seed": "0"})
    twice = pd.concat([TABLE, TABLE.iloc[[0]]])
    with pytest.raises(UserError, match=r"train\.seed=0 has several runs in the group"):
        group_runs(twice, ["train.lambda_reg"])


@pytest.mark.integration
def test_ddim_runs_group_by_reads_the_store_and_writes_the_intervals(tmp_path):
    """Six training runs (lambda_reg 0 and 0.1, seeds 0-2), each with an FID: ``ddim runs --group-by``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ddim")
    for lam, seed, mse, loss, fid, _, _ in TABLE.iloc[:6].itertuples(index=False, name=None):
        parent = client.create_run(experiment, tags={"stage": "train"}).info.run_id
        for key, value in (("train.lambda_reg", lam), ("train.seed", seed), ("train.lr", "0.0002")):
            client.log_param(parent, key, value)
        client.log_metric(parent, "loss", loss)
        client.log_metric(parent, "mse", mse)
        child = client.create_run(experiment, tags={"stage": "evaluate", "mlflow.parentRunId": parent}).info.run_id
        for key, value in (("sample.sampler", "ddim"), ("sample.steps", "50"), ("sample.spacing", "quad")):
            client.log_param(child, key, value)
        for key, value in (("fid", fid), ("num_samples", 500), ("reference_count", 1000), ("nfe", 49)):
            client.log_metric(child, key, value)
    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: {uri}\n")
    command = [str(Path(sys.executable).parent / "ddim"), "runs", "--csv", "-"]
    command += ["--group-by", "train.lambda_reg", "--over", "train.seed", "--baseline", "train.lambda_reg=0"]
    out = subprocess.run(command, capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(io.StringIO(out.stdout)).set_index("train.lambda_reg")
    assert table.loc[0.1, "seeds"] == "0 1 2" and table.loc[0.1, "n"] == 3
    assert table.loc[0.1, "fid_mean"] == pytest.approx(84.0)
    assert table.loc[0.1, "fid_diff"] == pytest.approx(2.0)
    assert table.loc[0.1, "fid_diff_ci95"] == pytest.approx(T2 / math.sqrt(3))
    assert table.loc[0.0, "final_mse_mean"] == pytest.approx(0.031)


def test_the_printed_table_says_mean_and_interval_in_one_cell():
    out = format_groups(group_runs(TABLE.iloc[:6], ["train.lambda_reg"]))
    assert list(out.columns)[:3] == ["train.lambda_reg", "n", "seeds"]
    row = out.set_index("train.lambda_reg").loc["0.1"]
    assert row["fid"] == f"84.00 ± {T2 * math.sqrt(7) / math.sqrt(3):.2f}"  # 81, 86, 85: sd sqrt(7)
    assert row["fid - baseline"] == f"2.00 ± {T2 / math.sqrt(3):.2f}"
    mse = [0.029, 0.033, 0.030]
    assert row["final_mse"] == f"{sum(mse) / 3:.5f} ± {T2 * statistics.stdev(mse) / math.sqrt(3):.5f}"
