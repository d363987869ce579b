"""Search spaces: the trial parameter table, ``resolve_trial_config``, the YAML schema and its errors, the shipped
files, and the Optuna distributions/samplers they produce (real Optuna studies, no Ray)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import optuna
import pytest

from search_spaces.schema import (
    SearchSpace,
    SearchSpaceError,
    builtin_search_spaces,
    load_search_space,
    parse_search_space,
)
from trainables.contract import (
    GROUPS,
    PLAN_KEYS,
    TRIAL_PARAMS,
    TrialConfigError,
    describe_params,
    resolve_params,
    resolve_trial_config,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ("smoke", "paper_grid", "pareto")


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> SearchSpaceError:
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(path)
    assert str(path) in str(info.value)
    return info.value


# ----------------------------------------------------------------------------------------------------------------
# trial parameters


def test_defaults_expand_into_a_plan_for_every_group():
    out = resolve_trial_config({})
    plan = out["plan"]
    assert set(plan) == {"groups", *PLAN_KEYS, "keep_frozen"} and plan["keep_frozen"] is False
    assert list(plan["groups"]) == list(GROUPS)
    for g in GROUPS:
        assert plan["groups"][g] == {"prune": "abs", "threshold": 0.005, "quant": "kmeans", "bits": 8}
    assert out["lr"] == TRIAL_PARAMS["lr"].default
    assert out["params"]["bits_conv"] == 8  # an unset override takes the global value


def test_per_group_overrides_and_groups_subset():
    out = resolve_trial_config(
        {
            "prune_mode": "sigma",
            "threshold": 1.5,
            "threshold_whitening": 0.5,
            "bits": 6,
            "bits_whitening": 3,
            "groups": "whitening, conv",  # any order and spacing; stored in canonical order
            "base_key": "abc",  # not a trial parameter: a Ray config also carries the driver's keys
        }
    )
    groups = out["plan"]["groups"]
    assert list(groups) == ["conv", "whitening"]
    assert groups["conv"] == {"prune": "sigma", "threshold": 1.5, "quant": "kmeans", "bits": 6}
    assert groups["whitening"] == {"prune": "sigma", "threshold": 0.5, "quant": "kmeans", "bits": 3}
    assert out["params"]["groups"] == "conv,whitening"


def test_plan_dict_is_what_compression_plan_takes():
    plan_mod = pytest.importorskip("trainables.compression.plan")
    out = resolve_trial_config(
        {"bits_netvlad": 4, "l1_lambda": 1e-6, "quant_mode": "uniform", "prune_rounds": 2}
    )
    plan = plan_mod.CompressionPlan.from_dict(out["plan"], source="test")
    assert plan.to_dict() == out["plan"]
    assert plan.groups["netvlad"].bits == 4 and plan.groups["conv"].quant == "uniform"
    # Same vocabulary on both sides.
    assert set(plan_mod.PRUNE_MODES) == set(TRIAL_PARAMS["prune_mode"].choices)
    assert set(plan_mod.QUANT_MODES) == set(TRIAL_PARAMS["quant_mode"].choices)
    assert TRIAL_PARAMS["bits"].high == plan_mod.MAX_BITS


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("bits", 0, "1..16"),
        ("bits", 17, "1..16"),
        ("bits", 4.5, "integer"),
        ("bits_whitening", "8", "integer"),
        ("threshold", -0.1, ">= 0"),
        ("threshold", float("nan"), "number"),
        ("lr", 0.0, "> 0"),
        ("prune_mode", "std", "'abs', 'sigma'"),
        ("quant_mode", True, "'uniform', 'kmeans'"),
        ("prune_rounds", 0, ">= 1"),
        ("groups", "conv,fc", "unknown group 'fc'"),
        ("groups", "", "non-empty"),
        ("groups", "conv,conv", "at most once"),
        ("l1_steps", True, "integer"),
        ("allow_empty_layer", "yes", "true or false"),
    ],
)
def test_bad_trial_values_name_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(TrialConfigError) as info:
        resolve_trial_config({key: value})
    msg = str(info.value)
    assert key in msg and repr(value) in msg and allowed in msg
    assert info.value.key == key


def test_numeric_coercion_and_unknown_keys_when_strict():
    p = resolve_params({"bits": 5.0, "threshold": 1})
    assert p["bits"] == 5 and isinstance(p["bits"], int)
    assert p["threshold"] == 1.0 and isinstance(p["threshold"], float)
    with pytest.raises(TrialConfigError, match="thresold.*unknown parameter"):
        resolve_params({"thresold": 0.1}, allow_extra=False)


def test_describe_params_lists_every_parameter():
    text = describe_params()
    for name in TRIAL_PARAMS:
        assert f"\n{name} (" in "\n" + text


# ----------------------------------------------------------------------------------------------------------------
# shipped files


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_and_name_only_known_params(name):
    space = load_search_space(builtin_search_spaces()[name])
    assert space.name == name
    assert set(space.params) | set(space.fixed) <= set(TRIAL_PARAMS)
    assert not set(space.params) & set(space.fixed)
    assert space.params, "a shipped space searches something"
    dists = space.optuna_distributions()
    assert set(dists) == set(space.params)
    # Every shipped file documents the shape in its header comment.
    text = space.path.read_text()
    assert text.startswith("#") and "params:" in text.split("\ndescription:")[0]
    # A corner of the space resolves into a plan.
    config = space.fixed | {k: p.corners()[1] for k, p in space.params.items()}
    assert resolve_trial_config(config)["plan"]["groups"]


def test_paper_grid_is_the_posters_grid():
    space = load_search_space("paper_grid")
    assert space.sampler.type == "grid"
    assert space.grid_size == 16 and space.num_samples == 16
    assert space.fixed["prune_mode"] == "abs"
    assert space.params["threshold"].choices == (0.001, 0.005, 0.01, 0.05)
    assert set(space.params["bits"].choices) == {8, 5}
    assert set(space.params["quant_mode"].choices) == {"uniform", "kmeans"}


def test_pareto_space_searches_sigma_threshold_and_bits_per_group_whitening_dim_and_log_lambda():
    space = load_search_space("pareto.yaml")
    assert space.sampler.type == "tpe"
    # Sigma mode only (absolute thresholds are paper_grid.yaml's), one threshold range per group, each below the
    # ~3.3·std at which a Gaussian-like conv layer of the tiny base would be pruned whole.
    assert space.fixed["prune_mode"] == "sigma" and "threshold" not in space.params
    assert space.params["l1_lambda"].log
    assert space.fixed["groups"] == "conv,netvlad,whitening"  # a VGG16 base: no depthwise convs
    for g in space.fixed["groups"].split(","):
        t = space.params[f"threshold_{g}"]
        assert t.kind == "float" and t.log and 0 < t.low < t.high <= 3.0
        p = space.params[f"bits_{g}"]
        assert (p.kind, p.low, p.high) == ("int", 2, 8)
    assert space.params["threshold_conv"].high < space.params["threshold_whitening"].high
    d = space.params["whitening_dim"]
    assert (d.kind, d.high, d.log) == ("int", 4096, True)
    assert set(space.params["quant_mode"].choices) == {"uniform", "kmeans"}


def test_smoke_space_reaches_high_compression():
    space = load_search_space("smoke")
    assert space.num_samples >= 12  # issue 10: the embedded default runs at least 12 trials
    assert space.fixed["prune_mode"] == "sigma"
    # The embedded base has no whitening: the conv and depthwise groups are the file, with channel-scaled
    # codebooks. Thresholds stay below sqrt(3), where a layer with uniformly distributed weights (the tiny
    # backbone's init) would be pruned whole.
    assert space.fixed["groups"] == "conv,depthwise,netvlad"
    assert space.fixed["scale"] == "channel"
    assert space.fixed["threshold"] < math.sqrt(3)
    # The conv group's size is set by its entropy-constrained k-means rate at 32 centroids: from ~10x to ~15x.
    assert space.fixed["bits_conv"] == 5
    rate = space.params["kmeans_rate_conv"]
    assert rate.low <= 0.004 and rate.high >= 0.012
    assert space.params["bits_depthwise"].low <= 3 and space.params["bits_depthwise"].high >= 6
    # few steps: the smoke space must stay cheap on a CPU
    assert all(
        space.fixed.get(k, TRIAL_PARAMS[k].default) <= 30
        for k in ("l1_steps", "retrain_steps", "quant_steps")
    )


# ----------------------------------------------------------------------------------------------------------------
# schema errors


def test_unreadable_yaml_names_the_line(tmp_path):
    err = load_error(tmp_path, "params:\n  threshold: {float: [0.1, 2.0]\nfixed: {}\n")
    assert err.line is not None and err.line >= 2
    assert "not valid YAML" in str(err)


def test_missing_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(SearchSpaceError, match="no such file.*paper_grid, pareto, smoke"):
        load_search_space(tmp_path / "nope.yaml")


def test_unknown_top_level_key(tmp_path):
    err = load_error(tmp_path, "params: {bits: {int: [2, 8]}}\nsamplr: {type: tpe}\n")
    assert err.key == "samplr" and err.line == 2
    assert "allowed: description, sampler, num_samples, params, fixed" in str(err)


def test_unknown_param_lists_the_known_ones(tmp_path):
    err = load_error(tmp_path, "params:\n  bitz: {int: [2, 8]}\n")
    assert err.key == "params.bitz" and err.line == 2
    assert "known:" in str(err) and "bits_whitening" in str(err) and "threshold" in str(err)


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("params: {bits: {float: [2, 8]}}", "params.bits.float", "bits is a int parameter"),
        ("params: {threshold: {int: [1, 3]}}", "params.threshold.int", "threshold is a float parameter"),
        ("params: {prune_mode: {float: [0, 1]}}", "params.prune_mode.float", "prune_mode is a str parameter"),
        ("params: {threshold: {float: [0.5, 0.1]}}", "params.threshold.float", "low > high"),
        ("params: {threshold: {float: [0.1, 0.1]}}", "params.threshold.float", "under fixed"),
        (
            "params: {threshold: {float: [0.0, 0.1], log: true}}",
            "params.threshold.float",
            "log range needs low > 0",
        ),
        ("params: {bits: {int: [0, 20]}}", "params.bits.int", "outside bits's domain: an integer in 1..16"),
        ("params: {lr: {float: [0, 0.1]}}", "params.lr.float", "> 0"),
        ("params: {bits: {int: [2, 8], step: 0}}", "params.bits.step", "positive integer"),
        ("params: {bits: {int: [2, 8], log: true, step: 2}}", "params.bits.step", "log: true with step"),
        ("params: {bits: {int: [2, 8], spread: 2}}", "params.bits.spread", "allowed: float, int, choices"),
        ("params: {bits: {int: [2]}}", "params.bits.int", "expected [low, high]"),
        ("params: {bits: {int: [2, 8], choices: [2]}}", "params.bits", "exactly one of"),
        ("params: {bits: [2, 8]}", "params.bits", "{choices: [2, 8]}"),
        ("params: {bits: 4}", "params.bits", "under fixed"),
        (
            "params: {quant_mode: {choices: [uniform, lloyd]}}",
            "params.quant_mode.choices",
            "'lloyd' (item 1)",
        ),
        ("params: {quant_mode: {choices: []}}", "params.quant_mode.choices", "non-empty list"),
        ("params: {bits: {choices: [4, 4]}}", "params.bits.choices", "listed twice"),
        ("params: {groups: {choices: ['conv', 'conv,fc']}}", "params.groups.choices", "'conv,fc'"),
        ("params: {}", "params", "nothing to search"),
        ("description: x", "params", "nothing to search"),
        ("params: {bits: {int: [2, 8]}}\nfixed: {bits: 4}", "fixed.bits", "both searched (params) and fixed"),
        ("params: {bits: {int: [2, 8]}}\nfixed: {threshold: -1}", "fixed.threshold", ">= 0"),
        ("params: {bits: {int: [2, 8]}}\nfixed: {threshhold: 1}", "fixed.threshhold", "unknown parameter"),
        (
            "params: {bits: {int: [2, 8]}}\nfixed: {threshold: [1, 2]}",
            "fixed.threshold",
            "ranges go under params",
        ),
        ("params: {bits: {int: [2, 8]}}\nsampler: {type: cmaes}", "sampler.type", "tpe, nsga2, grid, random"),
        ("params: {bits: {int: [2, 8]}}\nsampler: {seed: -1}", "sampler.seed", "greater than or equal to 0"),
        ("params: {bits: {int: [2, 8]}}\nsampler: {seed: abc}", "sampler.seed", "integer"),
        (
            "params: {bits: {int: [2, 8]}}\nsampler: {seed: 1, pop: 3}",
            "sampler.pop",
            "unknown sampler option",
        ),
        (
            "params: {bits: {int: [2, 8]}}\nsampler: {type: tpe, population_size: 8}",
            "sampler.population_size",
            "only the nsga2",
        ),
        ("params: {bits: {int: [2, 8]}}\nsampler: {type: grid}", "sampler.type", "bits is a range"),
        (
            "params: {bits: {choices: [4, 8]}}\nsampler: {type: grid}\nnum_samples: 3",
            "num_samples",
            "grid has 2 points",
        ),
        ("params: {bits: {int: [2, 8]}}\nnum_samples: 0", "num_samples", "greater than or equal to 1"),
        (
            "params: {bits_conv: {int: [2, 8]}}\nfixed: {groups: whitening}",
            "params.bits_conv",
            "does not compress conv",
        ),
        (
            "params: {threshold: {float: [0.1, 1]}}\nfixed: {prune_mode: none}",
            "params.threshold",
            "no effect",
        ),
        ("params: {bits: {int: [2, 8]}}\nparams: {bits: {int: [2, 4]}}", "params", "appears twice"),
    ],
)
def test_invalid_spaces_name_file_key_value_and_what_is_allowed(tmp_path, body, key, fragment):
    err = load_error(tmp_path, body + "\n")
    keys = [p.key for p in err.problems]
    assert key in keys, str(err)
    assert fragment in str(err), str(err)
    if key.split(".")[-1] in body:  # a key written in the file is reported with its line
        assert all(p.line is not None for p in err.problems if p.key == key), str(err)


def test_all_problems_are_reported_at_once(tmp_path):
    err = load_error(
        tmp_path,
        """
        params:
          bits: {int: [0, 8]}
          quant_mode: {choices: [uniform, lloyd]}
        fixed:
          lr: -1
        """,
    )
    assert [p.key for p in err.problems] == ["params.bits.int", "params.quant_mode.choices", "fixed.lr"]
    assert [p.line for p in err.problems] == [2, 3, 5]


def test_yaml_1_2_floats_are_numbers(tmp_path):
    path = write(tmp_path, "params:\n  l1_lambda: {float: [1e-8, 1e-4], log: true}\nfixed: {lr: 3e-4}\n")
    space = load_search_space(path)
    assert space.params["l1_lambda"].low == 1e-8 and space.fixed["lr"] == 3e-4


def test_ranges_choices_and_fixed_values_are_coerced(tmp_path):
    path = write(
        tmp_path,
        """
        params:
          threshold: {choices: [1, 0.5]}      # ints for a float parameter become floats
          bits_conv: {int: [2, 8], step: 2}
          allow_empty_layer: {choices: [false, true]}
        fixed:
          bits: 6.0
        """,
    )
    space = load_search_space(path)
    assert space.params["threshold"].choices == (1.0, 0.5)
    assert all(isinstance(v, float) for v in space.params["threshold"].choices)
    assert space.fixed == {"bits": 6} and isinstance(space.fixed["bits"], int)
    dists = space.optuna_distributions()
    assert dists["bits_conv"] == optuna.distributions.IntDistribution(2, 8, step=2)
    assert dists["allow_empty_layer"] == optuna.distributions.CategoricalDistribution([False, True])


def test_to_dict_round_trips_and_flat_params_are_strings():
    for name in SHIPPED:
        space = load_search_space(name)
        again = parse_search_space(space.to_dict(), name=name)
        assert again == space
        flat = space.flat_params()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
        assert flat["space.sampler"] == space.sampler.type


# ----------------------------------------------------------------------------------------------------------------
# samplers in real Optuna studies


def run_study(space: SearchSpace, seed: int, n: int) -> list[dict]:
    """Ask/tell like Ray's OptunaSearch does: two objectives (mAP max, memory min)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=space.make_sampler(seed))
    dists = space.optuna_distributions()
    configs = []
    for _ in range(n):
        trial = study.ask(dists)
        config = space.fixed | trial.params
        configs.append(config)
        p = resolve_trial_config(config)["params"]
        study.tell(trial, [1.0 / (1.0 + p["threshold"]), p["bits"] * (1.0 - min(p["threshold"], 0.99))])
    return configs


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_samplers_are_seeded_and_stay_in_the_space(sampler):
    extra = {"tpe": {"n_startup_trials": 3}, "nsga2": {"population_size": 4}, "random": {}}[sampler]
    space = parse_search_space(
        {
            "sampler": {"type": sampler, "seed": 7, **extra},
            "params": {
                "threshold": {"float": [0.1, 2.0], "log": True},
                "bits": {"int": [2, 8]},
                "quant_mode": {"choices": ["uniform", "kmeans"]},
            },
            "fixed": {"prune_mode": "sigma"},
        }
    )
    a, b = run_study(space, 7, 10), run_study(space, 7, 10)
    assert a == b, "same seed, same configs"
    assert run_study(space, 8, 10) != a
    for c in a:
        assert (
            0.1 <= c["threshold"] <= 2.0 and 2 <= c["bits"] <= 8 and c["quant_mode"] in ("uniform", "kmeans")
        )
        assert c["prune_mode"] == "sigma"
    if sampler == "tpe":
        s = space.make_sampler()
        assert isinstance(s, optuna.samplers.TPESampler) and s._multivariate
    if sampler == "nsga2":
        assert space.make_sampler()._population_size == 4


def test_grid_sampler_covers_the_paper_grid_once_under_ask_and_tell():
    space = load_search_space("paper_grid")
    configs = run_study(space, 0, space.num_samples)  # Optuna's own GridSampler raises on the last tell here
    points = {(c["threshold"], c["bits"], c["quant_mode"]) for c in configs}
    assert len(points) == 16
    assert all(c["prune_mode"] == "abs" for c in configs)


def test_grid_sampler_with_concurrent_trials_does_not_repeat():
    space = load_search_space("paper_grid")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=space.make_sampler(3))
    dists = space.optuna_distributions()
    running = [study.ask(dists) for _ in range(4)]  # four trials in flight, as with max_concurrent=4
    assert len({tuple(t.params.items()) for t in running}) == 4
    for t in running:
        study.tell(t, [0.5, 1.0])
    assert math.isfinite(study.trials[0].values[0])


def test_leaf_packages_import_no_torch_ray_or_mlflow():
    """The contract, the schema, the views and the Pareto sort load in a driver or a browser-less tool without
    torch, Ray or MLflow; of the library they may use only the contract (data, no torch)."""
    import subprocess
    import sys

    code = (
        "import sys, search_spaces.schema, trainables.contract, dashboards.pareto_html, dashboards.pareto_png, "
        "dashboards.pareto_csv, dashboards.layer_html, dashboards.poster_reference, sweep.pareto; "
        "print(sorted({m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'torch'}} "
        "| {m for m in sys.modules if m.startswith('trainables.')} - {'trainables.contract'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_lists_every_parameter():
    readme = (Path(__file__).resolve().parents[1] / "search_spaces" / "README.md").read_text(encoding="utf-8")
    for name, spec in TRIAL_PARAMS.items():
        assert f"| `{name}` | {spec.type.__name__} |" in readme, name
