"""The resolved config checked as a whole before a command runs anything (before Ray starts): the rules between
keys that ubt_ray.config's per-key checks cannot see, for the phases the command runs. Each rule is one sentence
naming the keys and the fix; a phase calls the rules it depends on too, for callers that skip `check_config`."""

from __future__ import annotations

import csv
import dataclasses

from .config import CompareConfig, Config, OverfitConfig, PrepareConfig, ScoreConfig, load_config
from .core.names import DENSITY_SCORES as SCORES, TRANSFORMS
from .errors import UserError
from .sweep_space import parse_space

DEFENSES = ("none", "ft", "cleanclip", "ubt")
FASHION_MNIST_CLASSES = 10


def check_config(cfg: Config, command: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Every rule of the phases `command` runs (a `ubt` subcommand; pipeline: those of pipeline.phases; compare:
    also those of the defenses on each attack config, loaded with the command line's `overrides` as compare
    loads them)."""
    check_phases(cfg, command_phases(cfg, command))
    if command == "pipeline":
        check_pipeline(cfg)
    if command == "compare":
        check_compare(cfg.compare)
        c = cfg.compare
        for path in c.attacks:
            attack = load_config([path, *c.layers], list(c.overrides) + list(overrides))
            check_phases(attack, defense_phases(attack, c.defenses))


def check_phases(cfg: Config, phases: set[str]) -> None:
    """The rules of `phases` (names of ubt's phases: prepare, poison, overfit, score, evaluate, sweep ...)."""
    if "prepare" in phases:
        check_prepare(cfg)
    if "poison" in phases:
        check_poison(cfg)
    if "overfit" in phases:
        check_overfit(cfg.overfit)
    if "score" in phases:
        check_score(cfg.score)
    if "evaluate" in phases:
        check_heldout(cfg)
    if "sweep" in phases:
        parse_space(cfg.sweep.space)


def command_phases(cfg: Config, command: str) -> set[str]:
    """The phases a `ubt` subcommand runs, as far as the config alone tells."""
    def defend() -> set[str]:
        d = cfg.defend
        return ({"overfit"} if d.overfit else set()) | {"score", "select", "unlearn"} \
            | ({"evaluate"} if d.evaluate else set())
    if command == "pipeline":
        return set().union(*(defend() if p == "defend" else {p} for p in cfg.pipeline.phases))
    return {"defend": defend, "baseline": lambda: {"baseline", "evaluate"},
            "sweep": lambda: {"sweep", "score", "evaluate"}}.get(command, lambda: {command})()


def defense_phases(cfg: Config, defenses: list[str]) -> set[str]:
    """The phases compare runs for `defenses` on one attack's config (UBT always with its evaluation)."""
    evaluated = dataclasses.replace(cfg, defend=dataclasses.replace(cfg.defend, evaluate=True))
    return set().union({"evaluate"}, *(command_phases(cfg, "baseline") if d in ("ft", "cleanclip") else
                                       command_phases(evaluated, "defend") if d == "ubt" else set()
                                       for d in defenses))


def check_prepare(cfg: Config) -> None:
    if cfg.prepare.source == "csv":
        check_csv_delimiter(cfg.prepare)
    if cfg.prepare.source == "fashion-mnist":
        check_fashion_mnist_classes(cfg)


def check_csv_delimiter(p: PrepareConfig) -> None:
    try:
        csv.reader([], delimiter=p.csv_delimiter)
    except TypeError:
        raise UserError(f"prepare.csv_delimiter {p.csv_delimiter!r} is not one character: set it to the CSV's "
                        f"delimiter, e.g. ',' or ';'.") from None


def check_fashion_mnist_classes(cfg: Config) -> None:
    if len(cfg.data.class_names) < FASHION_MNIST_CLASSES:
        raise UserError(f"data.class_names has {len(cfg.data.class_names)} names but Fashion-MNIST has 10 classes: "
                        f"give all 10 (or leave the default).")


def check_poison(cfg: Config) -> None:
    """The target label names a class, a caption can be written, and the trigger's parameters are its own."""
    from .core.triggers import needs_donors  # here, not at the top: torch is no part of `ubt config`'s start
    try:
        needs_donors(cfg.poison.attack, cfg.poison.params)  # checks every parameter of the attack's trigger
    except ValueError as e:
        raise UserError(str(e)) from None
    names, target = cfg.data.class_names, cfg.poison.target_label
    if target >= len(names):
        raise UserError(f"poison.target_label={target} has no class name (data.class_names has {len(names)}): "
                        f"pick a label below {len(names)} or add class names.")
    if cfg.poison.attack != "label_consistent" and not cfg.data.templates:
        raise UserError("data.templates is empty, so no poisoned caption can be written: give at least one template.")


def check_overfit(o: OverfitConfig) -> None:
    if o.prioritize == "weak_similarity" and o.subset_fraction >= 1:
        raise UserError("experimental.overfit.prioritize=weak_similarity picks the weakest rows of a subset, but "
                        "overfit.subset_fraction is 1: set it below 1 (e.g. 0.1).")


def check_score(s: ScoreConfig) -> None:
    """Refuse transform and portion lists the scorer cannot run, in one sentence."""
    bad = [t for t in s.transforms if t not in TRANSFORMS]
    if bad or len(set(s.transforms)) != len(s.transforms) or not (s.transforms or s.density):
        raise UserError(f"experimental.score.transforms={s.transforms} must name each of {', '.join(TRANSFORMS)} at "
                        f"most once, and at least one of them (or score.density at least one density score).")
    bad = [d for d in s.density if d not in SCORES]
    if bad or len(set(s.density)) != len(s.density):
        raise UserError(f"experimental.score.density={s.density} must name each of {', '.join(SCORES)} at most "
                        f"once ([] for none).")
    if s.density and s.method != "token_drop":
        raise UserError(f"score.density needs experimental.score.method=token_drop (the density scores are signals "
                        f"beside its drops), got experimental.score.method={s.method}: set "
                        f"experimental.score.density=[] or experimental.score.method=token_drop.")
    if s.density and s.reference_rows <= s.density_k:
        raise UserError(f"experimental.score.reference_rows={s.reference_rows} must exceed "
                        f"experimental.score.density_k={s.density_k}: a row needs k neighbours in the reference "
                        f"besides itself.")
    first_last = s.neighbour_ranks
    if len(first_last) != 2 or not 0 <= first_last[0] < first_last[1]:
        raise UserError(f"experimental.score.neighbour_ranks={first_last} must be two ranks [first, last] with "
                        f"0 <= first < last, e.g. [100, 400].")
    if not s.token_portions or any(not 0 < p <= 1 for p in s.token_portions):
        raise UserError(f"experimental.score.token_portions={s.token_portions} must be one or more shares of the "
                        f"image tokens in (0, 1], e.g. [0.015625, 0.0625].")
    if s.cpus_per_actor is not None and s.cpus_per_actor > 1 and s.cpus_per_actor != int(s.cpus_per_actor):
        raise UserError(f"experimental.score.cpus_per_actor={s.cpus_per_actor:g}: Ray reserves a fraction of one CPU "
                        f"or whole CPUs, so give a value up to 1 or a whole number (or leave it unset).")


def check_heldout(cfg: Config) -> None:
    """The held-out prompt set, when there is one, names one class per data.class_names entry."""
    ev = cfg.evaluate
    if ev.heldout_class_names and ev.heldout_templates and len(ev.heldout_class_names) != len(cfg.data.class_names):
        raise UserError(f"evaluate.heldout_class_names has {len(ev.heldout_class_names)} names but data.class_names "
                        f"has {len(cfg.data.class_names)}: give one held-out name per class, in the same order "
                        f"(or [] to skip held-out CA).")


def check_compare(c: CompareConfig) -> None:
    bad = [d for d in c.defenses if d not in DEFENSES]
    if bad or not c.defenses:
        raise UserError(f"compare.defenses={c.defenses} must be some of {', '.join(DEFENSES)}.")
    if not c.attacks:
        raise UserError("compare.attacks is empty: list attack configs, e.g. [configs/attacks/badnet.yaml].")


def check_pipeline(cfg: Config) -> None:
    """An evaluate in pipeline.phases has a model to evaluate: one trained before it, or model.checkpoint."""
    trained = cfg.model.checkpoint is not None
    for phase in cfg.pipeline.phases:
        trained = trained or phase == "train"
        if phase == "evaluate" and not trained:
            raise UserError("pipeline.phases evaluates but nothing trained a model and model.checkpoint is "
                            "null: add train to pipeline.phases or set model.checkpoint.")
