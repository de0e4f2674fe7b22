"""`ubt`: one console script whose subcommands are the pipeline's phases.

    ubt prepare fashion-mnist --config configs/quickstart.yaml run.output_dir=/tmp/x
    ubt config --config configs/quickstart.yaml unlearn.num_samples=150   # print the resolved config
    ubt config --keys [--all]    # the user-facing keys with their help (--all: the experimental ones too)
    ubt plan --defense DIR --rows 3000000 --gpus 8   # a finished defense's time and cost at another size

What a command shows: on stderr, a line as each phase starts and ends and progress for the long ones (Ray's own
logs only with -v); on stdout, last, the path of the full summary (JSON, saved under the command's output) and a
table of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .checks import check_config
from .config import SOURCES, Config, describe, load_config, save_config
from . import console, storage
from .errors import UserError, find_user_error
from .report import plain_table

SUMMARY_FILE = "summary.json"
SUMMARY_LINE = "summary: "  # the stdout line that names the summary file (tests and benchmarks read it)


@dataclass
class Outcome:
    """What a command hands back: its full summary, the folder the summary is saved in (the command's output),
    and the table a person reads (None: the summary's plain values, one a line)."""
    summary: dict
    folder: str
    table: str | None = None


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def _prepare(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.prepare import prepare
    result = prepare(cfg)
    return Outcome({"output": result.output, **{f"{k}_rows": v.rows_out for k, v in result.splits.items()},
                    "rows_out": result.rows.rows_out, "rows_rejected": result.rows.rows_rejected}, result.output)


def _poison(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.poison import cli_poison
    summary = cli_poison(cfg, args)
    return Outcome(summary, summary["output"])


def _train(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.train import train
    return _fit_outcome(train(cfg))


def _evaluate(cfg: Config, args: argparse.Namespace) -> Outcome:
    from . import storage
    from .phases.evaluate import cli_evaluate
    trained = storage.join(cfg.train.output, "model")
    if args.model is None and cfg.model.checkpoint is None:
        if not storage.exists(trained, cfg.storage):
            raise UserError(f"nothing to evaluate: pass --model PATH, set model.checkpoint, or run `ubt train` "
                            f"first (it writes {trained}).")
        args.model = trained
    return Outcome(cli_evaluate(cfg, args), cfg.evaluate.output)


def _fit_summary(r) -> dict:
    return {"model": r.model, "steps": r.steps, "samples": r.samples, "resumed_from_step": r.resumed_from_step,
            "final_loss": r.metrics.get("loss"), "wall_time_s": round(r.wall_time_s, 1)}


def _fit_outcome(r) -> Outcome:
    return Outcome(_fit_summary(r), _parent(r.model))


def _overfit(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.overfit import overfit
    return _fit_outcome(overfit(cfg, cfg.defend.model, cfg.defend.data))


def _score(cfg: Config, args: argparse.Namespace) -> Outcome:
    from . import storage
    from .phases.score import score
    model = args.model or (storage.join(cfg.overfit.output, "model") if cfg.defend.overfit else cfg.defend.model)
    r = score(cfg, model, cfg.defend.data, k=cfg.unlearn.num_samples)
    return Outcome({"table": r.table, "model": model, "rows_in": r.rows.rows_in, "rows_out": r.rows.rows_out,
                    "rows_rejected": r.rows.rows_rejected, "detection": r.detection,
                    "wall_time_s": round(r.wall_time_s, 1)}, _parent(r.table))


def _select(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.select import select
    r = select(cfg, cfg.score.output, cfg.defend.data, k=cfg.unlearn.num_samples)
    return Outcome({"forget": r.forget, "retain": r.retain, **r.stats, "wall_time_s": round(r.wall_time_s, 1)},
                   _parent(r.forget))


def _unlearn(cfg: Config, args: argparse.Namespace) -> Outcome:
    from . import storage
    from .phases.select import FORGET, RETAIN
    from .phases.unlearn import unlearn
    sel = cfg.select.output
    return _fit_outcome(unlearn(cfg, cfg.defend.model, storage.join(sel, FORGET), storage.join(sel, RETAIN)))


def _defend(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.defend import defend
    from .report import before_after_table
    r = defend(cfg)
    table = before_after_table(r.report)
    if r.report.get("reused"):
        console.log.info(f"reused the finished defense in {r.output} (same model, data and settings; "
                         f"experimental.pipeline.reuse=false runs it again)")
    return Outcome({"cleaned_model": r.model, "report": r.output, "before": r.report["before"],
                    "after": r.report["after"], "detection": r.report["detection"],
                    "defense_wall_time_s": r.report["defense_wall_time_s"], "reused": bool(r.report.get("reused"))},
                   r.output, f"cleaned model: {r.model}\n{table}")


def _baseline(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.baseline import baseline
    r = baseline(cfg, args.kind, args.model)
    ev = r.evaluation
    if r.reused:
        console.log.info(f"reused the finished baseline in {cfg.baseline.output}/{r.kind} (same model, data and "
                         f"settings; experimental.pipeline.reuse=false runs it again)")
    return Outcome({"baseline": r.kind, "model": r.model, "clean_rows": r.clean_rows,
                    "clean_samples": r.clean_samples, "steps": r.fit.steps,
                    "clean_accuracy": ev.clean_accuracy if ev else None,
                    "attack_success_rate": ev.attack_success_rate if ev else None,
                    "wall_time_s": round(r.wall_time_s, 1), "reused": r.reused}, _parent(r.model))


def _compare(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.compare import compare
    from .report import comparison_markdown
    r = compare(cfg, args.overrides)
    return Outcome({"output": r.output, "rows": r.rows}, r.output, comparison_markdown(r.rows))


def _sweep(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .phases.sweep import sweep
    r = sweep(cfg)
    if r.interrupted:
        return Outcome({"output": r.output, "interrupted": True, "resumed": r.resumed}, r.output)
    best = {k: r.best[k] for k in ("trial_id", "clean_accuracy", "attack_success_rate", "objective")}
    return Outcome({"output": r.output, "trials": len(r.rows),
                    "finished": sum(x["status"] == "finished" for x in r.rows), "best": best,
                    "best_model": f"{r.output}/best/model", "resumed": r.resumed,
                    "wall_time_s": round(r.wall_time_s, 1)}, r.output, r.table)


def _pipeline(cfg: Config, args: argparse.Namespace) -> Outcome:
    from .pipeline import format_summary, run_pipeline
    summary = run_pipeline(cfg).summary
    return Outcome(summary, cfg.run.output_dir, format_summary(summary))


def report(outcome: Outcome, cfg: Config) -> None:
    """Save the full summary under the command's output and print its path, then the result table (last)."""
    uri = storage.join(outcome.folder, SUMMARY_FILE)
    storage.write_json(uri, outcome.summary, cfg.storage)
    print(f"{SUMMARY_LINE}{uri}")
    print(outcome.table if outcome.table is not None else plain_table(outcome.summary), flush=True)


def _plan(cfg: Config, args: argparse.Namespace) -> None:
    """`ubt plan`: the finished defense under --defense at --rows rows on the given cluster (plan.py)."""
    from .phases.defend import REPORT_JSON
    from .plan import assumptions, estimate, plan_table, planned_cluster
    uri = storage.join(args.defense, REPORT_JSON)
    if not storage.exists(uri, cfg.storage):
        raise UserError(f"{args.defense} has no {REPORT_JSON}: give the output folder of a finished `ubt defend`.")
    report = storage.read_json(uri, cfg.storage)
    cluster = planned_cluster(report, args.actors, args.workers, args.gpus, args.cpus)
    table = plan_table(estimate(report, args.rows, cluster), args.gpu_hour_price, args.cpu_hour_price)
    print(f"UBT on {args.rows:,} rows, planned from {uri}\n\n{table}\n\nassumptions:\n"
          + "\n".join(f"- {line}" for line in assumptions(report, args.rows, cluster)), flush=True)


def _config(cfg: Config, args: argparse.Namespace) -> None:
    print("\n".join(describe(args.all)) if args.keys or args.all else save_config(cfg).rstrip("\n"))


# What `ubt defend --help` lists after the arguments: the settings a user defending their own model sets.
DEFEND_EPILOG = """settings that matter (section.key=value; `ubt config --keys` lists the user-facing keys):
  defend.model=PATH          the checkpoint to clean: an open_clip local-dir folder, local or s3://
  defend.data=PATH           the Parquet shards it was trained on (key, image, caption), local or s3://
  defend.output=PATH         where the cleaned model, score table and report.md go
  data.test=PATH             labelled test shards for CA and ASR (with defend.evaluate=true)
  data.class_names=[...]     zero-shot class prompts in the training captions' words
  evaluate.heldout_class_names=[...], evaluate.heldout_templates=[...]
                             a second prompt set the captions never use (held-out CA)
  evaluate.trigger=PATH      a saved trigger for ASR (null when none is known)
  unlearn.num_samples=K      how many of the most suspicious rows to unlearn (about the poisons expected)
  score.use_gpu=true, score.num_actors=N, trainer.use_gpu=true, trainer.num_workers=N
                             where scoring and the training phases run

example:
  ubt defend defend.model=s3://bucket/clip defend.data=s3://bucket/shards defend.output=s3://bucket/ubt \\
      data.test=s3://bucket/test evaluate.trigger=null storage.endpoint_url=http://minio:9000
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ubt", description="Find and unlearn backdoors in CLIP models (UBT) on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own logs, warnings and progress bars too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def phase(name: str, help: str, run: Callable, source: tuple[str, ...] = (),
              dest: str = "source") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if source:
            p.add_argument(dest, choices=source)
        p.add_argument("--config", "-c", action="append",
                       help="YAML config (see configs/); defaults apply without one. Repeat it to layer files: "
                            "a later file's keys win, e.g. -c configs/attacks/sig.yaml -c benchmarks/configs/density.yaml.")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the contents of an output folder that ubt did not write (without it, such a "
                            "folder stops the run)")
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show Ray's own logs, warnings and progress bars too")
        p.set_defaults(run=run)
        return p

    phase("prepare", "Turn a source into validated Parquet shards.", _prepare,
          SOURCES)
    phase("poison", "Poison clean shards with a backdoor trigger (the attack side).", _poison)
    phase("train", "Train or fine-tune CLIP on shards with Ray Train (e.g. the backdoored model).", _train)
    p = phase("evaluate", "Zero-shot clean accuracy and attack success rate of a model.", _evaluate)
    p.add_argument("--model", help="open_clip local-dir checkpoint to evaluate (default: model.checkpoint)")
    phase("overfit", "Overfit a copy of defend.model on defend.data to amplify the backdoor (UBT step 1).", _overfit)
    p = phase("score", "Score every row of defend.data for suspicion on Ray Data (UBT step 2).", _score)
    p.add_argument("--model", help="checkpoint to score with (default: the overfit model, or defend.model)")
    phase("select", "Pick the top-k suspicious rows and a retain set from the score table (UBT step 3).", _select)
    phase("unlearn", "Unlearn the selected rows from defend.model with Ray Train (UBT step 4).", _unlearn)
    p = phase("defend", "Run UBT end to end on defend.model and defend.data and write a report.", _defend)
    p.epilog = DEFEND_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p = phase("baseline", "Fine-tune the backdoored model on clean pairs: plain CLIP loss (ft) or CleanCLIP.",
              _baseline, ("ft", "cleanclip"), dest="kind")
    p.add_argument("--model", help="checkpoint to start from (default: baseline.model)")
    phase("compare", "No defense, FT, CleanCLIP and UBT on each attack of compare.attacks: tables and a chart.",
          _compare)
    phase("sweep", "Ray Tune over the unlearning knobs (sweep.space): results table, heatmap, best checkpoint.",
          _sweep)
    phase("pipeline", "Run the configured phases in order (pipeline.phases).", _pipeline)
    p = phase("config", "Print the resolved config, or the keys with their help (--keys, --all).", _config)
    p.add_argument("--keys", action="store_true", help="list the user-facing config keys with default and help")
    p.add_argument("--all", action="store_true", help="list the experimental keys too (set as "
                   "experimental.section.key), after the user-facing ones")
    from . import plan
    p = sub.add_parser("plan", help="The time and cost of a finished defense at another size and cluster, from "
                       "its measured throughput.", description=plan.__doc__.split("\n\n")[0], epilog="storage.* overrides (section.key=value) reach an s3:// report.")
    p.add_argument("--defense", required=True, metavar="DIR", help="the output folder of a finished `ubt defend` "
                   "(defend.output: report.json)")
    p.add_argument("--rows", required=True, type=int, help="the rows of the dataset to plan for")
    p.add_argument("--gpus", type=int, help="one GPU per scoring actor and training worker, this many of each "
                   "(unless --actors, --workers)")
    p.add_argument("--cpus", type=float, help="the cluster's CPUs: select's tasks, and without --gpus or --actors "
                   "the CPU scoring actors (default: as measured)")
    p.add_argument("--actors", type=int, help="scoring actors (default: as measured, or from --gpus, --cpus)")
    p.add_argument("--workers", type=int, help="training workers (default: as measured, or --gpus)")
    p.add_argument("--gpu-hour-price", type=float, help="price of a reserved GPU-hour: adds a cost column")
    p.add_argument("--cpu-hour-price", type=float, help="price of a reserved CPU-hour: adds a cost column")
    p.set_defaults(run=_plan, config=None)
    # A local Ray cluster of the project's own, for `ray job submit` (README, "Run on a cluster"); takes no config.
    from . import local_cluster
    p = sub.add_parser("cluster", help="Start or stop a local Ray cluster of its own (stop leaves any other Ray "
                       "alone).", description=local_cluster.__doc__.split("\n\n")[0])
    local_cluster.add_arguments(p)
    p.set_defaults(run=lambda cfg, args: local_cluster.run(args, cfg), config=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides may come before or after the positional source; argparse wants them last.
    args, extra = parser.parse_known_args(argv)
    overrides = list(getattr(args, "overrides", []) or []) + [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.overrides = list(overrides)
    if getattr(args, "source", None):
        overrides.append(f"prepare.source={args.source}")
    storage.allow_overwrite(bool(getattr(args, "overwrite", False)))
    console.setup(bool(getattr(args, "verbose", False)))
    try:
        cfg = load_config(args.config, overrides)
        check_config(cfg, args.command, args.overrides)  # the whole config, cross-key rules included
        result = args.run(cfg, args)
        if isinstance(result, Outcome):
            report(result, cfg)
    except KeyboardInterrupt:
        print(f"ubt {args.command}: interrupted; what it was writing is not marked finished (run the same "
              f"command again to redo or resume it).", file=sys.stderr)
        return 130
    except Exception as e:
        user = find_user_error(e)  # also one raised inside a Ray task, actor or Train worker
        if user is None:
            raise
        print(f"ubt {args.command}: error: {user}", file=sys.stderr)
        return 2
    if result is not None and not isinstance(result, Outcome):
        print(json.dumps(result, indent=2))
    return 0


def entry() -> None:
    """The `ubt` command: `main()`'s exit code. After Ctrl-C the process ends at once once its output is flushed:
    letting the interpreter tear down Ray's and torch's threads in the middle of an interrupt has ended in a
    segfault instead of exit 130. Ray's reaper stops a local cluster this process started."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
