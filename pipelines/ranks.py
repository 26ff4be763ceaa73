"""One process (rank) of a stage under ``torchrun``: ``python -m pipelines.ranks STAGE --result FILE [--steps
10 ...] --params FILE --set key=value ...``, as :func:`pipelines.flows.run_ranks` starts it.

Rank 0 writes the stage's result to FILE as JSON. A rank that fails with an error the user can fix prints the
one ``ddim <stage>: error: ...`` line, writes ``{"error": that line's message}`` to FILE and exits 1 (torchrun
then stops the other ranks and exits non-zero); any other error is a bug, whose traceback is in the log.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from pipelines.stages import STAGES, Stage
from tasks.common.config import Params, load_params
from tasks.common.distributed import Ranks
from tasks.common.errors import UserError, out_of_memory
from tasks.common.files import exclusive, write_json


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ranks", description="one rank of a ddim stage")
    parser.add_argument("stage", choices=[name for name, s in STAGES.items() if s.ranks])
    parser.add_argument("--result", required=True, metavar="FILE", help="where rank 0 writes the result (JSON)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    for option in {o.name: o for s in STAGES.values() for o in s.options}.values():
        parser.add_argument(f"--{option.name}", type=option.type, help=option.help)
    return parser.parse_args(argv)


def machine_lock(stage: Stage, params: Params, options: dict) -> contextlib.AbstractContextManager:
    """The lock on the stage's output, held by rank 0 of a job on several machines (whose flows lock nothing: the
    output is shared, and a lock held on every machine would keep all but one out)."""
    if Ranks.from_env().is_main and getattr(params, stage.ranks).nnodes > 1:
        return exclusive(stage.locks(params, **options), f"`ddim {stage.name}`")
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stage = STAGES[args.stage]
    options = {o.name: getattr(args, o.name) for o in stage.options}
    try:
        params = load_params(args.params, args.overrides)
        with machine_lock(stage, params, options):
            result = stage.run(params, **options)
    except Exception as e:
        error = e if isinstance(e, UserError) else out_of_memory(stage.name, e)
        if error is None:
            raise
        message = " ".join(str(error).split())
        print(f"ddim {stage.name}: error: {message}", file=sys.stderr)
        write_json({"error": message}, args.result)
        return 1
    if Ranks.from_env().is_main:
        write_json(result, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
