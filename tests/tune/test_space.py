"""Search-space translation: config domains to Ray Tune domains per algorithm, samples back to configs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

from cromss_ray.config import ConfigError, PretrainConfig, SearchDomain, TuneConfig, build_config
from cromss_ray.tune.space import apply_sample, check_space, expected_trials, param_space, to_tune_domain
from cromss_ray.tune.trial import TrialContext, trial_config


def domain(**kind) -> SearchDomain:
    return SearchDomain(**kind)


def test_random_search_domains():
    space = param_space(
        {
            "model.fusion": domain(choice=["mid", "late"]),
            "cromss.final_ratio": domain(uniform=(0.3, 0.9)),
            "optim.lr": domain(loguniform=(1e-4, 1e-2)),
            "cromss.ramp_length": domain(randint=(1, 3)),
            "cromss.prior": domain(grid=["t", "s"]),
        },
        "random",
    )
    assert isinstance(space["model.fusion"], Categorical) and space["model.fusion"].categories == ["mid", "late"]
    ratio = space["cromss.final_ratio"]
    assert isinstance(ratio, Float) and isinstance(ratio.get_sampler(), Uniform)
    assert (ratio.lower, ratio.upper) == (0.3, 0.9)
    lr = space["optim.lr"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    ramp = space["cromss.ramp_length"]
    assert isinstance(ramp, Integer) and (ramp.lower, ramp.upper) == (1, 4)  # Tune's upper bound is exclusive
    assert space["cromss.prior"] == {"grid_search": ["t", "s"]}


def test_randint_bounds_are_both_inclusive():
    ramp = to_tune_domain("cromss.ramp_length", domain(randint=(2, 4)), "random")
    drawn = set(ramp.sample(size=300, random_state=np.random.default_rng(0)))
    assert drawn == {2, 3, 4}


def test_grid_algorithm_enumerates_choices_and_refuses_ranges():
    assert to_tune_domain("model.fusion", domain(choice=["mid", "late"]), "grid") == {"grid_search": ["mid", "late"]}
    with pytest.raises(ConfigError, match=r"tune\.search_space\.optim\.lr: search_alg 'grid' needs grid or choice"):
        to_tune_domain("optim.lr", domain(loguniform=(1e-4, 1e-2)), "grid")


def test_optuna_refuses_grid_and_non_scalar_choices_and_converts_the_rest():
    with pytest.raises(ConfigError, match=r"tune\.search_space\.cromss\.prior: grid domains need search_alg"):
        to_tune_domain("cromss.prior", domain(grid=["t", "s"]), "optuna")
    with pytest.raises(ConfigError, match=r"tune\.search_space\.cromss\.smoothing_factors: optuna chooses among plain"):
        to_tune_domain("cromss.smoothing_factors", domain(choice=[[0.1, 0.0], [0.2, 0.05]]), "optuna")
    space = param_space(
        {"model.fusion": domain(choice=["mid", "late"]), "optim.lr": domain(loguniform=(1e-4, 1e-2))}, "optuna"
    )
    converted = OptunaSearch.convert_search_space(space)
    assert converted["model.fusion"].choices == ("mid", "late")
    assert converted["optim.lr"].log and (converted["optim.lr"].low, converted["optim.lr"].high) == (1e-4, 1e-2)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ({"uniform": (0.9, 0.3)}, r"uniform needs low < high \(got \[0\.9, 0\.3\]\)"),
        ({"loguniform": (0.0, 0.1)}, r"loguniform needs 0 < low < high"),
        ({"randint": (5, 2)}, r"randint needs low <= high"),
        ({"choice": []}, r"choice needs at least one value"),
        ({"grid": []}, r"grid needs at least one value"),
    ],
)
def test_bad_bounds_are_named(kind, message):
    with pytest.raises(ConfigError, match=rf"tune\.search_space\.cromss\.final_ratio: {message}"):
        to_tune_domain("cromss.final_ratio", domain(**kind), "random")


@pytest.mark.parametrize(
    ("space", "alg", "samples", "expected"),
    [
        ({"optim.lr": domain(loguniform=(1e-4, 1e-2))}, "random", 4, 4),
        ({"optim.lr": domain(grid=[1e-3, 1e-2]), "model.fusion": domain(grid=["mid", "late"])}, "random", 3, 12),
        ({"optim.lr": domain(grid=[1e-3, 1e-2]), "model.fusion": domain(choice=["mid", "late"])}, "random", 2, 4),
        ({"optim.lr": domain(grid=[1e-3, 1e-2]), "model.fusion": domain(choice=["mid", "late"])}, "grid", 2, 8),
        ({"model.fusion": domain(choice=["mid", "late"])}, "optuna", 5, 5),
    ],
)
def test_expected_trials(space, alg, samples, expected):
    assert expected_trials(space, alg, samples) == expected


def test_apply_sample_sets_leaves_and_list_elements():
    base = PretrainConfig()
    trial = apply_sample(
        base,
        {
            "model.fusion": "late",
            "optim.lr": np.float64(3e-4),
            "cromss.smoothing_factors.0": 0.25,
            "cromss.ramp_length": np.int64(7),
        },
    )
    assert trial.model.fusion == "late" and trial.optim.lr == 3e-4
    assert trial.cromss.smoothing_factors == [0.25, 0.05] and trial.cromss.ramp_length == 7
    assert type(trial.cromss.ramp_length) is int
    assert base.model.fusion == "mid" and base.cromss.smoothing_factors == [0.15, 0.05]


@pytest.mark.parametrize(
    ("sample", "named"),
    [
        ({"optim.lrr": 0.1}, "optim.lrr: not a pretraining config key"),
        ({"cromss.smoothing_factors.2": 0.1}, "cromss.smoothing_factors.2: not a pretraining config key"),
        ({"cromss.final_ratio": 1.5}, "cromss.final_ratio"),
        ({"model.fusion": "early"}, "model.fusion"),
    ],
)
def test_apply_sample_errors_name_the_key(sample, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        apply_sample(PretrainConfig(), sample)


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.0, 1.0), lr=st.floats(1e-6, 1.0), fusion=st.sampled_from(["mid", "late", "single"]))
def test_apply_sample_round_trips_any_valid_sample(ratio, lr, fusion):
    trial = apply_sample(PretrainConfig(), {"cromss.final_ratio": ratio, "optim.lr": lr, "model.fusion": fusion})
    assert (trial.cromss.final_ratio, trial.optim.lr, trial.model.fusion) == (ratio, lr, fusion)


def test_the_single_modality_baseline_is_searched_beside_mid_and_late():
    base = PretrainConfig()
    space = {
        "model.fusion": domain(choice=["mid", "late", "single"]),
        "cromss.smoothing_factors.0": domain(uniform=(0.0, 0.3)),
    }
    check_space(base, space)
    assert param_space(space, "random")["model.fusion"].categories == ["mid", "late", "single"]
    assert to_tune_domain("model.fusion", space["model.fusion"], "grid") == {"grid_search": ["mid", "late", "single"]}
    trials = {
        fusion: apply_sample(base, {"model.fusion": fusion, "cromss.smoothing_factors.0": 0.2})
        for fusion in ("mid", "late", "single")
    }
    names = [trial.registry_name() for trial in trials.values()]
    assert names == ["cromss-mid-13b", "cromss-late-13b", "cromss-single-s2-13b"]
    assert trials["mid"].smoothing_factors() == (0.2, 0.05) and trials["single"].smoothing_factors() == ()


def test_check_space_refuses_values_the_config_rejects():
    base = PretrainConfig()
    check_space(base, {"cromss.final_ratio": domain(uniform=(0.3, 0.9)), "model.fusion": domain(choice=["mid"])})
    with pytest.raises(ConfigError, match=r"search_space\.cromss\.final_ratio: value 1\.2 is not a valid setting"):
        check_space(base, {"cromss.final_ratio": domain(uniform=(0.3, 1.2))})
    with pytest.raises(ConfigError, match=r"tune\.search_space\.model\.fusion: value 'early' is not a valid setting"):
        check_space(base, {"model.fusion": domain(choice=["mid", "early"])})


def test_tune_config_from_yaml_tree_translates():
    config = build_config(
        TuneConfig,
        {
            "tune": {
                "search_alg": "random",
                "search_space": {
                    "model.fusion": {"choice": ["mid", "late"]},
                    "cromss.smoothing_factors": {"choice": [[0.15, 0.05], [0.3, 0.1]]},
                    "optim.lr": {"loguniform": [1e-4, 1e-2]},
                },
            }
        },
    )
    space = param_space(config.tune.search_space, config.tune.search_alg)
    assert space["cromss.smoothing_factors"].categories == [[0.15, 0.05], [0.3, 0.1]]
    sampled = {key: value.sample(random_state=np.random.default_rng(1)) for key, value in space.items()}
    trial = apply_sample(PretrainConfig.model_validate(config.model_dump(exclude={"tune"})), sampled)
    assert trial.cromss.smoothing_factors in ([0.15, 0.05], [0.3, 0.1])
    assert 1e-4 <= trial.optim.lr <= 1e-2


def test_trial_config_has_its_own_run_name_and_storage():
    base = PretrainConfig()
    context = TrialContext(sweep_name="sweep", base=base, train_storage="/runs/sweep/train", parent_run_id="p1")
    trial = trial_config(context, {"model.fusion": "late"}, "abc12_00003")
    assert (trial.run.name, trial.run.storage_path) == ("sweep_abc12_00003", "/runs/sweep/train")
    assert trial.model.fusion == "late"
    assert trial.registry_name() == "cromss-late-13b-trials", "trials never register under the standalone name"
    assert (base.run.name, base.model.fusion) == ("cromss-pretrain", "mid")
