"""``ddim register [--alias champion]``: the model with the best FID among comparable evaluations becomes a version
of MLflow's registered model ``tracking.registered_model``, and the alias points at it.

Comparable evaluations (``ddim evaluate`` and the sweep's cells: child runs tagged ``comparable``,
:func:`tasks.common.tracking.comparable`) are those measured as the params describe: the sample section's sampler
and settings, ``sample.num_samples`` images, the reference statistics of ``data.name``. Each evaluation's FID is
linked to the logged model that drew its images (tag ``model_id``); the best one's model is registered (a model
registered before keeps its version), so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` loads it. What
was chosen, and why, comes back in words (:func:`explain`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.common.config import Params
from tasks.common.errors import UserError, first_line
from tasks.common.fid import load_stats, reference_path
from tasks.common.files import file_hash
from tasks.common.tracking import TRACKING_OFF, TURN_ON, comparable, mlflow_client, server_answered, tracking_uri

ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,254}")


class RegisterError(UserError):
    """Nothing can be registered as asked."""


def wanted(params: Params) -> str:
    """The ``comparable`` tag of evaluations measured as ``params`` describe (the reference must exist)."""
    reference = reference_path(params)
    _, _, count = load_stats(reference)
    counts = {"num_samples": params.sample.num_samples, "reference_count": count}
    return comparable({**params.sample.settings(), **counts}, file_hash(reference), params.sample.clip_x0)


def candidates(client: Any, experiment: str, key: str) -> tuple[list[Any], int]:
    """The evaluations with the ``comparable`` tag ``key`` and an FID, best first (a repeat of the same model
    counts with its newest FID), and how many evaluations the experiment holds in all."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [], 0
    runs = client.search_runs([found.experiment_id], "tags.stage = 'evaluate'", max_results=50_000)
    newest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        if tags.get("comparable") == key and "fid" in run.data.metrics and tags.get("model_id"):
            newest[tags["model_id"]] = run
    return sorted(newest.values(), key=lambda r: r.data.metrics["fid"]), len(runs)


def register_version(client: Any, name: str, evaluation: Any) -> str:
    """The version of registered model ``name`` that holds the evaluation's model (made if there is none)."""
    from mlflow.exceptions import MlflowException

    model_id = evaluation.data.tags["model_id"]
    if client.get_logged_model(model_id).status.name != "READY":
        raise RegisterError(f"the best model, {model_id}, was never uploaded whole: train again, or evaluate another")
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="DDIM eps-models of ddim-pipeline, registered by FID")
    for version in client.search_model_versions(f"name = '{name}'"):
        if model_id in (version.model_id, version.tags.get("model_id")):  # local stores keep only the tag
            return str(version.version)
    # The logged model's own artifact location as the source: a "models:/<id>" source makes MLflow's local stores
    # look the model up in the process's default tracking store rather than this client's.
    source = client.get_logged_model(model_id).artifact_location
    parent = evaluation.data.tags.get("mlflow.parentRunId")
    tags = {"model_id": model_id, "fid": str(evaluation.data.metrics["fid"]), "evaluation": evaluation.info.run_id}
    tags["measured"] = describe(evaluation.data.tags["comparable"])  # the pyfunc's defaults are the run's, not these
    return str(client.create_model_version(name, source, parent, tags, model_id=model_id).version)


def run(params: Params, alias: str = "champion") -> dict[str, Any]:
    """Register the best comparable evaluation's model under ``alias``; what was chosen and why."""
    cfg = params.tracking
    if not cfg.enabled:
        raise RegisterError(f"{TRACKING_OFF}: there is no registry; {TURN_ON}")
    if not ALIAS.fullmatch(alias) or re.fullmatch(r"v\d+|latest", alias, flags=re.IGNORECASE):
        raise RegisterError(f"--alias {alias!r}: letters, digits, _ and -, not v<number> or latest (e.g. champion)")
    key, name = wanted(params), cfg.registered_model or f"ddim-{params.data.name}"
    uri = tracking_uri(cfg)
    try:
        client = mlflow_client(uri)
        ranked, total = candidates(client, cfg.experiment, key)
        if not ranked:
            raise RegisterError(
                f"none of the {total} evaluations in experiment {cfg.experiment!r} was measured as the params say "
                f"({describe(key)}) and linked to a logged model: run `ddim evaluate` (or `dvc repro evaluate`) "
                "with these params first"
            )
        version = register_version(client, name, ranked[0])
        client.set_registered_model_alias(name, alias, version)
        runs = {r.data.tags.get("mlflow.parentRunId") for r in ranked[:6]} - {None}
        names = {run_id: client.get_run(run_id).info.run_name for run_id in runs}
    except UserError:
        raise
    except Exception as e:
        if server_answered(e):  # a refusal: a model deleted meanwhile, a name the registry does not take
            raise RegisterError(f"MLflow at {uri} refused: {first_line(e)}") from None
        raise RegisterError(
            f"the MLflow store {uri} cannot be read ({first_line(e)}): start it, or fix tracking.uri"
        ) from None
    best = ranked[0]
    return {
        "registered_model": name,
        "version": version,
        "alias": alias,
        "model_id": best.data.tags["model_id"],
        "fid": best.data.metrics["fid"],
        "measured": describe(key),
        "ranking": [
            {"fid": r.data.metrics["fid"], "model_id": r.data.tags["model_id"], "run": names.get(parent(r), "")}
            for r in ranked[:5]
        ],
        "compared": len(ranked),
        "evaluations": total,
    }


def parent(evaluation: Any) -> str | None:
    return evaluation.data.tags.get("mlflow.parentRunId")


def describe(key: str) -> str:
    """A ``comparable`` tag in words: ``ddim, steps 50, eta 1.0, spacing quad; 500 images against 1000 ...``."""
    k = json.loads(key)
    names = ("steps", "eta", "spacing", "order", "variant", "base_step_size", "clip_x0")
    settings = "".join(f", {name} {k[name]}" for name in names if k.get(name) is not None)
    return (
        f"{k['sampler']}{settings}; {k['num_samples']} images against "
        f"{k['reference_count']} reference images (statistics {k['reference_sha256'][:12]})"
    )


def explain(result: dict[str, Any]) -> list[str]:
    """What :func:`run` chose and why, in lines for the terminal."""
    r = result
    among = "the only model" if r["compared"] == 1 else f"the lowest of the {r['compared']} models"
    lines = [
        f"registered {r['registered_model']} version {r['version']} as @{r['alias']}: model {r['model_id']}",
        f"why: FID {r['fid']:.3f}, {among} evaluated as the params say ({r['measured']})",
    ]
    lines += [f"  {row['fid']:10.3f}  {row['model_id']}  {row['run']}" for row in r["ranking"]]
    if r["evaluations"] > r["compared"]:
        others = r["evaluations"] - r["compared"]
        lines.append(f"not compared: {others} evaluations measured another way, repeated, or of no logged model")
    return lines
