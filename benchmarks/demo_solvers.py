"""Every sampler of the sweep on a longer-trained demo model: FID against NFE, and how far apart two draws of
one cell's FID lie.

    python benchmarks/demo_solvers.py             # train (resumes), the sweep's cells, the spread; then the tables
    python benchmarks/demo_solvers.py --report    # only the tables, from what --out already holds

The demo profile (profiles/demo.yaml), trained for ``--train-steps`` (default 6,000: 4x the demo's; the demo's
1,500-step model's deterministic DDIM is far worse than its eta-1 DDIM, so no ODE solver's order can show on it),
tracking off. Then the sweep stage's own code (``tasks/sweep.py``, ``tasks/sweep_solver.py``,
``tasks/sweep_table.py``): DDIM at eta 0 and 1 and each of ``--solvers`` at each of ``--steps``, ``--images``
images per cell (their FID against the demo's 1,000-image reference: biased at this count, comparable only
here). The spread: the cells at ``--spread-steps`` again with ``sample.seed`` 1..``--spread-seeds`` (other
noise, the same model), so that a difference between two samplers can be told from the draw's own noise.

Every result is a file under ``--out`` (default ``results/demo-solvers``): a rerun resumes where one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.claims import cpu_name  # noqa: E402
from tasks import prepare, reference, sweep, sweep_solver, sweep_table, train  # noqa: E402
from tasks.common.config import Params, apply_overrides, profile_params, validate_params  # noqa: E402
from tasks.common.fid import reference_path  # noqa: E402
from tasks.common.files import markdown_table, write_json  # noqa: E402
from tasks.common.grid import cell_path, solver_cell_path  # noqa: E402

SOLVERS = ["dpm-solver++-order2", "dpm-solver++-order3", "unipc-bh2-order2"]
ETAS = [0.0, 1.0]


def study_params(args: argparse.Namespace, seed: int, steps: list[int]) -> Params:
    """The demo profile, trained ``--train-steps``, with this seed's sweep folder and grid, tracking off."""
    out = args.out
    raw = profile_params("demo", ROOT / "profiles").model_dump(mode="json")
    paths = {key: out / key for key in ("raw", "prepared", "reference", "train", "checkpoints", "samples", "latent")}
    paths["sweep"] = out / ("sweep" if seed == 0 else f"spread-seed{seed}")
    overrides = [f"paths.{key}={path}" for key, path in paths.items()] + [f"paths.metrics={out / 'metrics.json'}"]
    overrides += [f"train.steps={args.train_steps}", "train.sample_every=0", "tracking.enabled=false"]
    overrides += [f"sample.seed={seed}", f"sweep.num_samples={args.images}", "sweep.batch_size=250"]
    grid = {"steps": steps, "eta": ETAS, "solvers": args.solvers}
    overrides += [f"sweep.{key}={json.dumps(value)}" for key, value in grid.items()]
    return validate_params(apply_overrides(raw, overrides), "demo-solvers params")


def train_model(params: Params, out: Path) -> None:
    """The dataset, its reference and the model, each once; the training time is kept in ``training.json``."""
    if not reference_path(params).is_file():
        prepare.run(params)
        reference.run(params)
    record = out / "training.json"
    if record.is_file() and json.loads(record.read_text())["steps"] == params.train.steps:
        return
    start = time.perf_counter()
    result = train.run(params)
    seconds = time.perf_counter() - start
    write_json({**result, "steps": params.train.steps, "seconds": round(seconds, 1), "machine": machine()}, record)


def run_cells(params: Params) -> None:
    """The grid's missing cells, DDIM's then the solvers'; each cell's time beside it in ``seconds.json``."""
    s = params.sweep
    cells = [(cell_path(params, n, e), sweep.run, {"steps": n, "eta": e}) for n in s.steps for e in s.eta]
    cells += [
        (solver_cell_path(params, v, n), sweep_solver.run, {"solver": v, "steps": n})
        for v in s.solvers
        for n in s.steps
    ]
    for path, run, options in cells:
        if path.is_file():
            continue
        print(f"[demo-solvers: {path.stem}]", flush=True)
        result = run(params, **options)
        times = path.parent / "seconds.json"
        known = json.loads(times.read_text()) if times.is_file() else {}
        write_json({**known, path.stem: result["seconds"]}, times)


def curve(cell: dict) -> str:
    return sweep_table.curve({"sampler": "ddim", **cell})


def spread_rows(args: argparse.Namespace) -> list[dict]:
    """Per spread cell: its FID at each sample seed, their standard deviation and range."""
    seeds = range(args.spread_seeds + 1)
    tables = {k: sweep_table.table_rows(study_params(args, k, args.spread_steps)) for k in seeds}
    rows = []
    for i, cell in enumerate(tables[0]):
        fids = [tables[k][i]["fid"] for k in seeds]
        row = {
            "sampler": curve(cell),
            "steps": cell["steps"],
            **{f"seed {k}": f for k, f in zip(seeds, fids, strict=True)},
        }
        rows.append({**row, "sd": float(np.std(fids, ddof=1)), "range": max(fids) - min(fids)})
    return rows


def report(args: argparse.Namespace) -> str:
    """The FID-vs-NFE table (one row per sampler, one column per steps) and the spread table, as markdown."""
    params = study_params(args, 0, args.steps)
    cells = sweep_table.run(params)["cells"]
    wide = {}
    for cell in cells:
        wide.setdefault(curve(cell), {"sampler": curve(cell)})[f"NFE {cell['nfe']}"] = cell["fid"]
    columns = ["sampler", *dict.fromkeys(f"NFE {c['nfe']}" for c in cells)]
    spread = spread_rows(args)
    training = json.loads((args.out / "training.json").read_text())
    lines = [
        f"Model: the demo profile trained {training['steps']} steps (this process: steps "
        f"{training.get('resumed_from') or 0}-{training['steps']} in {training['seconds']:.0f} s) on "
        f"{training['machine']}; {args.images} images per cell against the demo's 1,000-image reference.",
        "",
        markdown_table(list(wide.values()), columns),
        f"Spread: the same cells with sample.seed 0..{args.spread_seeds} (other noise, the same model); pooled sd "
        f"{float(np.sqrt(np.mean([r['sd'] ** 2 for r in spread]))):.2f}.",
        "",
        markdown_table(spread, list(spread[0]), ".2f"),
        f"Plot: {params.paths.sweep}/fid_vs_nfe.png",
    ]
    return "\n".join(lines)


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo-solvers")
    parser.add_argument("--train-steps", type=int, default=6000)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--solvers", nargs="+", default=SOLVERS)
    parser.add_argument("--images", type=int, default=500, help="images per cell")
    parser.add_argument("--spread-steps", type=int, nargs="+", default=[10])
    parser.add_argument("--spread-seeds", type=int, default=1, help="sample seeds beyond 0 for the spread cells")
    parser.add_argument("--report", action="store_true", help="only the tables, from what --out holds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.report:
        params = study_params(args, 0, args.steps)
        train_model(params, args.out)
        run_cells(params)
        for seed in range(1, args.spread_seeds + 1):
            run_cells(study_params(args, seed, args.spread_steps))
    text = report(args)
    (args.out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
