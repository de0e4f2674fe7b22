"""The one training loop of every training phase (attack, overfit, unlearn, baselines), on Ray Train.

`fit(cfg, spec)` runs a `TorchTrainer`: DDP over `trainer.num_workers` (CPU/gloo or GPU/NCCL), shards streamed
to each worker with `get_dataset_shard`, images decoded in the worker, a checkpoint (an open_clip local-dir
plus the optimiser state) reported `trainer.checkpoints_per_epoch` times per epoch. A rerun with the same
output resumes from the last checkpoint, and so does Ray after a worker failure (`trainer.max_failures`). The
loop reads the shared `trainer` section (workers, checkpoints, restarts) and the phase's schedule (`spec.schedule`),
never another phase's section.

Sample-passes (the manifest's `cost`, see cost.py) are counted by the loop as it steps: an objective with a
`sample_passes(rows_per_worker, world)` method says what one step forwards and back-propagates over all workers
(CleanCLIP: each row and its augmented view; unlearning: the retain batch, the forget mini-batch, and with an
anchor the frozen reference on the retain batch), else a step of B rows is B forward and B backward passes; an
objective's `setup_passes` (forward, backward per worker, e.g. unlearning's targets computed with θ₀) are
added each time the workers start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from . import console, storage
from .cluster import ensure_ray
from .config import Config, ModelConfig, Schedule
from .cost import Usage, cost_block, devices_text, summed
from .core.batches import decode_images
from .core.models import CHECKPOINT_SUFFIXES, WEIGHTS_FILE, Clip, load_checkpoint_dir, write_checkpoint_dir
from .core.objectives import Batch, build_objective
from .core.unlearning import set_trainable
from .errors import UserError
from .manifest import write_manifest
from .models import load_clip, save_clip
from .shards import count_rows, read_shards

TRAIN_STATE_FILE = "train_state.pt"
FINGERPRINT_FILE = "ubt_run.json"
LOG_EVERY_STEPS = 10
SHUFFLE_BUFFER_ROWS = 4096
# Ray Train's in-process mode (trainer.num_workers=0) keeps a reported checkpoint where it was written instead of
# copying it to the run's storage, so its directory must outlive report(); fit() removes them once the final
# model is saved (the loop runs in fit()'s own process then).
_IN_PROCESS_CHECKPOINTS: list[str] = []


@dataclass
class Probe:
    """Measured on rank 0 at every report, its metrics reported with the loop's (e.g. CA and ASR on a few test
    rows, so that a Tune scheduler can stop a bad trial early). `factory(clip=, **kwargs)` is a module-level
    function called once per run; what it returns is called as measure(clip, device) -> dict of floats."""
    factory: Callable
    kwargs: dict = field(default_factory=dict)
    every: int = 10   # steps between reports, besides the checkpoints'


@dataclass
class FitSpec:
    """What a phase asks of the loop: which data, from which model, with which objective, to which output."""
    phase: str
    data: str
    output: str
    init: ModelConfig
    schedule: Schedule                   # the phase's section (train, overfit, unlearn, baseline); workers: cfg.trainer
    objective: str | Callable = "clip"   # a registered name, or a module-level factory(preprocess_cfg=, tokenizer=, **kw)
    objective_kwargs: dict = field(default_factory=dict)
    trainable: str = "all"               # which parameters move (core.unlearning.set_trainable)
    probe: Probe | None = None
    callbacks: list = field(default_factory=list)  # Ray Train callbacks (e.g. Tune's TuneReportCallback)
    # The phase's own work before the loop (overfit's weak-similarity scoring): when it began, and its cost blocks
    # (cost.py), which the phase's manifest adds to the loop's; its wall time then counts from `started`.
    started: float | None = None
    costs_before: list = field(default_factory=list)


@dataclass
class FitResult:
    model: str
    rows: int
    steps: int
    samples: int
    resumed_from_step: int
    wall_time_s: float
    metrics: dict
    manifest: dict
    forward_passes: int = 0    # the manifest's cost: image-tower sample-passes (the module's docstring)
    backward_passes: int = 0


def fit(cfg: Config, spec: FitSpec) -> FitResult:
    """Train `spec.init` on `spec.data` with `spec.objective`; the final model goes to `<output>/model`."""
    started = console.phase_started(spec.phase, f"{spec.data} -> {spec.output}")
    t, s = cfg.trainer, spec.schedule
    spec = dataclasses.replace(spec, data=storage.absolute(spec.data), output=storage.absolute(spec.output),
                               init=dataclasses.replace(spec.init, checkpoint=storage.absolute(spec.init.checkpoint)))
    rows = count_rows(spec.data, cfg.storage)
    if rows < s.batch_size:
        section = spec.phase.split("-")[0]  # baseline-ft and baseline-cleanclip: the baseline section
        raise UserError(f"{spec.data} holds {rows} rows, fewer than {spec.phase}'s batch size {s.batch_size}: "
                        f"lower {section}.batch_size or give more data.")
    # Before the first Ray call (the GPU check, the shards' read): Ray Data would otherwise start a default local
    # Ray and ignore ray.address and ray.num_cpus.
    storage.claim_output(spec.output, spec.phase, cfg.storage)
    ensure_ray(cfg.ray)
    if t.use_gpu and not _cluster_has_gpus(cfg):
        raise UserError("trainer.use_gpu is true but the Ray cluster has no GPU: set trainer.use_gpu=false or add GPU "
                        "workers.")
    ds = read_shards(spec.data, cfg, columns=["key", "image", "caption"]).randomize_block_order(seed=cfg.run.seed)
    run_root = storage.join(spec.output, "ray")
    fingerprint = run_fingerprint(cfg, spec)
    fingerprint_uri = storage.join(run_root, FINGERPRINT_FILE)
    # Resume only a run of the same data, model and schedule: a checkpoint of another run is not this one's.
    if not t.resume or (storage.exists(fingerprint_uri, cfg.storage)
                        and storage.read_json(fingerprint_uri, cfg.storage) != fingerprint):
        storage.remove_dir(run_root, cfg.storage)
    loc = storage.resolve(run_root, cfg.storage)
    storage.make_dir(run_root, cfg.storage)
    storage.write_json(fingerprint_uri, fingerprint, cfg.storage)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        # The callbacks run in the controller; the workers need the rest of the spec.
        train_loop_config={"cfg": cfg, "spec": dataclasses.replace(spec, callbacks=[]), "rows": rows},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=spec.phase, storage_path=loc.path, storage_filesystem=loc.fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=list(spec.callbacks),
            logging_config=ray.train.LoggingConfig(log_level=logging.getLevelName(console.ray_level()))),
        datasets={"train": ds},
        dataset_config=_ordered_ingest(),
    )
    model_uri = storage.join(spec.output, "model")
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"{spec.phase} finished without a checkpoint; this is a bug in ubt_ray.")
        with result.checkpoint.as_directory() as ckpt_dir:
            clip = load_checkpoint_dir(ckpt_dir)
            save_clip(clip, model_uri, cfg.storage, extra={"phase": spec.phase, "steps": result.metrics.get("step")})
    finally:  # a failed in-process run leaves no checkpoint directory behind either
        while _IN_PROCESS_CHECKPOINTS:
            shutil.rmtree(_IN_PROCESS_CHECKPOINTS.pop(), ignore_errors=True)
    m = result.metrics
    usage = fit_usage(cfg, int(m.get("forward_passes", 0)), int(m.get("backward_passes", 0)))
    if spec.costs_before:
        usage = summed([cost_block(usage, time.time() - started), *spec.costs_before])
    began = spec.started or started
    manifest = write_manifest(spec.output, spec.phase, cfg, inputs={"data": spec.data, "init": vars(spec.init)},
                              rows=None, started=began, usage=usage,
                              extra={"training": {"rows_available": rows, "steps": m.get("step"),
                                                  "samples": m.get("samples"),
                                                  "resumed_from_step": m.get("resumed_from_step"),
                                                  "final_loss": m.get("loss"), "model": model_uri,
                                                  "objective": _objective_name(spec)}})
    console.phase_done(spec.phase, started, f"{int(m['step'])} steps, final loss {m.get('loss', float('nan')):.4f} "
                                            f"-> {model_uri}")
    cost = manifest["cost"]
    return FitResult(model_uri, rows, int(m["step"]), int(m["samples"]), int(m["resumed_from_step"]),
                     time.time() - began, dict(m), manifest, cost["forward_sample_passes"],
                     cost["backward_sample_passes"])


def fit_usage(cfg: Config, forward: int, backward: int) -> Usage:
    """A training run's reservation: its Ray Train workers' CPUs and GPUs (trainer.num_workers=0: one worker, in
    the driver's process). The Ray Data tasks that feed them are not reserved by the run and not counted."""
    t = cfg.trainer
    workers = max(1, t.num_workers)
    gpus = 1 if t.use_gpu else 0
    return Usage(forward, backward, cpus=workers * t.cpus_per_worker, gpus=workers * gpus,
                 devices=devices_text(workers, "worker" if t.num_workers else "in-process worker",
                                      t.cpus_per_worker, gpus))


def step_passes(objective, rows_per_worker: int, world: int) -> tuple[int, int]:
    """(forward, backward) sample-passes of one step of `objective` over all workers, `rows_per_worker` rows each:
    the objective's own `sample_passes` where it has one, else each row once forward and once backward."""
    count = getattr(objective, "sample_passes", None)
    if count is not None:
        return count(rows_per_worker, world)
    return rows_per_worker * world, rows_per_worker * world


def _ordered_ingest() -> ray.train.DataConfig:
    """Train's data ingest with the blocks handed out in their (seeded, randomized) order rather than as their
    read tasks finish, so that the order cannot depend on timing. With the v1 Parquet reads a run is
    reproducible (an in-process overfit of 10 steps on the BadNet shards gave the same weights twice, measured
    before this ordering was added; with v2 reads, two different models); tests/test_train.py checks it."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def run_fingerprint(cfg: Config, spec: FitSpec) -> dict:
    """What makes two runs the same run: the shard files (with size and mtime), the initial model, objective
    and schedule."""
    t = cfg.trainer
    schedule = {**spec.schedule.values(), "num_workers": t.num_workers, "use_gpu": t.use_gpu,
                "checkpoints_per_epoch": t.checkpoints_per_epoch}
    return {"data": storage.file_signatures(spec.data, (".parquet",), cfg.storage), "init": vars(spec.init),
            "init_files": (storage.file_signatures(spec.init.checkpoint, CHECKPOINT_SUFFIXES, cfg.storage)
                           if spec.init.checkpoint else None),
            "objective": _objective_name(spec), "objective_kwargs": spec.objective_kwargs,
            "trainable": spec.trainable, "schedule": schedule,
            "seed": cfg.run.seed}


def load_train_state(path: Path) -> dict:
    """A checkpoint's optimiser state, loaded with torch's restricted unpickler (tensors, numbers, strings and
    containers only): a checkpoint folder is user input, and a full unpickle would run whatever code it holds."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for a planted object, others for a damaged file
        raise UserError(f"the training state {path} of the checkpoint to resume from is not plain tensors and "
                        f"numbers ({type(e).__name__}): delete the run's ray/ folder (or set experimental.trainer.resume=false) "
                        f"to start the run again.") from None


def _objective_name(spec: FitSpec) -> str:
    obj = spec.objective
    return obj if isinstance(obj, str) else f"{obj.__module__}.{obj.__qualname__}"


def _cluster_has_gpus(cfg: Config) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "embedding"))
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, total: int, s: Schedule) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return 0.5 * s.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "amp_bf16" else torch.float16)


def _progress(line: str, in_process: bool) -> None:
    """One progress line: in process (trainer.num_workers=0) on ubt's log; in a Ray Train worker on its stdout,
    which Ray forwards to the driver. Not print(): in a worker print is patched to log through the root logger
    and is also echoed to a wrapped stdout, so each line reached the driver twice."""
    if in_process:
        console.log.info(line)
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _train_loop_per_worker(config: dict) -> None:
    cfg: Config = config["cfg"]
    spec: FitSpec = config["spec"]
    t, s = cfg.trainer, spec.schedule
    if t.num_workers:  # a Ray Train worker process (in process, this is the caller's, whose logging is its own)
        # Ray Train sets a worker's root logger to INFO, which sent open_clip's model-loading messages (a dozen
        # root-logger INFO lines per load) to the driver's console; warnings and errors still come through.
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    # Ray pins one thread per reserved CPU; on a laptop the worker may use the cores the data tasks leave idle.
    torch.set_num_threads(t.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, world)))
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")

    clip = load_clip(spec.init, cfg.storage, device="cpu", seed=cfg.run.seed)
    objective = build_objective(spec.objective, preprocess_cfg=clip.preprocess_cfg, tokenizer=clip.tokenizer,
                                **spec.objective_kwargs)
    set_trainable(clip.model, spec.trainable)
    state = {"step": 0, "samples": 0, "resumed_from_step": 0}
    checkpoint = ray.train.get_checkpoint()
    train_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            clip.model.load_state_dict(load_file(str(Path(d) / WEIGHTS_FILE)))
            train_state = load_train_state(Path(d) / TRAIN_STATE_FILE)
        state = dict(train_state["state"], resumed_from_step=train_state["state"]["step"])
    # Passes before a checkpoint come back with it (none in a checkpoint written before they were counted); the
    # objective's setup ran again in every worker just now.
    setup_forward, setup_backward = getattr(objective, "setup_passes", (0, 0))
    state["forward_passes"] = int(state.get("forward_passes", 0)) + setup_forward * world
    state["backward_passes"] = int(state.get("backward_passes", 0)) + setup_backward * world
    model = ray.train.torch.prepare_model(clip.model, move_to_device=device) if world > 1 else clip.model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and spec.init.precision == "amp_fp16")
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scaler.load_state_dict(train_state["scaler"])

    per_worker = s.batch_size // world
    forward_per_step, backward_per_step = step_passes(objective, per_worker, world)
    steps_per_epoch = s.steps_per_epoch(config["rows"])
    total_steps = s.total_steps(config["rows"])
    ckpt_every = max(1, steps_per_epoch // t.checkpoints_per_epoch)
    shard = ray.train.get_dataset_shard("train")
    raw_model = model.module if hasattr(model, "module") else model
    probe = spec.probe
    measure = probe.factory(clip=clip, **probe.kwargs) if probe is not None and rank == 0 else None
    tic, tic_samples = time.time(), state["samples"]
    # An epoch hands each worker its batches in the same order in every run (seeded block order, ordered ingest, a
    # local shuffle seeded per epoch and rank): Train splits the rows equally, the last partial batch is dropped.
    # A resumed run goes on where its checkpoint was taken, in that epoch, after the batches trained before it,
    # passed over undecoded (it used to start the epoch's data again: rows trained twice, as many never seen).
    batches_per_epoch = max(1, (config["rows"] // world) // per_worker)
    epoch, skip = divmod(state["step"], batches_per_epoch)
    metrics: dict = {}
    while state["step"] < total_steps:
        for raw in shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                      local_shuffle_seed=cfg.run.seed * 1000 + epoch * world + rank):
            if skip:
                skip -= 1
                continue
            captions = [str(c) for c in raw["caption"]]
            batch = Batch(decode_images(list(raw["image"]), clip.image_size).to(device),
                          clip.tokenizer(captions).to(device), list(raw["key"]), captions)
            lr = lr_at(state["step"], total_steps, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, spec.init.precision):
                loss, metrics = objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                raw_model.logit_scale.clamp_(0, math.log(100))
            state["step"] += 1
            state["samples"] += per_worker * world
            state["forward_passes"] += forward_per_step
            state["backward_passes"] += backward_per_step
            if state["step"] % LOG_EVERY_STEPS == 0 or state["step"] == total_steps:
                rate = (state["samples"] - tic_samples) / max(1e-9, time.time() - tic)
                metrics.update(lr=lr, samples_per_s=rate)
                if rank == 0:
                    steps_per_s = (state["samples"] - tic_samples) / (per_worker * world) / max(
                        1e-9, time.time() - tic)
                    left = (total_steps - state["step"]) / steps_per_s if steps_per_s > 0 else 0.0
                    _progress(f"[{spec.phase}] step {state['step']}/{total_steps} (epoch "
                              f"{state['step'] / steps_per_epoch:.2f}/{total_steps / steps_per_epoch:.2f}) "
                              f"loss {metrics['loss']:.4f} {rate:.0f} samples/s lr {lr:.2e}"
                              + (f", about {console.duration(left)} left" if state["step"] < total_steps else ""),
                              in_process=t.num_workers == 0)
            checkpoint = state["step"] % ckpt_every == 0 or state["step"] == total_steps
            if checkpoint or (probe is not None and state["step"] % probe.every == 0):
                if measure is not None:
                    metrics.update(measure(dataclasses.replace(clip, model=raw_model), device))
                _report(clip, raw_model, optimizer, scaler, state, metrics, rank, checkpoint,
                        in_process=t.num_workers == 0)
            if state["step"] >= total_steps:
                break
        epoch += 1


def _report(clip: Clip, model: torch.nn.Module, optimizer, scaler, state: dict, metrics: dict, rank: int,
            checkpoint: bool = True, in_process: bool = False) -> None:
    """Report metrics from every worker (Ray Train requires it) and, with `checkpoint`, a checkpoint from rank 0."""
    out = {**metrics, **state}
    if rank != 0 or not checkpoint:
        ray.train.report(out)
        return
    d = tempfile.mkdtemp(prefix="ubt-ckpt-")
    try:
        write_checkpoint_dir(model, clip.model_cfg, clip.preprocess_cfg, Path(d), extra={"step": state["step"]})
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state},
                   Path(d) / TRAIN_STATE_FILE)
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))
    finally:
        if in_process:
            _IN_PROCESS_CHECKPOINTS.append(d)
        else:  # report() has copied it to the run's storage
            shutil.rmtree(d, ignore_errors=True)
