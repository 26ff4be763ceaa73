"""The design document's two claims, measured on the demo: an ablation over seeds. Tables + JSON.

    python benchmarks/claims.py                   # the study (make claims): 3 settings x 5 seeds, then the tables
    python benchmarks/claims.py --report          # only the tables, from what --out already holds
    python benchmarks/claims.py --size tiny --out DIR --seeds 2   # the micro study the test suite runs

Settings, each trained with the demo profile (profiles/demo.yaml: 2,000 shapes at 16 px, the 1.1M-parameter
U-Net, 1,500 steps at batch 32: the same data order, steps and images for every setting) and seeds 0..N-1
(``train.seed``: initial weights, data order and noise):

- ``plain``: ``train.lambda_reg: 0``, DDPM's loss;
- ``scaled``: ``lambda_reg: 0.1``, ``complexity_mode: scaled`` (this project's normalisation, mean 1 per image);
- ``design``: ``lambda_reg: 0.1``, ``complexity_mode: design`` (the document's normalisation, by the whole
  batch's L2 norm: a term near zero).

Each trained model (its EMA weights, as ``model.pt`` holds them) is then measured:

- ``heldout_mse``: the plain noise-prediction error ``|eps_theta(x_t, t) - eps|^2`` on 2,000 shapes the training
  never saw (``data.seed`` 1), each with one fixed t and noise: the same 2,000 triples for every model;
- ``final_mse`` / ``final_loss``: the last logging window of the training run (its MSE, and the loss it minimised);
- the FID of 500 images against the demo's 1,000-image reference (biased at this count: compare only here) for
  ``ddim-50`` (the demo's sampler: DDIM, 50 quad steps, eta 1), for the design's adaptive sampler at each
  ``--adaptive`` base step size (eta 1, min_step 5, max_step 100), and for DDIM at the adaptive sampler's
  mean NFE on that model (``ddim-matched-B``: the quad step count whose NFE is nearest), and for each ODE
  solver of ``--solvers`` (the sweep's names: ``dpm-solver++-order2``, ...) at 20 quad steps.

Tables: per setting, mean and 95% t-interval over seeds, and the paired difference to ``plain`` seed by seed
(``tasks.common.compare``: what ``ddim runs --group-by`` prints); and per adaptive budget, the adaptive sampler's
FID minus DDIM's at equal mean NFE, paired model by model (all settings' models).

Every result is a file under ``--out`` (default ``results/claims``; one folder per run, written atomically), so
an interrupted study resumes where it stopped and a new ``--adaptive`` value adds only its cells. Runs go to
``--jobs`` worker processes (each with its share of the cores), tracking off: no MLflow, no Prefect. On 2 cores
one run at a time is the faster choice: a 2-thread run trained at 237 images/s, two 1-thread runs at 62 each (with
a third process busy beside them; AMD EPYC, the demo model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.diffusion import ddim_timesteps, q_sample  # noqa: E402
from tasks.common.compare import format_groups, group_runs, interval  # noqa: E402
from tasks.common.config import Params, apply_overrides, profile_params, validate_params  # noqa: E402
from tasks.common.files import markdown_table, write_json  # noqa: E402
from tasks.common.grid import solver_cell_name, solver_settings  # noqa: E402

SETTINGS = {
    "plain": {"lambda_reg": 0.0, "complexity_mode": "scaled"},
    "scaled": {"lambda_reg": 0.1, "complexity_mode": "scaled"},
    "design": {"lambda_reg": 0.1, "complexity_mode": "design"},
}
SOLVER_STEPS = 20  # each --solvers cell: NFE 20 (quad keeps every timestep at 20 steps)
HELDOUT_DATA_SEED = 1  # the held-out shapes: the demo trains on data.seed 0
HELDOUT_DRAW_SEED = 0  # their t and noise
LOSS_METRICS = ("heldout_mse", "final_mse", "final_loss", "fid")


@dataclasses.dataclass(frozen=True)
class Size:
    overrides: tuple[str, ...]  # on top of the demo profile
    heldout: int  # held-out images for heldout_mse


TINY = (
    "data.count=32",
    "model.ch_mult=[1, 2]",
    "model.attn_resolutions=[8]",
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup=1",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "sample.num_samples=8",
    "sample.batch_size=8",
    "sample.steps=5",
    "sample.min_step=100",
    "sample.max_step=200",
    "evaluate.reference_count=32",
    "evaluate.batch_size=16",
)
SIZES = {"demo": Size((), 2000), "tiny": Size(TINY, 16)}


def run_name(setting: str, seed: int) -> str:
    return f"{setting}-seed{seed}"


def study_params(out: Path, size: Size, setting: str, seed: int) -> Params:
    """The demo profile for one run: its setting and seed, the shared data and reference under ``out/shared``,
    its own train and checkpoint folders under ``out/runs/<setting>-seed<seed>``, tracking off."""
    shared, own = out / "shared", out / "runs" / run_name(setting, seed)
    raw = profile_params("demo", ROOT / "profiles").model_dump(mode="json")
    paths = {key: shared / key for key in ("raw", "prepared", "reference")}
    paths |= {key: own / key for key in ("train", "checkpoints", "samples", "sweep", "latent")}
    overrides = [f"paths.{key}={path}" for key, path in paths.items()] + [f"paths.metrics={own / 'metrics.json'}"]
    overrides += [f"train.{key}={value}" for key, value in SETTINGS[setting].items()]
    overrides += [f"train.seed={seed}", "train.sample_every=0", "tracking.enabled=false", *size.overrides]
    return validate_params(apply_overrides(raw, overrides), "claims params")


def prepare_shared(params: Params) -> None:
    """The demo's dataset and its reference statistics, once for every run."""
    from tasks import prepare, reference
    from tasks.common.fid import reference_path

    if not reference_path(params).is_file():
        prepare.run(params)
        reference.run(params)


def heldout_mse(params: Params, count: int) -> float:
    """The EMA model's plain noise-prediction MSE on ``count`` held-out shapes, one fixed (t, noise) each."""
    from tasks.common.images import from_uint8
    from tasks.common.inference import load_for_sampling
    from tasks.prepare import shape_image

    model, alphas_cumprod = load_for_sampling(params, torch.device("cpu"))
    size = params.data.image_size
    x0 = from_uint8(np.stack([shape_image(size, HELDOUT_DATA_SEED, i) for i in range(count)]))
    generator = torch.Generator().manual_seed(HELDOUT_DRAW_SEED)
    t = torch.randint(0, alphas_cumprod.shape[0], (count,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    errors = []
    with torch.inference_mode():
        for i in range(0, count, 250):
            eps = model(x_t[i : i + 250], t[i : i + 250]).float()
            errors.append((eps - noise[i : i + 250]).pow(2).mean(dim=(1, 2, 3)))
    return float(torch.cat(errors).mean())


def matched_steps(nfe: float, num_train_steps: int, spacing: str) -> int:
    """The DDIM step count whose number of model evaluations (quad spacing drops repeated timesteps) is
    nearest ``nfe``; the smaller count on a tie."""
    counts = range(1, min(num_train_steps, int(2 * nfe) + 2) + 1)
    return min(counts, key=lambda s: (abs(len(ddim_timesteps(num_train_steps, s, spacing)) - nfe), s))


def score_cell(params: Params, update: dict[str, Any]) -> dict[str, Any]:
    """FID and mean NFE of ``sample.num_samples`` images of the sample section with ``update`` on top."""
    from tasks.common.devices import pick_device
    from tasks.common.distributed import Ranks
    from tasks.common.fid import frechet_distance, load_stats, reference_path
    from tasks.common.scoring import sample_and_score

    cfg = params.sample.model_copy(update=update)
    mu_ref, sigma_ref, ref_count = load_stats(reference_path(params))
    start = time.perf_counter()
    stats, nfe = sample_and_score(params, cfg, Ranks(0, 0, 1), pick_device(cfg.device, 0), None)
    mu, sigma = stats.mean_and_covariance()
    settings = cfg.settings()  # the sampler's own settings; None where one does not apply to it
    return {
        "sampler": cfg.sampler,
        "steps": settings["steps"],
        "base_step": settings["base_step_size"],
        **{key: settings[key] for key in ("eta", "spacing", "order", "variant")},
        "nfe": nfe / stats.count,
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "num_samples": stats.count,
        "reference_count": ref_count,
        "seconds": round(time.perf_counter() - start, 1),
    }


def cached(path: Path, compute) -> dict[str, Any]:
    """``path``'s JSON where a finished earlier run wrote it, else ``compute()``, written atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(result, path)
    return result


def train_once(params: Params) -> dict[str, Any]:
    """Train (or resume) the run; its seconds, the step it started from and the last logging window's metrics."""
    from tasks import train

    start = time.perf_counter()
    resumed_from = train.run(params).get("resumed_from", 0)
    final = json.loads((Path(params.paths.train) / "train_metrics.json").read_text())
    return {**final, "seconds": round(time.perf_counter() - start, 1), "resumed_from": resumed_from}


def run_one(out: Path, size: Size, setting: str, seed: int, adaptive: list[float], solvers: list[str]) -> None:
    """Everything one (setting, seed) run measures; each part skipped where its file is already there."""
    params = study_params(out, size, setting, seed)
    folder = out / "runs" / run_name(setting, seed)
    cached(folder / "train.json", lambda: train_once(params))
    cached(folder / "heldout.json", lambda: {"heldout_mse": heldout_mse(params, size.heldout)})
    cells = folder / "cells"
    cached(cells / f"ddim-{params.sample.steps}.json", lambda: score_cell(params, {"sampler": "ddim"}))
    for base in adaptive:
        update = {"sampler": "adaptive", "base_step_size": base}
        nfe = cached(cells / f"adaptive-{base:g}.json", lambda u=update: score_cell(params, u))["nfe"]
        steps = matched_steps(nfe, params.diffusion.num_train_steps, params.sample.spacing)
        update = {"sampler": "ddim", "steps": steps}
        cached(cells / f"ddim-matched-{base:g}.json", lambda u=update: score_cell(params, u))
    for solver in solvers:  # deterministic: eta does not apply
        update = {**solver_settings(solver), "steps": SOLVER_STEPS}
        cached(cells / f"{solver_cell_name(solver, SOLVER_STEPS)}.json", lambda u=update: score_cell(params, u))


def worker_command(args: argparse.Namespace, setting: str, seed: int) -> list[str]:
    adaptive = [f"{b:g}" for b in args.adaptive]
    run = ["--worker", setting, str(seed), "--out", str(args.out), "--size", args.size]
    return [sys.executable, str(Path(__file__).resolve()), *run, "--adaptive", *adaptive, "--solvers", *args.solvers]


def die_with_parent() -> None:
    """In a worker, before it runs: the kernel sends it SIGTERM when the driver dies, even of SIGKILL (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(args: argparse.Namespace, setting: str, seed: int, env: dict[str, str]) -> subprocess.Popen:
    """One worker process for the run, its output appended to the run folder's log.txt."""
    folder = args.out / "runs" / run_name(setting, seed)
    folder.mkdir(parents=True, exist_ok=True)
    preexec = die_with_parent if sys.platform.startswith("linux") else None
    with (folder / "log.txt").open("a") as log:
        command = worker_command(args, setting, seed)
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, preexec_fn=preexec)
    print(f"[claims: {folder.name} started]", file=sys.stderr, flush=True)
    return proc


def finished(running: dict[str, subprocess.Popen], out: Path) -> None:
    """Forget the workers that ended; raise if one failed."""
    for name, proc in list(running.items()):
        if proc.poll() is None:
            continue
        del running[name]
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}): see {out / 'runs' / name / 'log.txt'}")
        print(f"[claims: {name} done]", file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace, runs: list[tuple[str, int]]) -> None:
    """The runs in ``args.jobs`` worker processes at a time, each with its share of the cores; the first
    failure stops the study and is raised. No worker outlives this call."""
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    pending, running = list(runs), {}
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                setting, seed = pending.pop(0)
                running[run_name(setting, seed)] = launch(args, setting, seed, env)
            time.sleep(1.0)
            finished(running, args.out)
    finally:
        stop(list(running.values()))


def stop(procs: list[subprocess.Popen]) -> None:
    """End the workers: SIGTERM (training writes a checkpoint), SIGKILL after 60 s; a second signal to the
    driver meanwhile is ignored, so none is left behind."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def incomplete(out: Path) -> list[str]:
    """The runs under ``out`` that have not got as far as their first FID."""
    folders = sorted((out / "runs").glob("*-seed*"))
    return [f.name for f in folders if not (f / "heldout.json").is_file() or not any((f / "cells").glob("*.json"))]


def collect(out: Path) -> pd.DataFrame:
    """One row per (finished run, cell): the run's setting, seed and training measurements beside the cell's."""
    rows, unfinished = [], set(incomplete(out))
    for folder in sorted((out / "runs").glob("*-seed*")):
        if folder.name in unfinished:
            continue
        setting, seed = folder.name.rsplit("-seed", 1)
        trained = json.loads((folder / "train.json").read_text())
        run = {"setting": setting, "train.seed": int(seed), "model": folder.name, "train_seconds": trained["seconds"]}
        run["resumed_from"] = trained.get("resumed_from", 0)
        run |= {"final_mse": trained["mse"], "final_loss": trained["loss"]}
        run |= json.loads((folder / "heldout.json").read_text())
        for cell in sorted((folder / "cells").glob("*.json")):
            rows.append({**run, "cell": cell.stem, **json.loads(cell.read_text())})
    return pd.DataFrame(rows)


def loss_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The complexity loss's claim: per setting, the losses and the demo sampler's FID, paired to plain."""
    demo = rows[rows["cell"].str.fullmatch(r"ddim-\d+")].drop(columns=["cell", "model"])
    groups = group_runs(demo, ["setting"], baseline={"setting": "plain"}, metrics=LOSS_METRICS)
    # Each setting minimises its own objective (plain: the MSE alone), so their final losses are not paired.
    return format_groups(groups, LOSS_METRICS).drop(columns=["final_loss - baseline"])


def curve_table(rows: pd.DataFrame) -> pd.DataFrame:
    """FID against NFE: per setting and cell, the mean NFE and FID, paired to plain's same cell."""
    cells = rows.drop(columns=["steps", "base_step", "model"])  # a matched cell's steps differ between models
    groups = group_runs(cells, ["cell", "setting"], baseline={"setting": "plain"}, metrics=("nfe", "fid"))
    return format_groups(groups, ("nfe", "fid"))


def matched_pairs(rows: pd.DataFrame, base: str) -> pd.DataFrame:
    """Per model: the adaptive cell at ``base`` beside its DDIM cell at the matched NFE."""
    a = rows[rows["cell"] == f"adaptive-{base}"].set_index("model")
    d = rows[rows["cell"] == f"ddim-matched-{base}"].set_index("model")
    both = a.index.intersection(d.index)
    a, d = a.loc[both], d.loc[both]
    pairs = a[["setting", "train.seed"]].copy()
    pairs["adaptive_nfe"], pairs["adaptive_fid"] = a["nfe"], a["fid"]
    pairs["ddim_nfe"], pairs["ddim_fid"], pairs["ddim_steps"] = d["nfe"], d["fid"], d["steps"]
    pairs["difference"] = a["fid"] - d["fid"]
    return pairs


def adaptive_table(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """The adaptive sampler's claim: per base step size, its FID minus DDIM's at the same model's mean NFE,
    per setting (one model per seed), and over all settings with each seed's models averaged first: models of
    one seed share initial weights, data order and noise, so the seeds, not the models, are independent."""
    out = []
    bases = sorted((c.removeprefix("adaptive-") for c in rows["cell"].unique() if c.startswith("adaptive-")), key=float)
    for base in bases:
        pairs = matched_pairs(rows, base)
        for setting, group in [*pairs.groupby("setting", sort=True), ("all (seed means)", pairs)]:
            per_seed = group.drop(columns="setting").groupby("train.seed").mean()
            row = {"base_step": base, "setting": setting, "seeds": len(per_seed)}
            row["ddim_steps"] = " ".join(str(int(v)) for v in sorted(set(group["ddim_steps"])))
            for column in ("adaptive_nfe", "ddim_nfe", "adaptive_fid", "ddim_fid", "difference"):
                _, mean, half = interval(per_seed[column].tolist())
                row[column] = f"{mean:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")
            out.append(row)
    return out


def as_markdown(frame: pd.DataFrame | list[dict[str, Any]], drop: tuple[str, ...] = ()) -> str:
    records = frame.to_dict("records") if isinstance(frame, pd.DataFrame) else frame
    if not records:
        return "(none: no run has these cells)"
    columns = [c for c in (records[0] if records else {}) if c not in drop]
    return markdown_table(records, columns)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def report(out: Path) -> str:
    """The three tables in markdown (also written to ``out/claims.md``, the rows to ``out/rows.csv``)."""
    rows = collect(out)
    if rows.empty:
        raise SystemExit(f"claims: error: no finished runs in {out}: run the study first (without --report)")
    rows.to_csv(out / "rows.csv", index=False)
    per_run = rows.drop_duplicates("model")
    _, train_s, _ = interval(per_run.loc[per_run["resumed_from"] == 0, "train_seconds"].tolist())
    unfinished = incomplete(out)
    machines = json.loads((out / "study.json").read_text())["machines"]
    header = [
        f"{len(per_run)} runs ({', '.join(f'{s}: {(per_run.setting == s).sum()}' for s in SETTINGS)}); "
        f"training {train_s:.0f} s per run on average (runs trained in one go); {'; '.join(machines)}",
        *([f"Not finished, left out: {', '.join(unfinished)}"] if unfinished else []),
        "",
        "Losses and the demo sampler's FID, per setting (mean ± 95% interval over seeds; paired to plain):",
        "",
        as_markdown(loss_table(rows)),
        "",
        "The adaptive sampler against DDIM at the same model's mean NFE (paired model by model; 'all': seed means):",
        "",
        as_markdown(adaptive_table(rows)),
        "",
        "FID against NFE, per cell and setting (paired to plain's same cell):",
        "",
        as_markdown(curve_table(rows), drop=("seeds",)),
    ]
    text = "\n".join(header) + "\n"
    (out / "claims.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "claims")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--seeds", type=int, default=5, help="train.seed 0..N-1 for every setting")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument(
        "--adaptive",
        type=float,
        nargs="*",
        default=[6.0],
        help="the adaptive sampler's base step sizes (none: no adaptive cells)",
    )
    parser.add_argument(
        "--solvers",
        nargs="*",
        default=["dpm-solver++-order2"],
        help=f"ODE solvers of the sweep's form, each a cell at {SOLVER_STEPS} steps (none: no solver cells)",
    )
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="the settings to run"
    )
    parser.add_argument("--report", action="store_true", help="only the tables, from what --out holds")
    parser.add_argument("--worker", nargs=2, metavar=("SETTING", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        return run_one(args.out, SIZES[args.size], args.worker[0], int(args.worker[1]), args.adaptive, args.solvers)
    if not args.report:
        study(args)
    print(report(args.out))


def fingerprint(out: Path, size: Size) -> str:
    """What every run's params share (the demo profile with this size, the held-out set), hashed: a study
    folder resumes only the study it was started with."""
    # The sections no run reads are left out, so that a new sweep or latent key keeps a study resumable.
    params = study_params(out, size, "plain", 0).model_dump(mode="json", exclude={"paths", "sweep", "latent"})
    what = {"params": params, "settings": SETTINGS, "heldout": [HELDOUT_DATA_SEED, HELDOUT_DRAW_SEED, size.heldout]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def study(args: argparse.Namespace) -> None:
    """Check ``--out`` holds this study (or nothing), make the shared data, run what is missing."""
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.jobs} runs at a time"
    meta, size = args.out / "study.json", SIZES[args.size]
    known = json.loads(meta.read_text()) if meta.is_file() else {"size": args.size, "machines": []}
    if known["size"] != args.size:
        raise SystemExit(f"claims: error: {args.out} holds a study of another --size: choose another --out")
    if known.setdefault("fingerprint", fingerprint(args.out, size)) != fingerprint(args.out, size):
        raise SystemExit(
            f"claims: error: {args.out} holds a study of other params (profiles/demo.yaml, the defaults or the "
            "study's settings changed since): choose another --out"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    machines = list(dict.fromkeys([*known["machines"], machine]))
    write_json({"size": args.size, "fingerprint": known["fingerprint"], "machines": machines}, meta)
    prepare_shared(study_params(args.out, SIZES[args.size], "plain", 0))
    runs = [(setting, seed) for seed in range(args.seeds) for setting in args.settings]
    start = time.perf_counter()
    run_all(args, runs)
    print(f"[claims: {len(runs)} runs in {time.perf_counter() - start:.0f} s]", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_all's finally ends the workers
    main()
