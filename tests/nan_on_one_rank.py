"""``torchrun ... tests/nan_on_one_rank.py STEP --params FILE``: the train stage, where rank 1 alone sees a NaN
loss at step STEP (1-based). The NaN is a detached constant added to the loss, so the gradients, which DDP
all-reduces, stay finite: no other rank can notice anything unless the ranks agree on their NaN checks."""

from __future__ import annotations

import os
import sys

import torch

import tasks.train as stage


def main() -> int:
    bad_step, original, calls = int(sys.argv[1]), stage.training_losses, [0]

    def losses(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if os.environ.get("RANK") == "1" and calls[0] == bad_step:
            out["loss"] = out["loss"] + torch.full_like(out["loss"], float("nan")).detach()
        return out

    stage.training_losses = losses
    return stage.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
