"""evaluate: zero-shot clean accuracy (CA) on the labelled test shards, and attack success rate (ASR) with the saved trigger.

METHOD.md section 5. The test set is small, so it is read with plain pyarrow and run in this process, in chunks of
`evaluate.batch_size` rows so that memory stays bounded whatever the model's input size.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from ..checks import check_heldout
from ..config import Config
from ..core.batches import decode_image
from ..core.models import CHECKPOINT_SUFFIXES, Clip, pick_device
from ..core.triggers import Trigger, apply_to_png, load_trigger
from ..cost import Usage
from ..core.zeroshot import (attack_success_rate, class_accuracies, class_embeddings, clean_accuracy,
                             image_embeddings)
from ..errors import UserError
from ..manifest import RowCounts, finished_output, fingerprint, write_manifest
from ..models import load_clip
from ..report import percent
from ..shards import read_columns, shard_schema
from .. import console, storage
from .poison import ATTACK_FILE

log = logging.getLogger(__name__)
METRICS_JSON = "metrics.json"

@dataclass
class EvalResult:
    """What `evaluate` measured, where it wrote metrics.json, and its manifest (with its `cost`, cost.py)."""
    clean_accuracy: float
    attack_success_rate: float | None
    metrics: dict
    output: str
    clean_accuracy_heldout: float | None = None  # with evaluate's held-out prompt set (None when it is empty)
    manifest: dict = field(default_factory=dict)  # empty in a result saved before evaluations carried theirs


@dataclass
class Attack:
    """The saved trigger and what the poison phase recorded about it."""
    trigger: Trigger
    name: str
    target_label: int
    uri: str


@dataclass
class EvalSet:
    """The evaluated test rows (encoded images, labels) and the attack whose trigger ASR re-applies."""
    keys: list[str]
    images: list[bytes]
    labels: np.ndarray
    attack: Attack | None

    def chunks(self, size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(clean, triggered or None) uint8 model inputs, `batch_size` rows at a time, decoded as they are asked
        for so that memory stays bounded whatever the model's input size."""
        for start in range(0, len(self.keys), batch_size):
            chunk = slice(start, start + batch_size)
            clean = decode_rows(self.keys[chunk], self.images[chunk], size)
            triggered = (decode_rows(self.keys[chunk], self.images[chunk], size, self.attack)
                         if self.attack is not None else None)
            yield clean, triggered


def load_test_set(cfg: Config) -> EvalSet:
    """The first `evaluate.max_rows` test rows of `data.test` and the attack at `evaluate.trigger`, if any."""
    keys, images, labels = read_test_rows(cfg)
    attack = load_attack(cfg)
    if attack is not None and not np.any(labels != attack.target_label):
        raise UserError(f"every evaluated test row is of the target class {attack.target_label}, so ASR counts "
                        f"no image: evaluate more rows (evaluate.max_rows) or another test set.")
    return EvalSet(keys, images, labels, attack)


@dataclass
class Rates:
    """Zero-shot rates of one model on one test set. `clean_target_rate` is ASR's floor: the share of the same
    non-target images predicted as the target class without the trigger (the model's own confusion)."""
    clean_accuracy: float
    attack_success_rate: float | None = None
    asr_images: int = 0
    clean_target_rate: float | None = None
    clean_accuracy_heldout: float | None = None
    class_accuracy: list[float | None] | None = None  # per label, with the training prompts (class_accuracies)


def zero_shot_rates(clip: Clip, cfg: Config, test: EvalSet,
                    chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]], device: torch.device) -> Rates:
    """CA, and with an attack ASR and its floor, of `clip` on the decoded `chunks` of `test` (METHOD.md step 5);
    CA also with the held-out prompt set (evaluate.heldout_*), from the same image embeddings."""
    precision = cfg.model.precision
    prompt_sets = {"train": (cfg.data.class_names, cfg.data.templates, "data.templates")}
    heldout = heldout_prompts(cfg)
    if heldout is not None:
        prompt_sets["heldout"] = (*heldout, "evaluate.heldout_templates")
    weights = {}
    for name, (names, templates, key) in prompt_sets.items():
        try:
            weights[name] = class_embeddings(clip.model, clip.tokenizer, list(names), list(templates), device,
                                             precision).float().cpu()
        except ValueError as e:
            raise UserError(f"{key}: {e}") from None

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return image_embeddings(clip.model, pixels, clip.preprocess_cfg, cfg.evaluate.batch_size, device, precision)

    clean_preds: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
    triggered_preds = []
    for clean, triggered in chunks:
        emb = embed(clean)
        for name, w in weights.items():
            clean_preds[name].append((emb @ w.T).argmax(dim=1))
        if triggered is not None:
            triggered_preds.append((embed(triggered) @ weights["train"].T).argmax(dim=1))
    preds = {name: torch.cat(p) for name, p in clean_preds.items()}
    ca = clean_accuracy(preds["train"], test.labels)
    ca_heldout = clean_accuracy(preds["heldout"], test.labels) if "heldout" in preds else None
    per_class = class_accuracies(preds["train"], test.labels, len(weights["train"]))
    if test.attack is None:
        return Rates(ca, clean_accuracy_heldout=ca_heldout, class_accuracy=per_class)
    target = test.attack.target_label
    asr, asr_images = attack_success_rate(torch.cat(triggered_preds), test.labels, target)
    return Rates(ca, asr, asr_images, attack_success_rate(preds["train"], test.labels, target)[0], ca_heldout,
                 per_class)


def heldout_prompts(cfg: Config) -> tuple[list[str], list[str]] | None:
    """(class names, templates) of the held-out prompt set, or None when it is empty; one sentence when its
    class names do not pair with data.class_names."""
    ev = cfg.evaluate
    if not ev.heldout_class_names or not ev.heldout_templates:
        return None
    check_heldout(cfg)
    return list(ev.heldout_class_names), list(ev.heldout_templates)


@console.phase("evaluate", lambda cfg, model_uri=None: f"CA and ASR of {model_uri or cfg.model.checkpoint}",
               lambda r: f"CA {percent(r.clean_accuracy)}, ASR {percent(r.attack_success_rate)}")
def evaluate(cfg: Config, model_uri: str | None = None) -> EvalResult:
    """CA of the model (`model_uri`, else `cfg.model`) on `data.test`, and ASR when `evaluate.trigger` exists."""
    started = time.time()
    ev = cfg.evaluate
    storage.claim_output(ev.output, "evaluate", cfg.storage)
    test = load_test_set(cfg)
    attack = test.attack
    device = pick_device(cfg.model.device)
    model_cfg = dataclasses.replace(cfg.model, checkpoint=model_uri) if model_uri else cfg.model
    if not model_cfg.checkpoint:
        log.warning("evaluating a randomly initialised %s: set model.checkpoint or pass --model.", model_cfg.name)
    clip = load_clip(model_cfg, cfg.storage, device, seed=cfg.run.seed)
    chunks = console.track("evaluate", test.chunks(clip.image_size, ev.batch_size), len(test.keys),
                           size=lambda chunk: len(chunk[0]))
    rates = zero_shot_rates(clip, cfg, test, chunks, device)
    ca, asr = rates.clean_accuracy, rates.attack_success_rate
    metrics = {
        "clean_accuracy": ca,
        "clean_accuracy_heldout": rates.clean_accuracy_heldout,
        "attack_success_rate": asr,
        "asr_images": rates.asr_images,
        "clean_target_rate": rates.clean_target_rate,
        "class_accuracy": rates.class_accuracy,
        "target_label": attack.target_label if attack else None,
        "attack": attack.name if attack else None,
        "test_rows": len(test.keys),
        "model": model_cfg.checkpoint or f"{model_cfg.name} (random init, seed {cfg.run.seed})",
        "trigger": attack.uri if attack else None,
        "sample_passes": len(test.keys) * (2 if attack else 1),
        "wall_time_s": round(time.time() - started, 3),
        "fingerprint": evaluation_fingerprint(cfg, model_cfg.checkpoint),
    }
    storage.write_json(storage.join(ev.output, METRICS_JSON), metrics, cfg.storage)
    rows = RowCounts(rows_in=len(test.keys), rows_out=len(test.keys))
    manifest = write_manifest(ev.output, "evaluate", cfg, inputs={"model": metrics["model"], "test": cfg.data.test,
                                                                  "trigger": metrics["trigger"]},
                              rows=rows, started=started, usage=evaluation_usage(metrics["sample_passes"], device),
                              extra={"metrics": metrics})
    return EvalResult(ca, asr, metrics, ev.output, rates.clean_accuracy_heldout, manifest)


def evaluation_usage(passes: int, device: torch.device) -> Usage:
    """The evaluation's cost (cost.py): every test row forwarded once, and once more with the trigger when there
    is an attack (class prompts, text only, not counted), in the driver's process: its torch threads as CPUs,
    its GPU when it runs on one."""
    threads, gpus = torch.get_num_threads(), 1 if device.type == "cuda" else 0
    where = f"1 GPU + {threads} threads" if gpus else f"{threads} torch threads"
    return Usage(passes, 0, cpus=threads, gpus=gpus, devices=f"the driver's process: {where}")


def evaluate_to(cfg: Config, model_uri: str, output: str) -> EvalResult:
    """`evaluate` of `model_uri` with its metrics written to `output` instead of evaluate.output. With
    `pipeline.reuse`, a finished evaluation in evaluate.output of the same model files, test files, trigger and
    prompt settings (the pipeline's, a moment before a defense evaluates the same θ₀) is copied instead of
    measured again; its metrics then name where they came from (`reused_from`)."""
    moved = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, output=output))
    earlier = finished_evaluation(cfg, model_uri) if cfg.pipeline.reuse and output != cfg.evaluate.output else None
    if earlier is None:
        return evaluate(moved, model_uri)
    started = time.time()
    storage.claim_output(output, "evaluate", cfg.storage)
    metrics = {**earlier, "reused_from": cfg.evaluate.output}
    storage.write_json(storage.join(output, METRICS_JSON), metrics, cfg.storage)
    rows = RowCounts(rows_in=metrics["test_rows"], rows_out=metrics["test_rows"])
    manifest = write_manifest(output, "evaluate", moved, inputs={"model": metrics["model"], "test": cfg.data.test,
                                                                 "trigger": metrics["trigger"]},
                              rows=rows, started=started, usage=Usage(devices="none (a copy of an earlier evaluation)"),
                              extra={"metrics": metrics})
    console.log.info(f"[evaluate] reused {cfg.evaluate.output} (the same model, test set, trigger and prompts)")
    return EvalResult(metrics["clean_accuracy"], metrics["attack_success_rate"], metrics, output,
                      metrics["clean_accuracy_heldout"], manifest)


def evaluation_fingerprint(cfg: Config, model_uri: str | None) -> dict | None:
    """What makes two evaluations the same: the model's files and settings, the test and trigger files, the class
    names, templates and held-out prompts (not where the metrics go, nor the batch size); None for a randomly
    initialised model."""
    if not model_uri:
        return None
    c = cfg.to_dict()
    settings = {"evaluate": {k: v for k, v in c["evaluate"].items() if k not in ("output", "batch_size")},
                "data": {k: c["data"][k] for k in ("test", "class_names", "templates")},
                "model": {k: v for k, v in c["model"].items() if k not in ("checkpoint", "device")}}
    return fingerprint(cfg, (), {"model_files": (model_uri, CHECKPOINT_SUFFIXES), **evaluation_files(cfg, True)},
                       settings=settings)


def finished_evaluation(cfg: Config, model_uri: str) -> dict | None:
    """The metrics of the finished evaluation in evaluate.output when it evaluated `model_uri` as `cfg` would."""
    return finished_output(cfg.evaluate.output, lambda: evaluation_fingerprint(cfg, model_uri), cfg, METRICS_JSON)


def evaluation_files(cfg: Config, evaluated: bool) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """The test and trigger files in the fingerprint of a phase that evaluates (`evaluated`), else none; no
    trigger files when there is no trigger (then `evaluate` measures no ASR, as `load_attack` says)."""
    trigger = cfg.evaluate.trigger
    has_trigger = evaluated and bool(trigger) and storage.exists(trigger, cfg.storage)
    return {"test_files": (cfg.data.test if evaluated else None, (".parquet",)),
            "trigger_files": (trigger if has_trigger else None, (".json", ".npy"))}


def read_test_rows(cfg: Config) -> tuple[list[str], list[bytes], np.ndarray]:
    """(keys, image bytes, labels) of the first `evaluate.max_rows` test rows (all when unset)."""
    uri, limit = cfg.data.test, cfg.evaluate.max_rows
    schema = shard_schema(uri, cfg.storage, required=("key", "image"))
    if "label" not in schema.names:
        raise UserError(f"test shards under {uri} have no label column: point data.test at labelled shards "
                        f"(e.g. `ubt prepare fashion-mnist`, or a CSV with prepare.label_column set).")
    table = read_columns(uri, cfg.storage, ["key", "image", "label"], max_rows=limit)
    if table.num_rows == 0:
        raise UserError(f"test shards under {uri} hold no rows: re-create them with `ubt prepare`.")
    label_col = table.column("label")
    if label_col.null_count:
        raise UserError(f"{label_col.null_count} of {table.num_rows} test rows under {uri} have no label: "
                        f"evaluate on shards whose every row is labelled.")
    labels = label_col.to_numpy().astype(np.int64)
    n_classes = len(cfg.data.class_names)
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise UserError(f"test label {int(bad[0])} is outside data.class_names ({n_classes} names): give one name "
                        f"per label of the test set.")
    return table.column("key").to_pylist(), table.column("image").to_pylist(), labels


def load_attack(cfg: Config) -> Attack | None:
    """The trigger at `evaluate.trigger` and its attack.json, or None when unset or not written (no ASR then)."""
    uri = cfg.evaluate.trigger
    if not uri:
        return None
    if not storage.exists(uri, cfg.storage):
        log.warning("no trigger at evaluate.trigger=%s, so ASR is not measured: run `ubt poison` first or set "
                    "evaluate.trigger=null.", uri)
        return None
    with storage.local_copy(uri, cfg.storage) as local:
        try:
            trigger = load_trigger(local)
        except ValueError as e:
            raise UserError(f"evaluate.trigger={uri}: {e}") from None
        meta_file = local / ATTACK_FILE
        if not meta_file.is_file():
            raise UserError(f"evaluate.trigger={uri} has no {ATTACK_FILE} naming the target label: point it at "
                            f"the trigger directory written by `ubt poison`.")
        try:
            meta = storage.read_json(str(meta_file))
        except ValueError:
            meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{ATTACK_FILE} in {uri} is not a JSON object: re-run `ubt poison` to rewrite it.")
    target = meta.get("target_label")
    n_classes = len(cfg.data.class_names)
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_classes:
        raise UserError(f"{ATTACK_FILE} in {uri} has target_label {target!r}, not a class index below {n_classes}: "
                        f"re-run `ubt poison` with the same data.class_names.")
    # `ubt poison` records the name as target_class; target_name is accepted as well.
    name = meta.get("target_name", meta.get("target_class"))
    if name is not None and name != cfg.data.class_names[target]:
        log.warning("%s in %s names the target %r but data.class_names[%d] is %r: evaluating with the latter.",
                    ATTACK_FILE, uri, name, target, cfg.data.class_names[target])
    return Attack(trigger, str(meta.get("attack", trigger.kind)), target, uri)


def decode_rows(keys: list[str], images: list[bytes], size: int, attack: Attack | None = None) -> torch.Tensor:
    """uint8 (N, 3, size, size) model inputs; with an attack, the trigger is applied first at the stored resolution."""
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, (key, data) in enumerate(zip(keys, images)):
        try:
            # Triggered like the poisoned training rows were: on the original image, keyed by the row.
            if attack is not None:
                data = apply_to_png(data, attack.trigger, key)
            out[i] = decode_image(data, size)
        except (ValueError, OSError) as e:
            raise UserError(f"test image of row {key!r} cannot be {'triggered' if attack else 'decoded'} ({e}): "
                            f"re-create the test shards with `ubt prepare`.") from None
    return torch.from_numpy(out)


def cli_evaluate(cfg: Config, args: argparse.Namespace) -> dict:
    """`ubt evaluate [--model URI]`: run the phase and return its metrics."""
    model_uri = getattr(args, "model", None)
    check_other_evaluation(cfg, model_uri or cfg.model.checkpoint)
    return evaluate(cfg, model_uri).metrics


def check_other_evaluation(cfg: Config, model_uri: str | None) -> None:
    """Refuse to replace, in evaluate.output, a finished evaluation of another model (by default that folder holds
    θ₀'s, which `ubt evaluate --model <cleaned model>` would otherwise overwrite) unless --overwrite was given."""
    manifest = storage.join(cfg.evaluate.output, storage.MANIFEST)
    if storage.overwrite_allowed() or not model_uri or not storage.exists(manifest, cfg.storage):
        return
    try:
        done = storage.read_json(manifest, cfg.storage)
        earlier, checkpoint = done["inputs"]["model"], done["metrics"]["fingerprint"] is not None
    except (ValueError, KeyError, TypeError):
        return  # not an evaluation's manifest: claim_output judges that folder
    # A randomly initialised model's evaluation (no checkpoint) is not worth a refusal.
    if checkpoint and isinstance(earlier, str) and storage.absolute(earlier) != storage.absolute(model_uri):
        raise UserError(f"{cfg.evaluate.output} holds the evaluation of {earlier}: to keep it, send this one "
                        f"elsewhere with experimental.evaluate.output=PATH, or pass --overwrite to replace it.")
