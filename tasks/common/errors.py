"""The one exception type that means "the user can fix this": the CLI prints it as one line and exits 1."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``ClassName: the first line of its message`` (cut at ``limit``), for quoting an error in one line."""
    lines = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {lines[0][:limit]}" if lines else error.__class__.__name__


class UserError(Exception):
    """Bad input or environment, with a message that names the problem and the fix. ``retryable``: whether the
    same call may succeed if tried again (a network hiccup), as opposed to failing the same way (a checksum)."""

    retryable: bool = False


# The param that sets how many images one call of each stage puts on the device.
BATCH_KEYS = {
    "train": "train.batch_size",
    "sample": "sample.batch_size",
    "sweep": "sweep.batch_size",
    "sweep-cell": "sweep.batch_size",
    "reference": "evaluate.batch_size",
    "evaluate": "evaluate.batch_size",
    "reconstruct": "latent.batch_size",
    "interpolate": "latent.batch_size",
}


def out_of_memory(stage: str, error: BaseException) -> UserError | None:
    """The one-line error for a device that ran out of memory in ``stage`` (CUDA's ``OutOfMemoryError``, or
    another backend's "out of memory" RuntimeError), naming the batch size to lower; None for any other error."""
    import torch

    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(error, torch.OutOfMemoryError) and not (
        isinstance(error, RuntimeError) and "out of memory" in text.lower()
    ):
        return None
    key = BATCH_KEYS.get(stage, "the stage's batch_size")
    fix = f"lower {key} (--set {key}=N)" if key in BATCH_KEYS.values() else f"lower {key}"
    if stage == "train":
        fix += ", or keep the global batch with more processes (train.nproc_per_node) of a smaller batch_size"
    return UserError(f"the device ran out of memory ({text[:160]}): {fix}")
