"""sweep: Ray Tune over the unlearning knobs (unlearn.num_samples, unlearn.token_portion, lr, steps, ...).

The scores are computed once (or reused from `sweep.scores`) and the forget set is selected once, with the
largest `unlearn.num_samples` of the space: its rows are ranked, so a trial with k samples unlearns the top k
(`unlearn.load_forget_set`). Each trial is a Tune driver function that runs the unlearn phase as a Ray Train
run, whose rank 0 probes CA and ASR on a few test rows every `sweep.probe_every` steps (forwarded to Tune by
TuneReportCallback, so that ASHA can stop a trailing trial), and then the evaluate phase on the cleaned model.
Every trial reads the same backdoored checkpoint and shards; none is copied. Tune maximises one scalar,
`objective` (core.search.objective_value). An interrupted sweep of the same settings resumes with
`Tuner.restore`: finished trials are not run again, an interrupted one resumes from its last Train checkpoint.

Under `sweep.output` (local or s3://): results.md/.csv/.json (trials best first), heatmap.png (ASR and CA over
num_samples x token_portion), best/model (the best trial's cleaned model, open_clip local-dir) with
best/config.yaml (its resolved config), select/, trials/<trial id>/ (unlearn run, evaluation, config.yaml),
and Tune's own state in tune/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from .. import console, storage
from ..checks import check_score
from ..cluster import ensure_ray
from ..config import Config, SweepConfig, replace_keys, save_config
from ..core.models import CHECKPOINT_SUFFIXES, Clip
from ..core.search import Dimension, largest, objective_value, rank_rows
from ..errors import UserError
from ..cost import Usage
from ..manifest import fingerprint, read_manifest, write_manifest
from ..report import heatmap_png, results_markdown, write_report_files
from ..sweep_space import parse_space
from ..train_loop import Probe
from .defend import find_suspicious
from .evaluate import EvalResult, evaluate_to, load_test_set, zero_shot_rates
from .score import TABLE
from .select import FORGET, RETAIN, select
from .unlearn import unlearn

TUNE_DIR, TRIALS_DIR, SELECT_DIR, BEST_DIR = "tune", "trials", "select", "best"
STATE_FILE, CONFIG_FILE, RESULTS, HEATMAP_FILE = "sweep.json", "config.yaml", "results", "heatmap.png"
METRIC = "objective"
# The two knobs of the heatmap; a trial that does not draw one has the config's value.
HEATMAP_KEYS = ("unlearn.num_samples", "unlearn.token_portion")


@dataclass
class SweepResult:
    """The trials best first (empty when interrupted) and as Markdown, the best finished one, and where
    everything went."""
    rows: list[dict]
    table: str
    best: dict | None
    output: str
    interrupted: bool
    resumed: bool
    wall_time_s: float


class TrialProgress(tune.Callback):
    """Tune callback (on the driver): a log line, with the time left, as each trial of `total` ends."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed")

    def _ended(self, trial, how: str) -> None:
        self.done += 1
        per_trial = (time.time() - self.started) / self.done
        left = f", about {console.duration(per_trial * (self.total - self.done))} left" if self.done < self.total \
            else ""
        console.log.info(f"[sweep] trial {trial.trial_id} {how}: {self.done}/{self.total} trials{left}")


@console.phase("sweep", lambda cfg, callbacks=None: f"{len(cfg.sweep.space)} keys of the unlearning over "
               f"{cfg.defend.model} -> {cfg.sweep.output}")
def sweep(cfg: Config, callbacks: list | None = None) -> SweepResult:
    """Run (or resume) the sweep `cfg.sweep` over the unlearning of `defend.model`; `callbacks` are Tune
    callbacks added to the run (a resumed run keeps those it started with)."""
    started = time.time()
    dims = parse_space(cfg.sweep.space)
    _check_inputs(cfg)
    base = trial_base(cfg)
    output = base.sweep.output
    storage.claim_output(output, "sweep", cfg.storage)
    ensure_ray(cfg.ray)
    k = largest(dims, "unlearn.num_samples", cfg.unlearn.num_samples)
    scores = shared_scores(base)
    same = _same_sweep_as_before(base, k)
    forget, retain = shared_selection(base, scores, k, reuse=same)
    experiment = storage.resolve(storage.join(output, TUNE_DIR), cfg.storage)
    tuner, resumed = _tuner(base, dims, forget, retain, experiment, same, callbacks)
    grid = tuner.fit()
    done = finished_trial_count(experiment)
    total = base.sweep.repeats * math.prod(len(d.values) for d in dims if d.kind == "grid")
    if done < total:
        console.log.info(f"[sweep] interrupted with {done} of {total} trials done: run the same command again to "
                         f"resume")
        return SweepResult([], "", None, output, True, resumed, time.time() - started)

    rows = rank_rows([trial_row(r, dims, base) for r in grid])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    best = next((r for r in rows if r["status"] == "finished"), None)
    if best is None:
        raise UserError(f"no trial of the sweep finished (the first error: {_first_line(rows[0].get('error'))}): "
                        f"see the trials' error.txt under {storage.join(output, TUNE_DIR)}.")
    table = write_results(rows, dims, best, base)
    write_manifest(output, "sweep", cfg, inputs={"model": base.defend.model, "data": base.defend.data,
                                                 "scores": scores},
                   rows=None, started=started, usage=sweep_usage(rows),
                   extra={"trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
                          "forget_rows_selected": k, "resumed": resumed, "best": best})
    return SweepResult(rows, table, best, output, False, resumed, time.time() - started)


def sweep_usage(rows: list[dict]) -> Usage:
    """The sweep's cost (cost.py): its trials' unlearning sample-passes as their last report counted them (a
    stopped trial's up to its stop; the shared scoring and selection, and the evaluations, have manifests of
    their own), and the whole cluster reserved, as Tune holds it for the trials."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    return Usage(sum(int(r.get("forward_passes") or 0) for r in rows),
                 sum(int(r.get("backward_passes") or 0) for r in rows), cpus=cpus, gpus=gpus,
                 devices=f"Ray Tune trials on the cluster's {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else ""))


def _check_inputs(cfg: Config) -> None:
    """Refuse, before Ray starts, a sweep whose model or trigger is missing or whose scorer cannot run."""
    check_score(cfg.score)
    if not storage.exists(cfg.defend.model, cfg.storage):
        raise UserError(f"defend.model={cfg.defend.model} does not exist: train the backdoored model first "
                        f"(`ubt train`) or point defend.model at an open_clip local-dir checkpoint.")
    trigger = cfg.evaluate.trigger
    if cfg.sweep.objective != "ca" and not (trigger and storage.exists(trigger, cfg.storage)):
        raise UserError(f"experimental.sweep.objective={cfg.sweep.objective} needs the attack success rate, but there is no "
                        f"trigger at evaluate.trigger={trigger}: run `ubt poison` first or use experimental.sweep.objective=ca.")


def _same_sweep_as_before(cfg: Config, k: int) -> bool:
    """Whether sweep.output holds a sweep of these settings and files (to resume); if not, what an earlier
    sweep left there is removed and this one's fingerprint written."""
    output, fingerprint = cfg.sweep.output, sweep_fingerprint(cfg, k)
    state_uri = storage.join(output, STATE_FILE)
    if (cfg.sweep.resume and storage.exists(state_uri, cfg.storage)
            and storage.read_json(state_uri, cfg.storage) == fingerprint):
        return True
    for part in (TUNE_DIR, TRIALS_DIR, SELECT_DIR):
        storage.remove_dir(storage.join(output, part), cfg.storage)
    storage.write_json(state_uri, fingerprint, cfg.storage)
    return False


def shared_selection(cfg: Config, scores: str, k: int, reuse: bool) -> tuple[str, str]:
    """(forget, retain) shards every trial reads: selected once, with the largest k of the space (a trial with
    k samples takes the top k of these ranked rows); an earlier selection of the same sweep is reused."""
    out = storage.join(cfg.sweep.output, SELECT_DIR)
    if not (reuse and storage.exists(storage.join(out, "manifest.json"), cfg.storage)):
        select(cfg, scores, cfg.defend.data, output=out, k=k)
    return storage.join(out, FORGET), storage.join(out, RETAIN)


def _tuner(base: Config, dims: list[Dimension], forget: str, retain: str, experiment: storage.Location,
           same: bool, callbacks: list | None) -> tuple[tune.Tuner, bool]:
    """The Tuner of this sweep: restored when the same sweep was interrupted (True), else a new one (False)."""
    sw = base.sweep
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, forget=forget, retain=retain),
        # The driver only waits on its Train run, which reserves its own resources, then evaluates on what that
        # run released. Tune needs some resource in the request: one byte of memory, not a CPU that Ray Data's
        # reads would miss.
        tune.PlacementGroupFactory([{"memory": 1}]))
    if same and tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.fs):
        console.log.info(f"[sweep] resuming the interrupted sweep in {sw.output} (finished trials are not run "
                         f"again)")
        return tune.Tuner.restore(experiment.path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=experiment.fs), True
    storage.remove_dir(storage.join(sw.output, TRIALS_DIR), base.storage)
    concurrent = max_concurrent_trials(sw)
    root = storage.resolve(sw.output, base.storage)
    total = sw.repeats * math.prod(len(d.values) for d in dims if d.kind == "grid")
    console.log.info(f"[sweep] {total} trials over {len(dims)} keys, up to {concurrent} at once, results under "
                     f"{sw.output}")
    return tune.Tuner(
        trainable, param_space={d.key: to_tune(d) for d in dims},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=sw.repeats, scheduler=build_scheduler(sw, dims, base.unlearn.steps),
            # The concurrency limit lives in the searcher (Tune ignores max_concurrent_trials beside a searcher
            # of ours), and so is restored with it.
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=base.run.seed)),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=root.path, storage_filesystem=root.fs,
                                  callbacks=[*(callbacks or []), TrialProgress(total)],
                                  verbose=1 if console.verbose() else 0)), False


def finished_trial_count(experiment: storage.Location) -> int:
    """Trials done (ended, stopped early or failed) in the sweep's saved state. Not the ResultGrid's count: on an
    interrupt Tune saves its state, then marks the trials it stops TERMINATED in memory only; and it creates
    trials as it starts them, so an interrupted sweep may hold fewer than its space."""
    analysis = ExperimentAnalysis(experiment.path, storage_filesystem=experiment.fs)
    return sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in analysis.trials)


def trial_base(cfg: Config) -> Config:
    """The config every trial starts from: the sweep's Train resources, and local paths made absolute (Tune
    runs each trial in a directory of its own)."""
    sw, a = cfg.sweep, storage.absolute
    return replace_keys(cfg, {
        "trainer.num_workers": sw.num_workers, "trainer.cpus_per_worker": sw.cpus_per_worker,
        "trainer.use_gpu": sw.use_gpu,
        "sweep.output": a(sw.output), "sweep.scores": a(sw.scores), "data.test": a(cfg.data.test),
        "evaluate.trigger": a(cfg.evaluate.trigger), "defend.model": a(cfg.defend.model),
        "defend.data": a(cfg.defend.data), "defend.output": a(cfg.defend.output),
        "overfit.output": a(cfg.overfit.output), "score.output": a(cfg.score.output)})


def trial_config(base: Config, params: dict, trial_id: str) -> Config:
    """A trial's config: the base with the trial's drawn values and its own output directories."""
    root = storage.join(base.sweep.output, TRIALS_DIR, trial_id)
    return replace_keys(base, {**params, "unlearn.output": storage.join(root, "unlearn"),
                               "evaluate.output": storage.join(root, "eval")})


def shared_scores(cfg: Config) -> str:
    """The score directory every trial's selection comes from: `sweep.scores` when its table exists (and
    scored defend.data), else written there once by the overfit and score phases."""
    sw, d = cfg.sweep, cfg.defend
    if not storage.exists(storage.join(sw.scores, TABLE), cfg.storage):
        console.log.info(f"[sweep] scoring {d.data} once into {sw.scores}")
        find_suspicious(cfg, output=sw.scores)
        return sw.scores
    scored = read_manifest(sw.scores, cfg)["inputs"].get("data")
    if storage.absolute(scored) != d.data:
        raise UserError(f"the scores under experimental.sweep.scores={sw.scores} are of {scored}, not of defend.data={d.data}: "
                        f"point sweep.scores at the scores of defend.data, or at an empty directory to score it.")
    console.log.info(f"[sweep] reusing the scores under {sw.scores}")
    return sw.scores


def sweep_fingerprint(cfg: Config, k: int) -> dict:
    """What makes two sweeps the same sweep: the settings trials read, and the model, data, score and test files."""
    signature = fingerprint(cfg, ("sweep", "unlearn", "trainer", "evaluate", "select", "model", "data"), {
        "model_files": (cfg.defend.model, CHECKPOINT_SUFFIXES), "data_files": (cfg.defend.data, (".parquet",)),
        "score_files": (storage.join(cfg.sweep.scores, TABLE), (".parquet",)),
        "test_files": (cfg.data.test, (".parquet",))}, forget_rows=k)
    signature["config"]["sweep"].pop("resume", None)  # resuming a sweep is the same sweep
    return signature


def max_concurrent_trials(sw: SweepConfig) -> int:
    """`sweep.max_concurrent_trials`, else as many trials as the cluster holds at once: by GPUs with use_gpu,
    and by CPUs less one left to the Ray Data tasks that feed the Train workers (they would stall without)."""
    if sw.max_concurrent_trials:
        return sw.max_concurrent_trials
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    per_trial = sw.num_workers * sw.cpus_per_worker
    n = (cpus - 1) // per_trial
    if sw.use_gpu:
        n = min(n, gpus // sw.num_workers)
    if n < 1:
        need = f"{per_trial} CPUs" + (f" and {sw.num_workers} GPUs" if sw.use_gpu else "")
        raise UserError(f"a trial needs {need} (sweep.num_workers x sweep.cpus_per_worker) but the Ray cluster has "
                        f"{cpus} CPUs (one left to Ray Data's reads){f' and {gpus} GPUs' if sw.use_gpu else ''}: "
                        f"lower sweep.num_workers or sweep.cpus_per_worker, or add nodes.")
    return n


def to_tune(dim: Dimension):
    """The Ray Tune search-space object of one dimension."""
    if dim.kind == "grid":
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dim.kind](*dim.values)


def build_scheduler(sw: SweepConfig, dims: list[Dimension], default_steps: int):
    """None (FIFO: every trial runs to its end) or ASHA over unlearning steps, up to the space's longest run."""
    if sw.scheduler != "asha":
        return None
    max_steps = largest(dims, "unlearn.steps", default_steps)
    # max_t one past the last step: ASHA stops a trial whose report reaches max_t, and the last probe (at the
    # last step) comes before the trial's final evaluation, which a stop there would cut off.
    return ASHAScheduler(time_attr="step", max_t=max_steps + 1,
                         grace_period=min(sw.grace_steps, max_steps), reduction_factor=sw.reduction_factor)


# ---- what runs in a trial -------------------------------------------------------------------------------------

def run_trial(params: dict, base: Config, forget: str, retain: str) -> None:
    """One trial (a Tune driver function): the unlearn phase as a Ray Train run that reports its probe to Tune,
    then the evaluate phase on the cleaned model; reports the objective."""
    from ray.tune.integration.ray_train import TuneReportCallback
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, trial_id)
    sw = cfg.sweep
    ray.data.DataContext.get_current().enable_progress_bars = False
    fit = unlearn(cfg, cfg.defend.model, forget, retain, probe=Probe(zero_shot_probe, {"cfg": cfg}, sw.probe_every),
                  callbacks=[TuneReportCallback()])
    if sw.use_gpu:  # on a GPU: a task with a Train worker's resources, which the finished Train run released
        evaluation = ray.get(_evaluate_task.options(num_cpus=sw.cpus_per_worker, num_gpus=1).remote(
            cfg, fit.model, cfg.evaluate.output))
    else:  # on the CPUs the Train run released, in this process: a task would start (and import) another one
        evaluation = evaluate_to(cfg, fit.model, cfg.evaluate.output)
    root = storage.join(sw.output, TRIALS_DIR, trial_id)
    storage.write_bytes(storage.join(root, CONFIG_FILE), save_config(cfg).encode(), cfg.storage)
    ca, asr = evaluation.clean_accuracy, evaluation.attack_success_rate
    tune.report({METRIC: objective_value(ca, asr, sw.objective, sw.asr_threshold), "clean_accuracy": ca,
                 "clean_accuracy_heldout": evaluation.clean_accuracy_heldout, "attack_success_rate": asr, "step": fit.steps, "final": True, "model": fit.model,
                 "config_file": storage.join(root, CONFIG_FILE)})


# An explicit strategy: a task of the trial's driver would otherwise be held to the trial's placement group.
@ray.remote(scheduling_strategy="DEFAULT")
def _evaluate_task(cfg: Config, model: str, output: str) -> EvalResult:
    return evaluate_to(cfg, model, output)


def zero_shot_probe(clip: Clip, cfg: Config) -> Callable:
    """The intermediate measure of a trial (built on Train's rank 0): CA and ASR on the first `sweep.probe_rows`
    test rows, decoded once, and the objective of those."""
    sw = cfg.sweep
    rows = min(sw.probe_rows, cfg.evaluate.max_rows or sw.probe_rows)
    test = load_test_set(replace_keys(cfg, {"evaluate.max_rows": rows}))
    chunks = list(test.chunks(clip.image_size, cfg.evaluate.batch_size))

    def measure(model: Clip, device) -> dict:
        rates = zero_shot_rates(model, cfg, test, chunks, device)
        ca, asr = rates.clean_accuracy, rates.attack_success_rate
        return {"probe_clean_accuracy": ca, "probe_attack_success_rate": asr,
                METRIC: objective_value(ca, asr, sw.objective, sw.asr_threshold)}
    return measure


# ---- results --------------------------------------------------------------------------------------------------

def trial_row(result, dims: list[Dimension], base: Config) -> dict:
    """One trial's row: its drawn values, CA and ASR (the final evaluation's, or the last probe's when ASHA
    stopped it early), objective and status."""
    m = result.metrics or {}
    finished = bool(m.get("final"))
    status = "error" if result.error else ("finished" if finished else "stopped")
    prefix = "" if finished else "probe_"
    ca, asr = m.get(f"{prefix}clean_accuracy"), m.get(f"{prefix}attack_success_rate")
    params = result.config or {}
    sw = base.sweep
    row = {"trial_id": m.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
           **{d.key: params.get(d.key) for d in dims},
           **{key: params.get(key, getattr(base.unlearn, key.split(".")[1])) for key in HEATMAP_KEYS},
           "clean_accuracy": ca, "clean_accuracy_heldout": m.get("clean_accuracy_heldout") if finished else None,
           "attack_success_rate": asr, METRIC: m.get(METRIC),
           "meets_asr_threshold": None if asr is None else asr <= sw.asr_threshold,
           "status": status, "steps": m.get("step"), "forward_passes": m.get("forward_passes"),
           "backward_passes": m.get("backward_passes"), "time_s": round(m.get("time_total_s") or 0.0, 1),
           "model": m.get("model"), "config_file": m.get("config_file")}
    if result.error:
        row["error"] = str(result.error)
    return row


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[-1][:200]


def export_best(best: dict, output: str, cfg: Config) -> None:
    """The best finished trial's cleaned model (open_clip local-dir) and resolved config to <output>/best."""
    out = storage.join(output, BEST_DIR)
    storage.copy_dir(best["model"], storage.join(out, "model"), cfg.storage)
    storage.write_bytes(storage.join(out, CONFIG_FILE), storage.read_bytes(best["config_file"], cfg.storage),
                        cfg.storage)
    storage.write_json(storage.join(out, "metrics.json"), best, cfg.storage)


def write_results(rows: list[dict], dims: list[Dimension], best: dict, base: Config) -> str:
    """results.md/.csv/.json, heatmap.png and best/ under sweep.output; returns the Markdown table."""
    output, sw = base.sweep.output, base.sweep
    export_best(best, output, base)
    columns = ["rank", "trial_id", *(d.key for d in dims), "clean_accuracy", "clean_accuracy_heldout",
               "attack_success_rate", METRIC,
               "meets_asr_threshold", "status", "steps", "time_s"]
    table = results_markdown(rows, dims, base, best, METRIC)
    write_report_files(output, RESULTS, base, rows, columns, table,
                       extra={"best": best, "objective": sw.objective, "asr_threshold": sw.asr_threshold})
    storage.write_bytes(storage.join(output, HEATMAP_FILE), heatmap_png(rows, base, HEATMAP_KEYS), base.storage)
    return table


