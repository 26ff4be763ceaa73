"""``torchrun ... tests/nan_on_one_rank.py STEP --result FILE --params FILE``: one rank of the train stage, as
``python -m pipelines.ranks train --result FILE --params FILE`` runs it, where rank 1 alone sees a NaN loss at step
STEP (1-based). The NaN is a detached constant added to the loss, so the gradients, which DDP all-reduces, stay
finite: no other rank can notice anything unless the ranks agree on their NaN checks."""

from __future__ import annotations

import os
import sys

import torch

import tasks.train as stage
from pipelines import ranks


def main() -> int:
    bad_step, original, calls = int(sys.argv[1]), stage.training_losses, [0]

    def losses(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if os.environ.get("RANK") == "1" and calls[0] == bad_step:
            out["loss"] = out["loss"] + torch.full_like(out["loss"], float("nan")).detach()
        return out

    stage.training_losses = losses
    return ranks.main(["train", *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
