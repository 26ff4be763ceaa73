"""The README's commands are the ones the tests run.

Each shell command in a ```bash block of README.md must be listed in RUN_BY with the test that runs it (with the
micro profile, a free port or a local server where the README's command needs a GPU, a real dataset or the
user's machine); a command added to the README without a test fails here. The Python example runs as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

DEMO = "tests/test_pipeline.py::test_make_demo_runs_everything_then_only_what_changed"
PIPELINE = "tests/test_pipeline.py::test_ddim_pipeline_publishes_metrics_and_runs_experiments"
WORKER = "tests/test_pipeline.py::test_prefect_yaml_deploys_and_a_worker_runs_it"
UI = "tests/test_pipeline.py::test_make_ui_shows_the_runs_in_a_browser_and_ui_stop_ends_exactly_them"
PROFILE = "tests/test_pipeline.py::test_switching_profile_is_one_command_that_dvc_params_diff_shows"
QUEUE = "tests/test_pipeline.py::test_a_queued_grid_reaches_the_projects_mlflow_store_and_dvc_exp_show"
TWO_MACHINES = "tests/test_sweep.py::test_two_machines_draw_the_images_and_get_the_fid_of_one"
RUN_BY = {
    "make demo": DEMO,
    "make test": ".ci/run",
    "PATH=$PWD/.venv/bin:$PATH dvc repro evaluate": DEMO,
    ".venv/bin/ddim pipeline": PIPELINE,
    ".venv/bin/ddim pipeline --set sample.eta=0.0": PIPELINE,
    ".venv/bin/ddim profile cifar10": PROFILE,
    ".venv/bin/dvc params diff": PROFILE,
    # torchrun with 2 CPU processes (gloo) through the train flow; --set through `ddim pipeline` in PIPELINE.
    ".venv/bin/ddim pipeline --set train.nproc_per_node=8 --set train.batch_size=16": (
        "tests/test_flows.py::test_train_flow_single_process_and_torchrun"
    ),
    # Two launchers on 127.0.0.1, one process each, meeting at a c10d rendezvous.
    ".venv/bin/ddim train --set train.nnodes=2 --set train.nproc_per_node=8 --set train.rdzv_endpoint=node0:29400": (
        "tests/test_train.py::test_two_machines_meet_at_a_rendezvous_and_train_as_two_ranks"
    ),
    # The celebahq profile's 64 px model is too big for a test: the micro profile with data.source=folder.
    ".venv/bin/ddim profile celebahq": "tests/test_config.py::test_every_profile_is_valid",
    ".venv/bin/ddim pipeline --set data.path=/datasets/celeba_hq.zip": (
        "tests/test_pipeline.py::test_ddim_pipeline_imports_a_zip_of_images"
    ),
    "make ui": UI,
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": WORKER,  # the tests point it at their own server
    "make ui-stop": UI,
    "make screenshots": UI,
    ".venv/bin/prefect work-pool create ddim-process --type process": WORKER,
    ".venv/bin/prefect --no-prompt deploy --all": WORKER,
    ".venv/bin/prefect worker start --pool ddim-process": WORKER,  # with --run-once, so the test ends
    ".venv/bin/prefect deployment run ddim-pipeline/nightly": WORKER,
    '.venv/bin/ddim serve --cron "0 3 * * *"': "tests/test_pipeline.py::test_ddim_serve_runs_a_triggered_flow_run",
    ".venv/bin/ddim runs": DEMO,
    # Against a hub on 127.0.0.1 serving a small model; the pretrained profile through DVC with that model.
    ".venv/bin/ddim import-model google/ddpm-cifar10-32": (
        "tests/test_import.py::test_a_hub_id_is_downloaded_once_and_checked"
    ),
    # Two launchers on 127.0.0.1 drawing one job's images (and a sweep cell's FID), as on two machines.
    ".venv/bin/ddim sample --set sample.nnodes=2 --set sample.nproc_per_node=8 "
    "--set sample.rdzv_endpoint=node0:29500": TWO_MACHINES,
    ".venv/bin/ddim register": (
        "tests/test_registry.py::test_register_picks_the_best_comparable_model_and_its_pyfunc_draws_ddim_samples_images"
    ),
    "MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db .venv/bin/mlflow models serve -m models:/ddim-shapes16@champion "
    "--env-manager local -p 5001": "tests/test_registry.py::test_mlflow_models_serve_answers_with_the_same_images",
    ".venv/bin/ddim export-model exported/": (
        "tests/test_export.py::test_a_second_export_replaces_the_first_and_nothing_else_is_ever_written_over"
    ),
    ".venv/bin/ddim profile cifar10-pretrained": (
        "tests/test_pipeline.py::test_a_pretrained_model_is_imported_instead_of_trained"
    ),
    ".venv/bin/ddim sweep": "tests/test_pipeline.py::test_ddim_sweep_runs_one_stage_per_cell_and_only_new_cells_later",
    ".venv/bin/ddim runs --csv runs.csv": DEMO,
    # a grid over seeds through DVC's queue with two workers, and the grouped table of a known store
    ".venv/bin/dvc exp run --queue -S train.lambda_reg=0,0.1 -S train.seed=0,1,2,3,4": QUEUE,
    ".venv/bin/dvc queue start -j 2": QUEUE,
    ".venv/bin/ddim runs --group-by train.lambda_reg --over train.seed --baseline train.lambda_reg=0": (
        "tests/test_compare.py::test_ddim_runs_group_by_reads_the_store_and_writes_the_intervals"
    ),
    ".venv/bin/ddim reconstruct": "tests/test_pipeline.py::test_ddim_reconstruct_and_interpolate_are_dvc_stages",
    ".venv/bin/ddim interpolate": "tests/test_pipeline.py::test_ddim_reconstruct_and_interpolate_are_dvc_stages",
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands() -> list[str]:
    """Every command of the bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert commands, "no ```bash blocks found in README.md"
    assert [c for c in commands if c not in RUN_BY] == [], "add each new README command to RUN_BY with its test"
    assert [c for c in RUN_BY if c not in commands] == [], "RUN_BY lists commands the README no longer has"
    for where in set(RUN_BY.values()):
        file, _, test = where.partition("::")
        text = (ROOT / file).read_text()
        assert (f"def {test}(" in text) if test else ("make test" in text), where


def test_the_first_two_commands_are_demo_and_test():
    assert readme_commands()[:2] == ["make demo", "make test"]
    assert "bash .ci/run" in README and "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", [c for c in RUN_BY if c.startswith(".venv/bin/ddim")])
def test_readme_ddim_commands_parse_and_their_overrides_validate(command):
    from pipelines.cli import build_parser
    from tasks.common.config import load_params

    args = build_parser().parse_args(shlex.split(command)[1:])
    if getattr(args, "overrides", None):
        load_params(ROOT / "params.yaml", args.overrides)


def test_readme_python_example_runs():
    (code,) = readme_blocks("python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own example
    assert namespace["x_0"].shape == (4, 3, 32, 32) and (namespace["nfe"] >= 1).all()
