"""Sweep files (``tune_jobs/*.yaml``): pydantic models validated at the boundary. Pure: no Ray here.

A sweep names its **grid axes** (``datasets`` × ``splits`` × ``split_seeds``; every sampled
configuration runs on every combination, a *group*), the trial budget (``eval``: EvalConfig fields
fixed for every trial), and a **search space** whose sections map one-to-one onto the core's frozen
config dataclasses, keyed by their field names::

    space:
      fgts_cdb:  {eta: {choice: [0.25, 1, 4]}, step_size: {loguniform: [0.02, 0.5]}, ...}  # FGTSConfig
      weighting: {name: {choice: [perf, perf_cost]}, beta: {loguniform: [1, 30]}, ...}       # WeightingConfig
      embedding: {encoder: {choice: [base, ccft]}}                                           # EmbeddingChoice

``fixed`` holds constant values in the same sections. ``objective`` (optional) scores the trials by
progressive validation on logged duels instead of replay regret (:class:`ObjectiveSpec`). Every key is checked against the dataclass's
fields and every candidate value against its validation (:func:`load_sweep` raises a
:class:`ConfigError` that names the bad key), so a typo fails before Ray starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from ray_router.config import StrictModel, config_dataclass, field_names, parse
from ray_router.embeddings.spec import EncoderSpec
from ray_router.errors import ConfigError
from ray_router.yamlio import deep_merge

DIST_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint", "quniform")


@config_dataclass
class EmbeddingChoice:
    """Which query embeddings a trial uses: ``base`` (the general-purpose encoder) or ``ccft`` (the
    encoder fine-tuned on the group's offline split; one artifact per dataset, split and split seed)."""

    encoder: Literal["base", "ccft"] = "base"


def section_classes() -> dict[str, type]:
    """The config class behind each ``space`` / ``fixed`` section (imported lazily: cheap either way)."""
    from ray_router.embeddings.model_embeddings import WeightingConfig
    from ray_router.policies.fgts_cdb import FGTSConfig

    return {"fgts_cdb": FGTSConfig, "weighting": WeightingConfig, "embedding": EmbeddingChoice}


# EvalConfig fields a sweep may fix in ``eval``; the others come from the grid axes (split fields),
# the ``weighting`` section (weighting fields) or the trial itself (policies, policy_configs).
EVAL_FIELDS = ("n_rounds", "n_seeds", "base_seed", "cost_weight", "kappa", "use_pairwise_labels")
_EVAL_ELSEWHERE = {
    "split": "the `splits` grid axis",
    "offline_fraction": "the `splits` grid axis",
    "k_per_category": "the `splits` grid axis",
    "held_out": "the `splits` grid axis",
    "split_seed": "the `split_seeds` grid axis",
    "weighting": "space/fixed `weighting.name`",
    "weighting_beta": "space/fixed `weighting.beta`",
    "weighting_tau": "space/fixed `weighting.top_tau`",
    "weighting_cost_weight": "space/fixed `weighting.cost_weight`",
    "policies": "the sweep (it tunes fgts_cdb)",
    "policy_configs": "space/fixed `fgts_cdb`",
}


@contextmanager
def _located(where: str) -> Iterator[None]:
    """A ConfigError raised inside names ``where`` (the place in the sweep file) first."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def typed_values(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` (fields of the config class ``cls``) after the class's own validation, with the
    class's types (``1`` for a float field is ``1.0``); a ConfigError naming ``where`` otherwise."""
    with _located(where):
        config: Any = parse(cls, values, where=where)
    return {k: getattr(config, k) for k in values}


# ------------------------------------------------------------------------------ axes
class DatasetSpec(StrictModel):
    """One value of the ``datasets`` axis. A plain string is ``{name: <string>}``."""

    name: str = Field(min_length=1, description="routerbench, routerdc, mixinstruct, or a file path")
    label: str | None = Field(None, description="name in results (default: name, or the file stem)")
    subsample: int = Field(0, ge=0, description=">0: a stratified sample of this many queries")
    subsample_seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (load_dataset)")
    optional: bool = Field(False, description="skip this dataset (with a message) when its files are missing")

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        return Path(self.name).stem if ("/" in self.name or "." in self.name) else self.name


class SplitSpec(StrictModel):
    """One value of the ``splits`` axis. A plain string is ``{split: <string>}``."""

    split: Literal["stratified", "k_per_category", "holdout"]
    offline_fraction: float = Field(0.2, gt=0, lt=1)
    k_per_category: int = Field(5, ge=1)
    held_out: str | dict[str, str] = Field(
        "smallest", description="holdout: a category or 'smallest' (of each dataset), or {dataset label: one of those}"
    )

    def held_out_for(self, dataset: str) -> str:
        if isinstance(self.held_out, str):
            return self.held_out
        return self.held_out.get(dataset, "smallest")

    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.split


# --------------------------------------------------------------------------- search
class SchedulerSpec(StrictModel):
    """``asha``: asynchronous successive halving over ``rounds_played`` (per group: a trial competes only
    with trials of its own dataset, split and split seed); ``fifo``: run every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(200, ge=1, description="rounds before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, ge=1)


class ResourcesSpec(StrictModel):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class SearchSpec(StrictModel):
    num_samples: int = Field(8, ge=1, description="sampled configurations; each runs on every group")
    seed: int = Field(0, description="seed of the random search (the same file samples the same configs)")
    report_every: int = Field(100, ge=1, description="report cumulative regret every N rounds")
    scheduler: SchedulerSpec = SchedulerSpec()
    resources_per_trial: ResourcesSpec = ResourcesSpec()
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the CPUs allow")
    blas_threads: int = Field(1, ge=1, description="BLAS threads inside a trial")


class ReportSpec(StrictModel):
    seeds: int = Field(5, ge=2, description="fresh seeds for the re-run of the best and the default config")
    base_seed: int = Field(1000, ge=0, description="first fresh seed (must not overlap the trials' seeds)")
    defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="the 'default' configuration (sections as in space); "
        "unset fields take the dataclass defaults, the sweep's fixed values apply",
    )
    top_params: int = Field(4, ge=1, description="hyperparameters plotted (the most important ones)")
    export_serve: bool = True
    serve_template: str = Field("serve_configs/local.yaml", description="relative to the repository root or absolute")


# ----------------------------------------------------------------------------- dists
Scalar = bool | int | float | str | None
Range = Annotated[list[float], Field(min_length=2, max_length=2)]  # [low, high]
IntRange = Annotated[list[int], Field(min_length=2, max_length=2)]
QRange = Annotated[list[float], Field(min_length=3, max_length=3)]  # [low, high, q]


class Dist(StrictModel):
    """One search-space entry: exactly one of the keys below (a bare scalar in YAML is a constant).

    ``choice: [..]`` random choice; ``grid: [..]`` every value (multiplies the trials);
    ``uniform / loguniform: [low, high]``; ``randint / lograndint: [low, high]`` (high exclusive);
    ``quniform: [low, high, q]``."""

    choice: list[Scalar] | None = Field(None, min_length=1)
    grid: list[Scalar] | None = Field(None, min_length=1)
    uniform: Range | None = None
    loguniform: Range | None = None
    randint: IntRange | None = None
    lograndint: IntRange | None = None
    quniform: QRange | None = None

    @model_validator(mode="after")
    def _one(self) -> Dist:
        set_ = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {list(DIST_KINDS)}, got {set_ or 'none'}")
        kind = set_[0]
        v = getattr(self, kind)
        if kind in ("uniform", "loguniform", "randint", "lograndint", "quniform"):
            if not v[0] < v[1]:
                raise ValueError(f"{kind}: low must be < high, got {v}")
            if kind.startswith("log") and v[0] <= 0:
                raise ValueError(f"{kind}: low must be > 0, got {v[0]}")
            if kind == "quniform" and v[2] <= 0:
                raise ValueError("quniform: q must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> list[Any]:
        """Values to validate against the config class: every listed value, or a range's ends (of
        the type Tune samples: a float for uniform, loguniform and quniform, else an int)."""
        a = self.args
        if self.kind in ("choice", "grid"):
            return list(a)
        if self.kind in ("randint", "lograndint"):
            return [a[0], a[1] - 1]
        return [a[0], a[1]]

    def is_numeric_range(self) -> bool:
        return self.kind not in ("choice", "grid")


# ------------------------------------------------------------------------- objective
DUEL_METRICS = {"log_loss": "min", "brier": "min", "accuracy": "max"}  # progressive-validation metric -> mode
# EvalConfig fields a duels objective has no use for (the log fixes the duels and their verdicts)
_EVAL_UNUSED_ON_DUELS = {
    "n_rounds": "the log sets the duels (objective.n_duels takes the first N)",
    "kappa": "the log's verdicts are given, no judge is simulated",
    "use_pairwise_labels": "the log's verdicts are given, no judge is simulated",
}


class ObjectiveSpec(StrictModel):
    """``objective: {duels: FILE, metric: log_loss}``: score each trial by **progressive validation**
    of FGTS.CDB on logged duels (``ray-router log export``; :mod:`ray_router.evaluation.progressive`)
    instead of replaying the datasets. The datasets and splits still build each trial's arm embeddings
    and offline prior (as ``evaluate --duels`` does); the log's arms must be among the table's."""

    duels: str = Field(min_length=1, description="the duel log (Parquet, `ray-router log export`); or --duels FILE")
    metric: Literal["log_loss", "brier", "accuracy"] = Field(
        "log_loss", description="log_loss and brier are minimised, accuracy (non-tied duels) maximised"
    )
    n_duels: int = Field(0, ge=0, description="use the first N duels of the log (0: all; resolved when it is read)")
    refresh_every: int = Field(1, ge=1, description="posterior refresh every N duels (1: after each)")
    any_encoder: bool = Field(False, description="score a log embedded by another encoder than the sweep's anyway")

    @property
    def mode(self) -> str:
        return DUEL_METRICS[self.metric]


# ----------------------------------------------------------------------------- sweep
class SweepSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=80)
    description: str = ""
    datasets: list[DatasetSpec] = Field(min_length=1)
    splits: list[SplitSpec] = Field(min_length=1)
    split_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    encoder: EncoderSpec = EncoderSpec()
    ccft: dict[str, Any] = Field(default_factory=dict, description="CCFTConfig fields")
    eval: dict[str, Any] = Field(default_factory=dict, description=f"EvalConfig fields {EVAL_FIELDS}")
    fixed: dict[str, dict[str, Any]] = Field(default_factory=dict)
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    search: SearchSpec = SearchSpec()
    report: ReportSpec = ReportSpec()
    smoke_test: dict[str, Any] = Field(default_factory=dict, description="overrides applied by --smoke-test")
    objective: ObjectiveSpec | None = Field(
        None, description="None: replay regret; {duels: FILE, metric}: progressive validation on logged duels"
    )

    @field_validator("datasets", mode="before")
    @classmethod
    def _ds(cls, v: Any) -> Any:
        return [{"name": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v

    @field_validator("splits", mode="before")
    @classmethod
    def _sp(cls, v: Any) -> Any:
        return [{"split": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _unique(self) -> SweepSpec:
        for what, keys in (
            ("dataset", [d.key for d in self.datasets]),
            ("split", [s.key for s in self.splits]),
            ("split seed", [str(s) for s in self.split_seeds]),
        ):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"duplicate {what} labels {dup}: give each a distinct `label`")
        return self

    # ----------------------------------------------------------- derived views
    @property
    def groups(self) -> list[tuple[str, str, int]]:
        """Every (dataset, split, split seed) combination, in file order."""
        return [(d.key, s.key, seed) for d in self.datasets for s in self.splits for seed in self.split_seeds]

    def dataset(self, key: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.key == key)

    def split(self, key: str) -> SplitSpec:
        return next(s for s in self.splits if s.key == key)

    def space_dists(self) -> dict[str, dict[str, Dist]]:
        """The sampled entries; listed values with their field's type (``1`` → ``1.0``)."""
        classes = section_classes()
        out: dict[str, dict[str, Dist]] = {}
        for sec, fields in self.space.items():
            for k, v in fields.items():
                d = _as_dist(v, f"space.{sec}.{k}")
                if d is None:
                    continue
                if d.kind in ("choice", "grid"):
                    typed = [typed_values(classes[sec], {k: x}, f"space.{sec}.{k}")[k] for x in d.args]
                    d = d.model_copy(update={d.kind: typed})
                out.setdefault(sec, {})[k] = d
        return out

    def space_constants(self) -> dict[str, dict[str, Any]]:
        classes = section_classes()
        return {
            sec: typed_values(classes[sec], {k: v for k, v in fields.items() if _as_dist(v) is None}, f"space.{sec}")
            for sec, fields in self.space.items()
        }

    def encoders_needed(self) -> set[str]:
        """The encoders (base / ccft) some trial or the report's default configuration can use. The
        base embeddings are always computed: the uniform reference of the report replays on them."""
        out = {"base"}
        for source in (
            self.space.get("embedding", {}),
            self.fixed.get("embedding", {}),
            self.report.defaults.get("embedding", {}),
        ):
            v = source.get("encoder")
            d = _as_dist(v, "embedding.encoder")
            out.update(d.candidates() if d is not None else ([v] if v is not None else []))
        return out

    def swept_keys(self) -> list[tuple[str, str]]:
        """(section, field) of every sampled or grid entry of the space."""
        return [(sec, k) for sec, fields in self.space_dists().items() for k in fields]

    @property
    def n_trials(self) -> int:
        """Trials of the sweep: samples × groups × the values of every ``grid`` entry of the space."""
        n = self.search.num_samples * len(self.groups)
        for fields in self.space_dists().values():
            for d in fields.values():
                if d.kind == "grid":
                    n *= len(d.args)
        return n

    @property
    def max_rounds(self) -> int:
        """Rounds a complete trial plays (all its seeds): ASHA's max_t. With a duels objective, the
        duels it predicts over all its seeds (0 until the log was read: ``objective.n_duels`` = 0)."""
        ev = eval_config(self.eval)
        if self.objective is not None:
            return self.objective.n_duels * ev.n_seeds
        return ev.n_rounds * ev.n_seeds

    @property
    def metric(self) -> tuple[str, str]:
        """(the metric trials report and Tune optimises, its mode)."""
        if self.objective is not None:
            return self.objective.metric, self.objective.mode
        return "mean_regret", "min"


def _as_dist(v: Any, where: str = "space") -> Dist | None:
    """A space entry as a :class:`Dist` (None for a constant); a ConfigError naming ``where``."""
    if isinstance(v, Dist):
        return v
    if isinstance(v, Mapping):
        return parse(Dist, v, where=where)
    return None


# ------------------------------------------------------------------------ validation
def eval_config(values: Mapping[str, Any], where: str = "eval") -> Any:
    """The EvalConfig a sweep's ``eval`` fixes (its other fields at their defaults)."""
    from ray_router.evaluation.experiment import EvalConfig

    for key in values:
        if key in _EVAL_ELSEWHERE:
            raise ConfigError(f"{where}.{key}: not set here; it comes from {_EVAL_ELSEWHERE[key]}")
        if key not in EVAL_FIELDS:
            raise ConfigError(
                f"{where}.{key}: not a field of EvalConfig that a sweep fixes; use one of {list(EVAL_FIELDS)}"
            )
    with _located(where):
        return parse(EvalConfig, values, where=where)


def _check_entry(cls: type, where: str, key: str, value: Any, allow_dists: bool) -> None:
    """One ``space``/``fixed`` entry: a field of ``cls`` whose every candidate value ``cls`` accepts."""
    names = field_names(cls)
    if key not in names:
        raise ConfigError(f"{where}: not a field of {cls.__name__}; fields: {list(names)}")
    dist = _as_dist(value, where)
    if dist is not None and not allow_dists:
        raise ConfigError(f"{where}: fixed values must be plain values, not {dist.kind}")
    hint = f" (a {dist.kind} range end)" if dist is not None and dist.is_numeric_range() else ""
    for candidate in dist.candidates() if dist is not None else [value]:
        typed_values(cls, {key: candidate}, f"{where} = {candidate!r}{hint}")


def check_sections(where: str, sections: Mapping[str, Any], allow_dists: bool) -> None:
    """Every section is a config class and every key one of its fields; every value (each choice, or
    a range's ends) passes the class's validation. Raises ConfigError naming ``where.section.key``."""
    classes = section_classes()
    if not isinstance(sections, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections {sorted(classes)}")
    for sec, fields in sections.items():
        if sec not in classes:
            hint = " (EvalConfig fields are fixed in the top-level `eval`)" if sec == "eval" else ""
            raise ConfigError(f"{where}.{sec}: unknown section; use one of {sorted(classes)}{hint}")
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{where}.{sec}: expected a mapping of {classes[sec].__name__} fields")
        for key, value in fields.items():
            _check_entry(classes[sec], f"{where}.{sec}.{key}", key, value, allow_dists)


def ccft_config(values: Mapping[str, Any]) -> Any:
    """The CCFTConfig of the sweep's ``ccft`` section."""
    from ray_router.embeddings.ccft import CCFTConfig

    with _located("ccft"):
        return parse(CCFTConfig, values, where="ccft")


def _check_labels(spec: SweepSpec) -> None:
    labels = {d.key for d in spec.datasets}
    for i, sp in enumerate(spec.splits):
        if isinstance(sp.held_out, dict):
            unknown = sorted(set(sp.held_out) - labels)
            if unknown:
                raise ConfigError(
                    f"splits.{i}.held_out.{unknown[0]}: not a dataset of this sweep; datasets: {sorted(labels)}"
                )


def _check_budget(spec: SweepSpec) -> None:
    """Fresh report seeds, and report/ASHA points inside a trial's rounds."""
    ev = eval_config(spec.eval)
    trial_seeds = set(ev.seeds)
    fresh = set(range(spec.report.base_seed, spec.report.base_seed + spec.report.seeds))
    if trial_seeds & fresh:
        raise ConfigError(
            f"report.base_seed: the report's seeds {sorted(fresh)} overlap the trials' seeds "
            f"{sorted(trial_seeds)}; the re-run must use fresh seeds"
        )
    if spec.objective is not None and spec.objective.n_duels == 0:
        return  # the log's length is known once it is read (ray_router.tune.duels.resolve_objective)
    if spec.search.report_every > spec.max_rounds:
        raise ConfigError(
            f"search.report_every = {spec.search.report_every} exceeds the rounds of a trial ({spec.max_rounds})"
        )
    if spec.search.scheduler.type == "asha" and spec.search.scheduler.grace_period >= spec.max_rounds:
        raise ConfigError(
            f"search.scheduler.grace_period = {spec.search.scheduler.grace_period} must be below the "
            f"rounds of a trial ({spec.max_rounds})"
        )


def _check_objective(spec: SweepSpec) -> None:
    """A duels objective scores queries the log embedded with the base encoder: no CCFT embeddings,
    and no replay-only ``eval`` fields."""
    if spec.objective is None:
        return
    for key, why in _EVAL_UNUSED_ON_DUELS.items():
        if key in spec.eval:
            raise ConfigError(f"eval.{key}: not used with objective.duels: {why}")
    if "ccft" in spec.encoders_needed():
        raise ConfigError(
            "embedding.encoder: ccft cannot be scored on logged duels: the log's queries are embedded by the "
            "deployment's encoder (the sweep's base encoder); use base"
        )


def validate(spec: SweepSpec) -> SweepSpec:
    """Checks beyond the field types (see :func:`check_sections`)."""
    check_sections("space", spec.space, allow_dists=True)
    check_sections("fixed", spec.fixed, allow_dists=False)
    check_sections("report.defaults", spec.report.defaults, allow_dists=False)
    for sec, fields in spec.fixed.items():
        both = sorted(set(fields) & set(spec.space.get(sec, {})))
        if both:
            raise ConfigError(f"fixed.{sec}.{both[0]}: also in space; keep it in one place")
    eval_config(spec.eval)
    ccft_config(spec.ccft)
    _check_objective(spec)
    _check_labels(spec)
    _check_budget(spec)
    return spec


# ---------------------------------------------------------------------------- loading
def parse_sweep(
    raw: Mapping[str, Any], smoke_test: bool = False, where: str = "sweep", duels: str | Path | None = None
) -> SweepSpec:
    """Validate a sweep mapping; ``smoke_test`` applies its ``smoke_test`` overrides first (the run
    name gets a ``-smoke`` suffix so a smoke run never resumes a real one). ``duels``: a duel log that
    replaces (or sets) ``objective.duels`` (the file is read later, by the sweep)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = dict(raw)
    if smoke_test:
        overrides = data.get("smoke_test") or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}: smoke_test must be a mapping of overrides")
        data = deep_merge(data, overrides)
        data["name"] = f"{data.get('name', 'sweep')}-smoke"
    if duels is not None:
        objective = data.get("objective")
        data["objective"] = {**(objective if isinstance(objective, Mapping) else {}), "duels": str(duels)}
    spec = parse(SweepSpec, data, where=where)
    try:
        return validate(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_sweep(path: str | Path, smoke_test: bool = False, duels: str | Path | None = None) -> SweepSpec:
    """Read and validate a sweep YAML (see the module docstring); ``duels``: see :func:`parse_sweep`."""
    from ray_router.yamlio import load_yaml_file

    raw = load_yaml_file(path, "sweep file")
    return parse_sweep(raw, smoke_test=smoke_test, where=str(path), duels=duels)


# ------------------------------------------------------------------------- configs
def section_values(spec: SweepSpec, config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """A trial's values for one section: fixed values, then the sampled ones, with the field types."""
    values = {**spec.fixed.get(section, {}), **dict(config.get(section) or {})}
    return typed_values(section_classes()[section], values, section)


def default_config(spec: SweepSpec) -> dict[str, Any]:
    """The un-tuned configuration the report compares against: the sweep's fixed values, the
    config class's default of every swept field, and ``report.defaults`` on top."""
    classes = section_classes()
    out: dict[str, dict[str, Any]] = {}
    for sec, fields in spec.space.items():
        defaults: Any = parse(classes[sec], {}, where=sec)
        out[sec] = {k: getattr(defaults, k) for k in fields}
    for sec, fields in spec.report.defaults.items():
        out.setdefault(sec, {}).update(fields)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(text)).strip("_") or "x"
