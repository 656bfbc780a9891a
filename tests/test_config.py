"""The typed config: YAML loading, overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from cromss_ray.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    TuneConfig,
    build_config,
    flatten,
    load_config,
    parse_override,
    to_yaml,
)


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_are_the_paper_reference_setting():
    cfg = PretrainConfig()
    assert cfg.optim.lr == 5e-3 and cfg.optim.weight_decay == 1e-8 and cfg.optim.batch_size == 128
    assert cfg.optim.scheduler == "plateau" and cfg.optim.plateau_patience == 30 and cfg.optim.epochs == 200
    assert cfg.cromss.smoothing_factors == [0.15, 0.05] and cfg.cromss.prior == "ts"
    assert (cfg.cromss.final_ratio, cfg.cromss.ramp, cfg.cromss.ramp_length) == (0.5, "exp", 80)
    assert cfg.data.val_fraction == 0.01 and cfg.data.crop == 256
    assert cfg.registry_name() == "cromss-mid-13b"


def test_yaml_then_flags_then_set_overrides(tmp_path):
    path = write(tmp_path, {"model": {"fusion": "late"}, "data": {"s2_bands": 9, "uri": "a"}})
    cfg = load_config(
        PretrainConfig,
        path,
        ["cromss.smoothing_factors=[0.1]", "optim.epochs=3", "scaling.use_gpu=false"],
        data="s3://bucket/shards",
        tracking_uri="http://127.0.0.1:5000",
    )
    assert cfg.model.fusion == "late"
    assert cfg.data.uri == "s3://bucket/shards"
    assert cfg.tracking.resolved_uri() == "http://127.0.0.1:5000"
    assert cfg.cromss.smoothing_factors == [0.1]
    assert cfg.optim.epochs == 3 and cfg.scaling.use_gpu is False
    assert cfg.registry_name() == "cromss-late-9b"


def test_unknown_key_in_file_is_named(tmp_path):
    path = write(tmp_path, {"cromss": {"final_ratio": 0.5, "finl_ratio": 0.4}})
    with pytest.raises(ConfigError, match=r"cromss\.finl_ratio: unknown key") as info:
        load_config(PretrainConfig, path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("cromss.final_ratio=1.5", "cromss.final_ratio"),
        ("model.fusion=early", "model.fusion"),
        ("model.modality=s12", "model.modality"),
        ("cromss.smoothing=sometimes", "cromss.smoothing"),
        ("cromss.loss_terms=cx", "cromss.loss_terms"),
        ("cromss.smoothing_factors=[0.6, 0.5]", "cromss.smoothing_factors"),
        ("optim.nesterov=true", "optim.nesterov"),
        ("data.s2_bands=7", "data.s2_bands"),
        ("data.on_bad_row=drop", "data.on_bad_row"),
        ("data.allow_incomplete=maybe", "data.allow_incomplete"),
    ],
)
def test_invalid_override_is_named(override, key):
    with pytest.raises(ConfigError) as info:
        build_config(PretrainConfig, {}, [override])
    assert key in str(info.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        build_config(PretrainConfig, {}, ["optim.lr=0.1", "optim.lr.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(PretrainConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(PretrainConfig, bad)


def test_tracking_uri_falls_back_to_environment_then_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert PretrainConfig().tracking.resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert PretrainConfig().tracking.resolved_uri() == "http://127.0.0.1:5001"


def test_yaml_round_trip_and_flatten():
    cfg = build_config(PretrainConfig, {}, ["model.encoder=resnet18", "run.name=x"])
    again = build_config(PretrainConfig, yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["model.encoder"] == "resnet18" and flat["cromss.smoothing_factors"] == [0.15, 0.05]


def test_finetune_defaults_use_their_own_experiment():
    cfg = FinetuneConfig()
    assert cfg.tracking.experiment == "cromss-finetune" and cfg.model.init == "random"


def test_tune_search_space_must_name_pretraining_keys():
    cfg = build_config(
        TuneConfig,
        {"tune": {"search_space": {"model.fusion": {"choice": ["mid", "late"]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}}}},
    )
    assert cfg.tune.search_space["optim.lr"].loguniform == (1e-4, 1e-2)
    with pytest.raises(ConfigError, match="cromss.final_rati"):
        build_config(TuneConfig, {"tune": {"search_space": {"cromss.final_rati": {"uniform": [0.3, 0.9]}}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        build_config(TuneConfig, {"tune": {"search_space": {"optim.lr": {"uniform": [0, 1], "choice": [1]}}}})


def test_tune_search_space_may_name_an_element_of_a_list_leaf():
    cfg = build_config(TuneConfig, {"tune": {"search_space": {"cromss.smoothing_factors.1": {"uniform": [0, 0.1]}}}})
    assert cfg.tune.search_space["cromss.smoothing_factors.1"].uniform == (0.0, 0.1)
    with pytest.raises(ConfigError, match="cromss.smoothing_factors.2"):
        build_config(TuneConfig, {"tune": {"search_space": {"cromss.smoothing_factors.2": {"uniform": [0, 0.1]}}}})


def test_the_single_modality_baseline_is_named_and_neither_smooths_nor_computes_a_prior():
    assert build_config(PretrainConfig, {}, ["data.s2_bands=9"]).registry_name() == "cromss-mid-9b"
    single_s2 = build_config(PretrainConfig, {}, ["model.fusion=single", "data.s2_bands=9"])
    assert single_s2.registry_name() == "cromss-single-s2-9b"
    single_s1 = build_config(PretrainConfig, {}, ["model.fusion=single", "model.modality=s1"])
    assert single_s1.registry_name() == "cromss-single-s1"
    for config in (single_s2, build_config(PretrainConfig, {}, ["cromss.smoothing=false"])):
        assert config.smoothing_factors() == () and config.training_prior() == "none"
    smoothing = build_config(PretrainConfig, {}, ["cromss.prior=none"])
    assert smoothing.smoothing_factors() == (0.15, 0.05) and smoothing.training_prior() == "none"
    assert build_config(PretrainConfig, {}).training_prior() == "ts"


def test_a_sweep_that_may_train_the_s1_baseline_names_its_metric():
    space = {"tune": {"search_space": {"model.fusion": {"choice": ["mid", "late", "single"]}}}}
    assert build_config(TuneConfig, space).model.modality == "s2"
    with_s1 = {**space, "model": {"modality": "s1"}}
    with pytest.raises(ConfigError, match=r"tune.metric: a trial may train the single-modality S1 baseline"):
        build_config(TuneConfig, with_s1)
    with pytest.raises(ConfigError, match=r"tune.metric"):
        build_config(
            TuneConfig,
            {"model": {"fusion": "single"}, "tune": {"search_space": {"model.modality": {"grid": ["s1", "s2"]}}}},
        )
    named = build_config(TuneConfig, {**with_s1, "tune": {**space["tune"], "metric": "val/s1/miou"}})
    assert named.tune.metric == "val/s1/miou"


def test_the_single_s2_baseline_config_is_the_paper_config_on_s2_alone():
    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    paper = load_config(PretrainConfig, configs / "pretrain_paper.yaml")
    single = load_config(PretrainConfig, configs / "pretrain_single_s2.yaml")
    for section in ("data", "optim", "scaling", "tracking"):
        assert getattr(single, section) == getattr(paper, section), section
    assert (single.model.fusion, single.model.modality) == ("single", "s2")
    assert single.registry_name() == "cromss-single-s2-13b"
    assert single.model.encoder == paper.model.encoder and single.cromss.loss_terms == paper.cromss.loss_terms
    assert single.smoothing_factors() == () and single.training_prior() == "none"


def test_the_transfer_objective_needs_its_data_and_a_branch_every_trial_has():
    assert build_config(TuneConfig, {}).tune.objective is None
    with pytest.raises(ConfigError, match=r"transfer.data: tune.objective 'transfer' needs a downstream shard set"):
        build_config(TuneConfig, {}, ["tune.objective=transfer"])
    with pytest.raises(ConfigError, match=r"tune.objective"):
        build_config(TuneConfig, {}, ["tune.objective=transfer_learning"])
    transfer = ["tune.objective=transfer", "tune.transfer.data=data/dw"]
    config = build_config(TuneConfig, {}, [*transfer, "tune.transfer.every=2"])
    assert (config.tune.transfer.branch, config.tune.transfer.every) == ("s2", 2)
    with pytest.raises(ConfigError, match=r"tune.transfer.every"):
        build_config(TuneConfig, {}, [*transfer, "tune.transfer.every=0"])
    s1_baseline = ["model.fusion=single", "model.modality=s1"]
    with pytest.raises(ConfigError, match=r"tune.transfer.branch: 's2', but a trial may train the single-modality S1"):
        build_config(TuneConfig, {}, [*transfer, *s1_baseline])
    probed = build_config(TuneConfig, {}, [*transfer, *s1_baseline, "tune.transfer.branch=s1"])
    assert probed.tune.metric is None
