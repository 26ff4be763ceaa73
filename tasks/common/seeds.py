"""Seeds derived from tuples of integers, for randomness that must not depend on how work is split up."""

from __future__ import annotations

import numpy as np


def derive_seed(*entropy: int) -> int:
    """A torch seed (63 bits) for the tuple ``entropy``, through numpy's ``SeedSequence``.

    Different tuples give statistically independent streams: the noise of (seed 1, image 0) shares nothing
    with that of (seed 0, image 1), as it would with ``seed + i``. The same tuple always gives the same seed.
    """
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0] >> 1)
