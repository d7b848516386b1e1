"""Recipes: one typed YAML schema for every unlearning pipeline, loaded and checked (the runner: :mod:`.runner`).

A recipe names a base model, input adapters (the model that holds the knowledge is base + K),
data entries, and steps; each step trains an adapter with an objective, estimates PerTA
importance, applies an arithmetic operation, or fits a scope detector for an adapter (saved
beside it: scoped forgetting), and is referred to by name by later steps
(``name`` or ``name:SCALE`` for adapters stacked under a training run, key ``over``). ``output`` names the
step whose adapter is the result. Everything is checked before the first step runs: unknown
keys, methods, streams, parameters and references fail with the list of valid ones.

    lora-unlearn run recipes/tv.yaml --out runs/tv --set steps.0.train.config.epochs=3
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

OPS = ("negate", "scale", "extrapolate", "add", "compress", "perta_b", "perta_dense")
OP_PARAMS = {"negate": {"lam"}, "scale": {"c"}, "extrapolate": {"alpha"}, "add": set(), "compress": {"rank"},
             "perta_b": {"beta", "eps", "p"}, "perta_dense": {"beta", "eps", "p", "rank"}}
OP_ARITY = {"negate": 1, "scale": 1, "extrapolate": 1, "compress": 1, "perta_b": 3, "perta_dense": 3}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataEntry(Strict):
    source: str | list[str]  # several sources are concatenated
    view: Literal["qa", "text", "edits_old", "edits_new"] = "qa"
    limit: int | None = Field(default=None, ge=1)
    # Sources (e.g. evaluation sets) whose prompts and subjects these rows must not repeat or mention: rows
    # that do are left out (a preservation pool kept clear of what a benchmark measures).
    clear_of: list[str] = []


class BaseSpec(Strict):
    model: str = "smollm2-135m"
    quantization: Literal["nf4", "int8", "none"] = "nf4"


class TrainSpec(Strict):
    objective: str = "nll"
    data: dict[str, str]
    over: list[str] = []  # frozen adapters underneath ("on" would be YAML 1.1's boolean true)
    params: dict[str, Any] = {}
    config: dict[str, Any] = {}
    # Optimizer steps at which the adapter is also kept (OUT/snapshots/STEP/step-N): a length sweep
    # (select STEP.steps) reads one long run at several lengths instead of retraining per length.
    snapshots: list[int] = []

    @field_validator("snapshots")
    @classmethod
    def _positive_steps(cls, v: list[int]) -> list[int]:
        if any(isinstance(n, bool) or n < 1 for n in v):
            raise ValueError(f"snapshots must be optimizer steps >= 1, got {v}")
        return sorted(set(v))


class ImportanceSpec(Strict):
    adapter: str
    data: str
    kind: Literal["grad", "fisher"] = "grad"
    space: Literal["b", "dense"] = "b"
    at: Literal["theta", "theta+tau", "theta_0"] = "theta"
    accumulate: Literal["per_example", "set"] = "per_example"
    over: list[str] = []
    batch_size: int = Field(default=1, ge=1)
    rows_per_pass: int = Field(default=8, ge=1)


class ScopeSpec(Strict):
    """A scope detector for an adapter (:mod:`lora_unlearn.core.scope`), saved beside it.

    ``data``: the forget data (its questions are the bank); ``calibrate``: held-out prompts that must
    stay out of scope (``calibrate_rows`` slices it, e.g. "360:400"), unless ``threshold`` is given;
    ``background``: data entries that must stay out of scope, questions and answers (the prompts of
    the vendored preservation pool and its factual questions, ``preservation+facts``, always are).
    """

    adapter: str
    data: str
    calibrate: str | None = None
    calibrate_rows: str | None = Field(default=None, pattern=r"^-?\d*:-?\d*$")
    background: list[str] = []
    answers: bool = False
    fpr: float = Field(default=0.02, gt=0, lt=1)
    threshold: float | None = Field(default=None, ge=0, le=1)
    lambda_max: float = Field(default=1.0, gt=0, le=8.0)  # within the server's default --max-strength
    mode: Literal["hard", "smooth"] = "hard"
    ramp: float = Field(default=0.1, gt=0)
    layer: int = Field(default=4, ge=1)
    top_k: int = Field(default=3, ge=1)


class OpSpec(Strict):
    name: Literal["negate", "scale", "extrapolate", "add", "compress", "perta_b", "perta_dense"]
    inputs: list[str]
    params: dict[str, Any] = {}


class Step(Strict):
    name: str
    train: TrainSpec | None = None
    importance: ImportanceSpec | None = None
    op: OpSpec | None = None
    scope: ScopeSpec | None = None

    @model_validator(mode="after")
    def _one_action(self):
        given = [k for k in ("train", "importance", "op", "scope") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"step {self.name!r} needs exactly one of train, importance, op, scope "
                             f"(got {given or 'none'})")
        return self

    @property
    def produces(self) -> str:
        if self.scope is not None:
            return "scope"
        return "importance" if self.importance is not None else "adapter"


class Recipe(Strict):
    name: str
    description: str = ""
    reference: str = ""
    base: BaseSpec = BaseSpec()
    tofu_dir: str | None = None
    adapters: dict[str, str] = {}
    data: dict[str, DataEntry] = {}
    train_defaults: dict[str, Any] = {}
    steps: list[Step]
    output: str


# ---- loading and validation -------------------------------------------------------------------

def _valid_keys(cls: Any, loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` inside ``cls`` (for 'unknown key' messages)."""
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        hints = typing.get_type_hints(cls) if isinstance(cls, type) and issubclass(cls, BaseModel) else {}
        hint = hints.get(part)
        cls = None
        for candidate in (hint, *typing.get_args(hint)):
            for inner in (candidate, *typing.get_args(candidate)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _explain(e: ValidationError, where: str) -> UserError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(Recipe, err["loc"][:-1])
        return UserError(f"{where}: unknown key {loc!r}. Valid keys there: {', '.join(valid)}")
    if err["type"] == "literal_error":
        return UserError(f"{where}: {loc}: {err['msg']} (got {err['input']!r})")
    return UserError(f"{where}: {loc or 'recipe'}: {err['msg']}")


def _set(tree: Any, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = tree
    for part in path:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (``key.sub=value``, value parsed as YAML) and validate a recipe."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist (see recipes/ for the shipped ones)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of name, steps, output, ... (see recipes/tv.yaml)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. steps.0.train.config.epochs=3")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                            "quote it, e.g. --set 'name=\"my name\"'") from None
        try:
            _set(raw, key, parsed)
        except (ValueError, IndexError, TypeError, AttributeError):
            raise UserError(f"--set {item!r}: {key} is not a path into this recipe") from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise _explain(e, str(path)) from None
    check(recipe, str(path))
    return recipe


def split_ref(spec: str) -> tuple[str, float]:
    name, sep, scale = spec.partition(":")
    try:
        return name, float(scale) if sep else 1.0
    except ValueError:
        raise UserError(f"adapter reference {spec!r}: expected NAME or NAME:SCALE") from None


def _finite_params(where: str, params: dict[str, Any]) -> None:
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: {key} must be a finite number, got {value!r}")


def check(recipe: Recipe, where: str = "recipe") -> None:
    """Semantic checks: references, objectives, streams, parameters. Nothing runs before these pass."""
    from . import objectives
    from .trainer import TrainConfig

    kinds = {name: "adapter" for name in recipe.adapters}
    config_keys = set(TrainConfig.__dataclass_fields__) - {"objective", "extra"}

    def need(ref: str, kind: str, at: str) -> None:
        name = split_ref(ref)[0]
        if name not in kinds:
            raise UserError(f"{where}: {at} refers to {name!r}, which is not an input adapter or an earlier step. "
                            f"Available: {', '.join(kinds) or 'none'}")
        if kinds[name] != kind:
            raise UserError(f"{where}: {at} needs an {kind} but {name!r} is an {kinds[name]}")

    def need_data(name: str, at: str) -> None:
        if name not in recipe.data:
            raise UserError(f"{where}: {at} uses data {name!r}, not defined under data. "
                            f"Available: {', '.join(recipe.data) or 'none'}")

    for key in recipe.train_defaults:
        if key not in config_keys:
            raise UserError(f"{where}: unknown training setting train_defaults.{key}. Available: {', '.join(sorted(config_keys))}")
    for i, step in enumerate(recipe.steps):
        at = f"steps.{i} ({step.name})"
        if step.name in kinds:
            raise UserError(f"{where}: {at}: the name {step.name!r} is already used")
        if step.train:
            objective = objectives.get(step.train.objective)
            objective.select_streams({s: [None] for s in step.train.data})
            unknown = sorted(set(step.train.data) - set(objective.streams) - set(objective.optional))
            if unknown:
                raise UserError(f"{where}: {at}: objective {objective.name!r} has no data stream {unknown[0]!r}. "
                                f"Available: {', '.join(objective.streams + objective.optional)}")
            objective.resolve_params(step.train.params)
            for key in step.train.config:
                if key not in config_keys:
                    raise UserError(f"{where}: {at}: unknown training setting {key!r}. Available: {', '.join(sorted(config_keys))}")
            for stream, name in step.train.data.items():
                need_data(name, f"{at} stream {stream}")
            for ref in step.train.over:
                need(ref, "adapter", at)
        elif step.scope:
            need(step.scope.adapter, "adapter", at)
            for name in [step.scope.data, *([step.scope.calibrate] if step.scope.calibrate else []),
                         *step.scope.background]:
                need_data(name, at)
            if step.scope.calibrate is None and step.scope.threshold is None:
                raise UserError(f"{where}: {at}: a scope needs calibrate (held-out prompts that must stay out of "
                                "scope, e.g. tofu-mini:retain with calibrate_rows 360:400) or a threshold in [0, 1]")
        elif step.importance:
            need(step.importance.adapter, "adapter", at)
            need_data(step.importance.data, at)
            for ref in step.importance.over:
                need(ref, "adapter", at)
        else:
            op = step.op
            arity = OP_ARITY.get(op.name)
            if arity is not None and len(op.inputs) != arity or (arity is None and len(op.inputs) < 2):
                raise UserError(f"{where}: {at}: {op.name} takes {arity or 'two or more'} inputs, got {len(op.inputs)}")
            for j, ref in enumerate(op.inputs):
                need(ref, "importance" if op.name.startswith("perta") and j > 0 else "adapter", at)
            unknown = set(op.params) - OP_PARAMS[op.name]
            if unknown:
                raise UserError(f"{where}: {at}: {op.name} has no parameter {', '.join(sorted(unknown))}. "
                                f"Available: {', '.join(sorted(OP_PARAMS[op.name])) or 'none'}")
            _finite_params(f"{where}: {at}", op.params)
        kinds[step.name] = step.produces
    if kinds.get(recipe.output) != "adapter":
        raise UserError(f"{where}: output {recipe.output!r} must name a step or input that makes an adapter")
