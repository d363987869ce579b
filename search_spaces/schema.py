"""YAML search spaces: load, validate (before Ray starts) and turn into Optuna distributions and a sampler.

File shape (every shipped file repeats it in its header comment)::

    description: free text
    sampler: {type: tpe, seed: 0, n_startup_trials: 6}   # tpe | nsga2 | grid | random
    num_samples: 12                                      # trials to run (the CLI may override)
    params:                                              # searched, each one of:
      threshold: {float: [0.001, 0.05], log: true}       #   a float range (log: / step: optional)
      bits_whitening: {int: [2, 8]}                      #   an int range (log: / step: optional)
      quant_mode: {choices: [uniform, kmeans]}           #   a list of values
    fixed:                                               # the same value in every trial
      l1_steps: 20

Parameter names, types and domains come from ``trainables.contract.TRIAL_PARAMS``; anything a trial would
reject is rejected here, with the file, line, dotted key, value and what is allowed, all problems at once.
Floats such as ``1e-3`` are read as numbers (YAML 1.2), not as the strings PyYAML's YAML 1.1 makes of them.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainables.contract import GROUPS, TRIAL_PARAMS, ParamSpec, TrialConfigError, resolve_params

SAMPLER_TYPES = ("tpe", "nsga2", "grid", "random")
TOP_LEVEL_KEYS = ("description", "sampler", "num_samples", "params", "fixed")
PARAM_KEYS = ("float", "int", "choices", "log", "step")
DEFAULT_NUM_SAMPLES = 12
DEFAULT_POPULATION_SIZE = 8  # NSGA-II's own default (50) makes a short sweep pure random search
MAX_SEED = 2**32 - 1  # numpy's RandomState bound, which Optuna's samplers seed


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a search space."""

    key: str
    value: Any
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        value = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{where}: {self.key}{value}: {self.message}"


_MISSING = object()


class SearchSpaceError(ValueError):
    """A search space that cannot run. ``problems`` lists each (key, value, message, line); ``str()`` shows them
    all as ``FILE:LINE: KEY = VALUE: what is allowed``."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        problems = self.problems
        first = problems[0]
        self.key, self.value, self.line = first.key, first.value, first.line
        lines = [p.render(source) for p in problems]
        head = f"invalid search space {source}" + (
            f" ({len(problems)} problems)" if len(problems) > 1 else ""
        )
        super().__init__(head + ":\n  " + "\n  ".join(lines))


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2) instead of a string (YAML 1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _SamplerModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["tpe", "nsga2", "grid", "random"] = "tpe"
    seed: int | None = Field(0, ge=0, le=MAX_SEED)
    population_size: int | None = Field(None, ge=2)
    n_startup_trials: int | None = Field(None, ge=0)


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    description: str = ""
    sampler: _SamplerModel = Field(default_factory=_SamplerModel)
    num_samples: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class SamplerConfig:
    """The ``sampler:`` block. ``population_size`` only for nsga2, ``n_startup_trials`` only for tpe."""

    type: str = "tpe"
    seed: int | None = 0
    population_size: int | None = None
    n_startup_trials: int | None = None


@dataclass(frozen=True)
class SearchParam:
    """One searched parameter: ``kind`` is ``float``, ``int`` (a range) or ``choices``."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choices":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(
            float(self.low),
            float(self.high),
            log=self.log,
            step=None if self.step is None else float(self.step),
        )

    def to_dict(self) -> dict[str, Any]:
        """The YAML form this parameter was written in (normalized), so ``to_dict`` round-trips."""
        if self.kind == "choices":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "choices":
            return "choices " + ", ".join(map(str, self.choices))
        extra = " log" if self.log else (f" step {self.step}" if self.step is not None else "")
        return f"{self.kind} [{self.low}, {self.high}]{extra}"

    def corners(self) -> tuple[Any, Any]:
        """The two extreme values (for a quick whole-config check)."""
        if self.kind == "choices":
            return self.choices[0], self.choices[-1]
        return self.low, self.high


class _GridSampler(optuna.samplers.GridSampler):
    """``GridSampler`` for ask-and-tell use, as Ray's ``OptunaSearch`` drives it.

    Optuna's ``GridSampler.after_trial`` calls ``study.stop()`` when the grid is used up, and ``study.stop()``
    raises ``RuntimeError`` outside ``study.optimize``: the last grid trials' ``tell`` raises (Ray catches it and
    logs a misleading warning; a plain ask-and-tell loop dies). Stopping is Ray's job here (``num_samples`` ≤ grid
    size is checked when the space loads), so this sampler does nothing after a trial.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. Build with ``load_search_space`` or ``parse_search_space``."""

    name: str
    description: str
    sampler: SamplerConfig
    params: dict[str, SearchParam]
    fixed: dict[str, Any]
    num_samples: int
    path: Path | None = field(default=None, compare=False)

    @property
    def grid_size(self) -> int | None:
        """Number of points of the full grid, or None when a parameter is a range."""
        if any(p.kind != "choices" for p in self.params.values()):
            return None
        return math.prod(len(p.choices) for p in self.params.values())

    def optuna_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """The searched parameters as Optuna distributions (for ``OptunaSearch(space=...)``)."""
        return {name: p.distribution() for name, p in self.params.items()}

    def make_sampler(self, seed: int | None = None) -> optuna.samplers.BaseSampler:
        """The file's sampler, seeded with ``seed`` (or the file's ``sampler.seed`` when None).

        tpe → ``TPESampler(multivariate=True)`` (Optuna 5 leaves multivariate off by default),
        nsga2 → ``NSGAIISampler(population_size=…)``, grid → a ``GridSampler`` over the choices that works under
        ask-and-tell, random → ``RandomSampler``.
        """
        seed = self.sampler.seed if seed is None else seed
        kind = self.sampler.type
        if kind == "tpe":
            extra = {}
            if self.sampler.n_startup_trials is not None:
                extra["n_startup_trials"] = self.sampler.n_startup_trials
            return optuna.samplers.TPESampler(multivariate=True, seed=seed, **extra)
        if kind == "nsga2":
            size = self.sampler.population_size or DEFAULT_POPULATION_SIZE
            return optuna.samplers.NSGAIISampler(population_size=size, seed=seed)
        if kind == "grid":
            grid = {name: list(p.choices) for name, p in self.params.items()}
            return _GridSampler(search_space=grid, seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able normalized form (defaults filled); ``parse_search_space(space.to_dict())`` gives it back."""
        sampler = {"type": self.sampler.type, "seed": self.sampler.seed}
        if self.sampler.population_size is not None:
            sampler["population_size"] = self.sampler.population_size
        if self.sampler.n_startup_trials is not None:
            sampler["n_startup_trials"] = self.sampler.n_startup_trials
        return {
            "description": self.description,
            "sampler": sampler,
            "num_samples": self.num_samples,
            "params": {name: p.to_dict() for name, p in self.params.items()},
            "fixed": dict(self.fixed),
        }

    def flat_params(self, prefix: str = "space.") -> dict[str, str]:
        """One short string per entry, for MLflow params (which are flat strings)."""
        out = {f"{prefix}name": self.name, f"{prefix}sampler": self.sampler.type}
        out[f"{prefix}seed"] = str(self.sampler.seed)
        out[f"{prefix}num_samples"] = str(self.num_samples)
        out.update({f"{prefix}params.{k}": p.describe() for k, p in self.params.items()})
        out.update({f"{prefix}fixed.{k}": str(v) for k, v in self.fixed.items()})
        return out


# --------------------------------------------------------------------------------------------------------------
# loading


def builtin_search_spaces() -> dict[str, Path]:
    """The search spaces shipped with the package, by name (``smoke``, ``pareto``, ``paper_grid``)."""
    root = files("search_spaces")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a YAML search space. ``path`` is a file, or the name of a shipped one (``smoke``,
    ``smoke.yaml``). Raises ``SearchSpaceError`` naming file, line, key, value and what is allowed."""
    p = Path(path)
    if not p.exists():
        builtin = builtin_search_spaces().get(p.stem) if p.parent == Path(".") else None
        if builtin is None:
            known = ", ".join(sorted(builtin_search_spaces()))
            raise SearchSpaceError(
                str(path),
                [Problem("file", _MISSING, f"no such file (or shipped search space; shipped: {known})")],
            )
        p = builtin
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchSpaceError(str(p), [Problem("file", _MISSING, f"cannot be read: {exc}")]) from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise SearchSpaceError(
            str(p), [Problem("yaml", _MISSING, f"not valid YAML: {reason}", line)]
        ) from exc
    lines: dict[str, int] = {}
    duplicates: list[Problem] = []
    if node is not None:
        _index_lines(node, "", lines, duplicates)
    return _parse(data, str(p), lines, duplicates, name=p.stem, path=p)


def parse_search_space(data: Any, source: str = "<search space>", name: str | None = None) -> SearchSpace:
    """Validate an already-parsed search space (a dict in the YAML shape, e.g. ``SearchSpace.to_dict()``)."""
    return _parse(data, source, {}, [], name=name or source, path=None)


def _index_lines(node: yaml.Node, prefix: str, lines: dict[str, int], dups: list[Problem]) -> None:
    """Line of every dotted key, and duplicated keys (PyYAML silently keeps the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                dups.append(Problem(dotted, _MISSING, "this key appears twice; keep one", line))
            seen.add(key)
            lines[dotted] = line
            _index_lines(value_node, dotted, lines, dups)


def _line_of(lines: Mapping[str, int], key: str) -> int | None:
    while key:
        if key in lines:
            return lines[key]
        key = key.rpartition(".")[0]
    return None


def _parse(
    data: Any,
    source: str,
    lines: Mapping[str, int],
    problems: list[Problem],
    name: str,
    path: Path | None,
) -> SearchSpace:
    problems = list(problems)

    def add(key: str, value: Any, message: str) -> None:
        problems.append(Problem(key, value, message, _line_of(lines, key)))

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SearchSpaceError(
            source,
            [Problem("(top level)", data, f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}", 1)],
        )
    data = dict(data)
    for key in ("sampler", "params", "fixed"):
        if key in data and data[key] is None:  # `params:` with nothing under it
            data[key] = {}
    try:
        model = _FileModel.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(_from_pydantic(err, lines))
        # Go on with whatever parts are well-formed, so every problem is reported in one go.
        model = _partial_model(data)

    params: dict[str, SearchParam] = {}
    for pname, raw in model.params.items():
        parsed = _parse_param(str(pname), raw, add)
        if parsed is not None:
            params[str(pname)] = parsed
    if not model.params:
        add(
            "params",
            _MISSING,
            f"nothing to search: name at least one parameter under params (known: {', '.join(TRIAL_PARAMS)})",
        )

    fixed: dict[str, Any] = {}
    for fname, value in model.fixed.items():
        fname = str(fname)
        key = f"fixed.{fname}"
        spec = TRIAL_PARAMS.get(fname)
        if spec is None:
            add(key, value, _unknown_param(fname))
            continue
        if fname in model.params:
            add(key, value, f"{fname} is both searched (params) and fixed; keep it in one of them")
            continue
        if isinstance(value, Mapping | list):
            add(key, value, f"a fixed value is a single value ({spec.domain()}); ranges go under params")
            continue
        try:
            fixed[fname] = spec.check(value, key=key)
        except TrialConfigError as exc:
            add(key, value, exc.allowed)

    sampler = SamplerConfig(**model.sampler.model_dump())
    if sampler.population_size is not None and sampler.type != "nsga2":
        add(
            "sampler.population_size", sampler.population_size, "only the nsga2 sampler takes population_size"
        )
    if sampler.n_startup_trials is not None and sampler.type != "tpe":
        add(
            "sampler.n_startup_trials",
            sampler.n_startup_trials,
            "only the tpe sampler takes n_startup_trials",
        )

    num_samples = model.num_samples
    if sampler.type == "grid":
        ranges = [n for n, p in params.items() if p.kind != "choices"]
        if ranges:
            add(
                "sampler.type",
                "grid",
                f"a grid needs every searched parameter as choices: [...]; {', '.join(ranges)} "
                "is a range (list its values, or use tpe/nsga2/random)",
            )
        elif params and len(params) == len(model.params):
            size = math.prod(len(p.choices) for p in params.values())
            if num_samples is None:
                num_samples = size
            elif num_samples > size:
                add(
                    "num_samples",
                    num_samples,
                    f"the grid has {size} points; at most {size} (more would repeat grid points)",
                )
    if num_samples is None:
        num_samples = DEFAULT_NUM_SAMPLES

    if not problems:
        _check_consistency(params, fixed, add)
    if problems:
        raise SearchSpaceError(source, problems)
    return SearchSpace(
        name=name,
        description=model.description,
        sampler=sampler,
        params=params,
        fixed=fixed,
        num_samples=num_samples,
        path=path,
    )


def _partial_model(data: Mapping[str, Any]) -> _FileModel:
    """The file with each malformed top-level part replaced by its default (its errors are already recorded)."""
    parts: dict[str, Any] = {}
    for key in TOP_LEVEL_KEYS:
        if key not in data:
            continue
        try:
            _FileModel.model_validate({key: data[key]})
            parts[key] = data[key]
        except ValidationError:
            pass
    return _FileModel.model_validate(parts)


def _from_pydantic(err: Mapping[str, Any], lines: Mapping[str, int]) -> Problem:
    loc = [str(p) for p in err.get("loc", ())]
    key = ".".join(loc) or "(top level)"
    value = err.get("input", _MISSING)
    if err.get("type") == "extra_forbidden":
        if len(loc) == 1:
            message = f"unknown top-level key; allowed: {', '.join(TOP_LEVEL_KEYS)}"
        else:
            allowed = ", ".join(_SamplerModel.model_fields)
            message = f"unknown {loc[0]} option; allowed: {allowed}"
        value = _MISSING
    elif loc == ["sampler", "type"]:
        message = f"unknown sampler; choose one of {', '.join(SAMPLER_TYPES)}"
    else:
        message = err.get("msg", "invalid")
    return Problem(key, value, message, _line_of(lines, key))


def _parse_param(name: str, raw: Any, add) -> SearchParam | None:
    key = f"params.{name}"
    spec = TRIAL_PARAMS.get(name)
    if spec is None:
        add(key, _MISSING, _unknown_param(name))
        return None
    if not isinstance(raw, Mapping):
        hint = (
            "to fix a value for every trial, put it under fixed:"
            if not isinstance(raw, list)
            else f"write {{choices: {raw}}} for a list of values, or {{float: [low, high]}} / {{int: [low, high]}}"
        )
        add(key, raw, f"expected a mapping like {_example(spec)}; {hint}")
        return None
    unknown = [k for k in raw if k not in PARAM_KEYS]
    if unknown:
        add(f"{key}.{unknown[0]}", _MISSING, f"unknown option; allowed: {', '.join(PARAM_KEYS)}")
        return None
    kinds = [k for k in ("float", "int", "choices") if k in raw]
    if len(kinds) != 1:
        add(
            key,
            dict(raw),
            f"give exactly one of float: [low, high], int: [low, high], choices: [...]; e.g. {_example(spec)}",
        )
        return None
    kind = kinds[0]
    if kind == "choices":
        return _parse_choices(name, spec, raw, add)
    if (
        spec.type not in (int, float)
        or (kind == "float" and spec.type is int)
        or (kind == "int" and spec.type is float)
    ):
        add(f"{key}.{kind}", raw[kind], f"{name} is a {spec.type.__name__} parameter; write {_example(spec)}")
        return None
    bounds = raw[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        add(f"{key}.{kind}", bounds, f"expected [low, high]; e.g. {_example(spec)}")
        return None
    checked = []
    for which, value in zip(("low", "high"), bounds):
        if isinstance(value, bool) or not isinstance(value, int | float):
            add(f"{key}.{kind}", bounds, f"{which} must be a number; e.g. {_example(spec)}")
            return None
        if kind == "int" and not float(value).is_integer():
            add(f"{key}.{kind}", bounds, f"{which} must be an integer")
            return None
        try:
            checked.append(spec.check(value, key=key))
        except TrialConfigError:
            add(f"{key}.{kind}", bounds, f"{which} = {value!r} is outside {name}'s domain: {spec.domain()}")
            return None
    low, high = checked
    if low > high:
        add(f"{key}.{kind}", bounds, f"low > high; write [{high}, {low}]")
        return None
    if low == high:
        add(f"{key}.{kind}", bounds, f"low == high searches nothing; put {name}: {low} under fixed:")
        return None
    log = raw.get("log", False)
    if not isinstance(log, bool):
        add(f"{key}.log", log, "expected true or false")
        return None
    if log and low <= 0:
        add(f"{key}.{kind}", bounds, f"a log range needs low > 0 (got {low}); raise low or drop log: true")
        return None
    step = raw.get("step")
    if step is not None:
        if log:
            add(f"{key}.step", step, "Optuna cannot combine log: true with step; drop one of them")
            return None
        ok = isinstance(step, int) if kind == "int" else isinstance(step, int | float)
        if isinstance(step, bool) or not ok or step <= 0:
            add(f"{key}.step", step, f"expected a positive {'integer' if kind == 'int' else 'number'}")
            return None
        if step > high - low:
            add(f"{key}.step", step, f"larger than the range {high - low}; nothing would be searched")
            return None
    return SearchParam(name, kind, low=low, high=high, log=log, step=step)


def _parse_choices(name: str, spec: ParamSpec, raw: Mapping[str, Any], add) -> SearchParam | None:
    key = f"params.{name}"
    for extra in ("log", "step"):
        if extra in raw:
            add(f"{key}.{extra}", raw[extra], "only ranges (float:/int:) take log/step, not choices")
            return None
    values = raw["choices"]
    if not isinstance(values, list) or not values:
        add(f"{key}.choices", values, f"expected a non-empty list of values ({spec.domain()})")
        return None
    checked = []
    for i, value in enumerate(values):
        try:
            checked.append(spec.check(value, key=f"{key}.choices[{i}]"))
        except TrialConfigError:
            add(f"{key}.choices", values, f"{value!r} (item {i}) is not allowed; expected {spec.domain()}")
            return None
    if len(set(map(repr, checked))) != len(checked):
        add(f"{key}.choices", values, "a value is listed twice")
        return None
    if len(checked) == 1:
        add(f"{key}.choices", values, f"one choice searches nothing; put {name}: {checked[0]!r} under fixed:")
        return None
    return SearchParam(name, "choices", choices=tuple(checked))


def _unknown_param(name: str) -> str:
    close = difflib.get_close_matches(name, list(TRIAL_PARAMS), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown parameter; {hint}known: {', '.join(TRIAL_PARAMS)}"


def _example(spec: ParamSpec) -> str:
    if spec.type is float:
        return (
            "{float: [0.001, 0.05], log: true}"
            if spec.name != "lr"
            else "{float: [1.0e-5, 1.0e-3], log: true}"
        )
    if spec.type is int:
        return "{int: [2, 8]}"
    if spec.choices:
        return "{choices: [" + ", ".join(spec.choices[:2]) + "]}"
    if spec.type is bool:
        return "{choices: [false, true]}"
    return "{choices: [" + '"' + ",".join(GROUPS) + '", whitening]}'


def _check_consistency(params: Mapping[str, SearchParam], fixed: Mapping[str, Any], add) -> None:
    """Whole-config checks: searched parameters that cannot matter, and configs a trial would reject."""

    def value(name: str) -> Any:
        return fixed.get(name, TRIAL_PARAMS[name].default)

    if "groups" not in params:
        compressed = set(str(value("groups")).split(","))
        for name in params:
            group = name.rpartition("_")[2]
            if TRIAL_PARAMS[name].inherits and group in GROUPS and group not in compressed:
                add(
                    f"params.{name}",
                    _MISSING,
                    f"searched, but groups = {value('groups')!r} does not compress {group}: it has no effect",
                )
    if "prune_mode" not in params and value("prune_mode") == "none":
        for name in params:
            if name == "threshold" or name.startswith("threshold_"):
                add(f"params.{name}", _MISSING, "searched, but prune_mode = 'none': it has no effect")
    if "quant_mode" not in params and value("quant_mode") == "none":
        for name in params:
            if name in ("bits", "scale", "kmeans_rate") or name.startswith(
                ("bits_", "scale_", "kmeans_rate_")
            ):
                add(f"params.{name}", _MISSING, "searched, but quant_mode = 'none': it has no effect")
    # The extremes of every range together, as a trial would read them.
    for corner in (0, 1):
        config = dict(fixed) | {n: p.corners()[corner] for n, p in params.items()}
        try:
            resolve_params(config, source="search space")
        except TrialConfigError as exc:
            add(exc.key, exc.value, exc.allowed)
            return
