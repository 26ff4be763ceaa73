"""The config: one home for every default, profiles as overlays, params.yaml rendered from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from models.diffusion import BetaSchedule, ComplexityMode, Spacing
from models.unet import UNetConfig
from pipelines.cli import PARAMS_HEADER, main
from tasks.common.config import (
    STAGES,
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    Params,
    SampleConfig,
    TrainConfig,
    load_params,
    profile_names,
    profile_params,
    render_params,
    result,
    stage_params,
    stages_of,
    validate_params,
)
from tasks.train import RESUMABLE_ACROSS

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"


def leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def test_the_committed_params_yaml_is_what_ddim_profile_demo_writes():
    expected = render_params(profile_params("demo", PROFILES), PARAMS_HEADER.format(name="demo"))
    assert (ROOT / "params.yaml").read_text() == expected, "run `ddim profile demo` after changing the defaults"


@pytest.mark.parametrize("profile", profile_names(PROFILES))
def test_every_profile_is_valid(profile):
    params = profile_params(profile, PROFILES)
    params.model.unet_config(params.data.image_size)


@pytest.mark.parametrize("profile", profile_names(PROFILES))
def test_profiles_hold_only_what_differs_from_the_defaults_and_render_completely(profile, tmp_path):
    overlay = leaves(yaml.safe_load((PROFILES / f"{profile}.yaml").read_text()) or {})
    defaults = leaves(Params().model_dump(mode="json"))
    assert [key for key, value in overlay.items() if defaults[key] == value] == []
    rendered = tmp_path / "params.yaml"
    rendered.write_text(render_params(profile_params(profile, PROFILES), "header"))
    assert set(leaves(yaml.safe_load(rendered.read_text()))) == set(defaults), "every key, every section"
    assert load_params(rendered) == profile_params(profile, PROFILES)


def test_the_defaults_are_ddpms_cifar10_setup():
    p = Params()
    assert p.model.unet_config(p.data.image_size) == UNetConfig.ddpm_cifar10()
    assert (p.data.source, p.train.batch_size, p.train.lr, p.train.ema_decay, p.train.steps) == (
        "cifar10",
        128,
        2e-4,
        0.9999,
        800_000,
    )
    assert (p.sample.spacing, p.sample.num_samples, p.sample.steps) == ("quad", 50_000, 100)
    assert profile_params("cifar10", PROFILES) == p


def test_the_model_section_is_made_from_unet_config():
    fields = {f.name: f.default for f in dataclasses.fields(UNetConfig)}
    section = {k: v for k, v in ModelConfig.model_fields.items() if k != "pretrained"}  # what to import, if set
    assert set(section) == set(fields) - {"image_size", "in_channels", "out_channels"}
    assert {name: f.default for name, f in section.items()} == {name: fields[name] for name in section}


def test_closed_choices_come_from_models():
    assert DiffusionConfig.model_fields["schedule"].annotation == BetaSchedule
    assert SampleConfig.model_fields["spacing"].annotation == Spacing
    assert TrainConfig.model_fields["complexity_mode"].annotation == ComplexityMode
    assert SampleConfig.model_fields["complexity_mode"].annotation == ComplexityMode


def test_runtime_keys_are_resumable_and_not_result_keys():
    runtime = set(TrainConfig.model_fields) - set(TrainConfig.result_keys())
    assert runtime == {
        *("device", "num_workers", "log_every", "sample_every", "sample_steps"),
        *("model_every", "fid_every", "fid_samples"),
        *("checkpoint_every", "keep_checkpoints", "resume"),
        *("rdzv_endpoint", "rdzv_id", "max_restarts"),
        *("cuda_graphs", "data_on_device"),
    }
    assert runtime < RESUMABLE_ACROSS


def test_every_key_is_a_path_a_runtime_key_or_names_the_stages_it_can_change():
    """What dvc.yaml's params: lists come from (stage_params): a key with neither runtime(...) nor result(...,
    stages=...) would be a param of no stage, and changing it would rerun nothing."""
    for section, info in Params.model_fields.items():
        cls = info.annotation
        for key, field in cls.model_fields.items():
            is_runtime = key not in cls.result_keys()
            assert section == "paths" or is_runtime != bool(stages_of(field)), f"{section}.{key}"
            assert set(stages_of(field)) <= set(STAGES)


def test_stage_params_follow_params_yaml_order_and_know_every_stage():
    assert stage_params("reference") == ["evaluate.reference_count"]
    assert stage_params("evaluate") == []
    train = stage_params("train")
    assert train[:3] == ["data.image_size", "model.pretrained", "model.ch"]
    assert {f"train.{key}" for key in TrainConfig.result_keys()} <= set(train)
    with pytest.raises(ValueError, match="no stage 'sweep_table'"):
        stage_params("sweep_table")
    with pytest.raises(ValueError, match="stages must name stages of dvc.yaml"):
        result(0, "a key", stages=("trian",))


def test_several_machines_need_a_rendezvous_endpoint():
    with pytest.raises(ConfigError, match="train.nnodes > 1 needs train.rdzv_endpoint"):
        validate_params({"train": {"nnodes": 2}})
    assert validate_params({"train": {"nnodes": 2, "rdzv_endpoint": "node0:29400"}}).train.nnodes == 2


def test_ddim_profile_prints_or_writes_and_refuses_unknown_profiles(tmp_path, capsys):
    assert main(["profile", "cifar10-ch64", "--profiles", str(PROFILES), "--params", "-"]) == 0
    printed = capsys.readouterr().out
    assert "  ch: 64 " in printed and printed.startswith("# Every hyperparameter")
    target = tmp_path / "params.yaml"
    assert main(["profile", "cifar10-ch64", "--profiles", str(PROFILES), "--params", str(target)]) == 0
    assert target.read_text() == printed
    assert main(["profile", "nope", "--profiles", str(PROFILES), "--params", str(target)]) == 1
    assert "choose one of celebahq, cifar10, cifar10-ch64, cifar10-pretrained, demo" in capsys.readouterr().err
    assert target.read_text() == printed, "a failed switch leaves params.yaml alone"


def test_a_bad_profile_names_itself(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"invalid profile bad: train.lr: Input should be greater than 0"):
        profile_params("bad", tmp_path)


def test_resume_never_cannot_be_restarted_by_torchrun(tmp_path):
    (tmp_path / "p.yaml").write_text("train: {resume: never, max_restarts: 2}\n")
    with pytest.raises(ConfigError, match="a restarted rank would refuse the checkpoints its own job wrote"):
        load_params(tmp_path / "p.yaml")


def test_each_sampler_records_only_the_settings_that_apply_to_it():
    from tasks.common.config import SampleConfig
    from tasks.common.tracking import evaluation_name

    base = {"steps": 20, "spacing": "trailing", "eta": 1.0, "order": 3, "variant": "bh1", "base_step_size": 4.0}
    expected = {
        "ddim": ({"steps": 20, "spacing": "trailing", "eta": 1.0}, "ddim-20steps-eta1.0-trailing"),
        "dpm-solver++": ({"steps": 20, "spacing": "trailing", "order": 3}, "dpm-solver++-order3-20steps-trailing"),
        "unipc": (
            {"steps": 20, "spacing": "trailing", "order": 3, "variant": "bh1"},
            "unipc-bh1-order3-20steps-trailing",
        ),
        "adaptive": ({"eta": 1.0, "base_step_size": 4.0}, "adaptive-base4.0-eta1.0"),
    }
    for sampler, (used, name) in expected.items():
        settings = SampleConfig(sampler=sampler, **base).settings()
        assert settings == {"sampler": sampler, **dict.fromkeys(base), **used}
        assert evaluation_name(settings) == name
    eta0 = SampleConfig(sampler="ddim", steps=10, eta=0.0, spacing="quad").settings()
    assert evaluation_name(eta0) == "ddim-10steps-eta0.0-quad"  # eta 0 is a setting, not a blank
