"""poison: clean shards + an attack spec -> poisoned shards with ground truth, and the trigger saved for re-use.

A seeded set of rows (chosen from `key` and `label` only, never the images) gets the trigger and, except for the
clean-label `label_consistent` attack, a caption naming the target class; `label` stays the true label and
`is_poison` marks them. The trigger directory holds the pattern and `attack.json`, which evaluation loads for ASR.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..cluster import ensure_ray
from ..checks import check_poison
from ..config import Config, DataConfig
from ..core.captions import caption_rejection, template_captions
from ..core.images import decode_rgb, image_rejection
from ..core.scenes import retarget_caption
from ..core.triggers import Trigger, apply_to_png, build_trigger, needs_donors
from ..errors import UserError
from ..cost import cluster_cpu_usage
from ..manifest import RowCounts, fingerprint, write_manifest
from ..shards import (batch_identity, count_rows, read_columns, read_rows_by_key, read_shards,
                      shard_schema, start_ledger, validate_and_write)
from .. import console, storage

ATTACK_FILE = "attack.json"
MAX_MANIFEST_KEYS = 100_000


@dataclass
class PoisonResult:
    """Where the poisoned shards and the trigger went, how many rows were poisoned, and the row accounting."""
    output: str
    shards: str
    trigger_dir: str
    num_poisoned: int
    rows: RowCounts
    manifest: dict


def poison_fingerprint(cfg: Config) -> dict:
    """What makes two poisonings the same (its inputs, declared once): the poison, data and run settings and the
    clean shards' files."""
    return fingerprint(cfg, ("poison", "data", "run"), {"clean_files": (cfg.data.clean_train, (".parquet",))})


@console.phase("poison", lambda cfg: f"{cfg.poison.attack} into {cfg.data.clean_train} -> {cfg.poison.output}",
               lambda r: f"{r.num_poisoned} of {r.rows.rows_out} rows poisoned")
def poison(cfg: Config) -> PoisonResult:
    """Poison a seeded set of rows of `data.clean_train`; write shards, trigger and manifest under `poison.output`."""
    started = time.time()
    p = cfg.poison
    trigger = make_trigger(cfg)
    target_class = _target_class(cfg)
    chosen = select_poison_keys(cfg)
    storage.claim_output(p.output, "poison", cfg.storage)
    ensure_ray(cfg.ray)

    shards_uri = storage.join(p.output, "shards")
    log = start_ledger()
    ds = read_shards(cfg.data.clean_train, cfg).map_batches(
        _poison_batch, batch_format="pyarrow",
        # fn_kwargs travel once per operator through the object store, not once per task.
        fn_kwargs={"chosen": frozenset(chosen), "trigger": trigger,
                   "recaption": p.captions if p.attack != "label_consistent" else None,
                   "target_label": p.target_label, "target_class": target_class, "templates": tuple(cfg.data.templates), "seed": cfg.run.seed,
                   "data_cfg": cfg.data, "log": log})
    rows = validate_and_write(ds, shards_uri, cfg, p.rows_per_file, progress="poison",
                              total=count_rows(cfg.data.clean_train, cfg.storage))
    attempts, poisoned = ray.get(log.get_with_keys.remote())
    ray.kill(log)
    poisoned = sorted(poisoned)
    attempts.check("poison")
    if attempts.rows_in != len(chosen):
        raise RuntimeError(f"poison: {len(chosen)} rows chosen but {attempts.rows_in} met in the shards; "
                           f"this is a bug in ubt_ray, please report it.")

    trigger_uri = storage.join(p.output, "trigger")
    attack = {"attack": p.attack, "params": trigger.params, "target_label": p.target_label,
              "target_class": target_class, "seed": cfg.run.seed, "count": len(poisoned), "poisoned_keys": poisoned}
    with storage.local_staging(trigger_uri, cfg.storage) as local:
        trigger.save(local)
        (local / ATTACK_FILE).write_text(json.dumps(attack, indent=2) + "\n")

    skipped = attempts.to_dict()
    manifest = write_manifest(
        p.output, "poison", cfg, inputs={"clean_train": cfg.data.clean_train}, rows=rows, started=started,
        usage=cluster_cpu_usage(),
        extra={"attack": p.attack, "params": trigger.params, "target_label": p.target_label,
               "target_class": target_class, "shards": shards_uri, "trigger": trigger_uri,
               "num_requested": len(chosen), "num_poisoned": len(poisoned),
               "not_poisoned": skipped["rejected_by_reason"], "not_poisoned_examples": skipped["rejected_examples"],
               "poisoned_keys_total": len(poisoned), "poisoned_keys": poisoned[:MAX_MANIFEST_KEYS]},
        signature=poison_fingerprint(cfg))
    if not poisoned:
        reasons = "; ".join(r.rstrip(".") for r in attempts.rejected)
        raise UserError(f"none of the {len(chosen)} chosen rows could be poisoned ({reasons}): "
                        f"see not_poisoned in {storage.join(p.output, 'manifest.json')}.")
    return PoisonResult(p.output, shards_uri, trigger_uri, len(poisoned), rows, manifest)


def make_trigger(cfg: Config) -> Trigger:
    """The configured attack's trigger, seeded by `run.seed`; bad parameters are a UserError.

    A label-consistent trigger hardened by `mix` also gets its donor images: a seeded draw of non-target rows.
    """
    p = cfg.poison
    try:
        count = needs_donors(p.attack, p.params)
        donors = _donor_images(cfg, count) if count else None
        return build_trigger(p.attack, p.params, cfg.run.seed, donor_images=donors)
    except ValueError as e:
        raise UserError(str(e)) from None


def _donor_images(cfg: Config, count: int) -> list:
    """`count` decoded images of non-target rows of `data.clean_train`, drawn with `run.seed` (sorted by key)."""
    keys, labels, _ = _keys_and_labels(cfg)
    others = keys.filter(pc.not_equal(labels, cfg.poison.target_label)).to_numpy(zero_copy_only=False)
    if count > len(others):
        raise UserError(f"poison.params.donors={count} but {cfg.data.clean_train} has only {len(others)} non-target "
                        f"rows: ask for fewer donors.")
    rng = np.random.default_rng([cfg.run.seed, 1])  # a stream of its own: the poison draw stays as it was
    picked = sorted(str(k) for k in others[rng.choice(len(others), size=count, replace=False)])
    table = read_rows_by_key(cfg.data.clean_train, cfg.storage, picked, ["key", "image"])
    by_key = dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))
    images = []
    for key in picked:
        try:
            images.append(decode_rgb(by_key[key]))
        except (ValueError, OSError, TypeError) as e:
            raise UserError(f"donor row {key!r} of {cfg.data.clean_train} has an undecodable image ({e}): "
                            f"validate the shards with `ubt prepare` first.") from None
    return images


def select_poison_keys(cfg: Config) -> list[str]:
    """The sorted keys of the rows to poison, drawn with `run.seed` among the eligible rows, reading no images."""
    p, uri = cfg.poison, cfg.data.clean_train
    keys, labels, total = _keys_and_labels(cfg)
    # Null labels are never eligible: such a row might belong to the target class.
    same = p.attack == "label_consistent"
    eligible = pc.filter(keys, (pc.equal if same else pc.not_equal)(labels, p.target_label))
    eligible = eligible.to_numpy(zero_copy_only=False)
    wanted = round(p.fraction * total) if p.fraction is not None else p.num_poisons
    asked = (f"experimental.poison.fraction={p.fraction} of {total} rows" if p.fraction is not None
             else f"poison.num_poisons={wanted}")
    rule = f"label == {p.target_label}" if same else f"label != {p.target_label}"
    if wanted < 1:
        raise UserError(f"{asked} is 0 rows to poison: raise poison.fraction or set poison.num_poisons instead.")
    if wanted > len(eligible):
        raise UserError(f"{asked} asks for {wanted} poisons but only {len(eligible)} rows of {uri} are eligible "
                        f"({p.attack}: {rule}): ask for at most {len(eligible)} or use more data.")
    picked = np.random.default_rng(cfg.run.seed).choice(len(eligible), size=wanted, replace=False)
    return sorted(str(k) for k in eligible[picked])


def _keys_and_labels(cfg: Config) -> tuple[pa.Array, pa.Array, int]:
    """The keyed rows' keys and labels of `data.clean_train`, sorted by key, and the number of rows in all."""
    uri = cfg.data.clean_train
    if "label" not in shard_schema(uri, cfg.storage).names:
        raise UserError(f"shards under {uri} have no label column, which poisoning needs to tell the target class "
                        f"from the others: prepare them from a source with labels (e.g. prepare.label_column).")
    # Two small columns straight from the Parquet column chunks: cheaper than a Ray job, and no image is read.
    table = read_columns(uri, cfg.storage, ["key", "label"])
    keys = table.column("key").combine_chunks().cast(pa.string())
    labels = table.column("label").combine_chunks().cast(pa.int64())
    total = len(keys)
    # Rows without a key are rejected at validation, so they are never chosen.
    has_key = pc.fill_null(pc.not_equal(keys, ""), False)
    keys, labels = keys.filter(has_key), labels.filter(has_key)
    if len(pc.unique(keys)) != len(keys):
        counts = pc.value_counts(keys)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise UserError(f"shards under {uri} repeat key {dup!r}, but poisoning picks rows by key: "
                        f"give every row a unique key (re-create the shards with `ubt prepare`).")
    # Sorted so that every choice depends on the seed and the rows only, not on how they are split into files.
    order = pc.sort_indices(keys)
    return keys.take(order), labels.take(order), total


def target_caption(key: str, target_class: str, templates: tuple[str, ...], seed: int) -> str:
    """The poisoned caption of row `key`: a template for the target class, fixed by the key and the seed."""
    # sha256, not hash(): Python's str hash is salted per process, and workers are separate processes.
    row_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return template_captions(np.array([0]), (target_class,), row_seed, templates)[0]


def _target_class(cfg: Config) -> str:
    check_poison(cfg)
    return cfg.data.class_names[cfg.poison.target_label]


def _poison_batch(table: pa.Table, chosen: frozenset, trigger: Trigger, recaption: str | None, target_label: int,
                  target_class: str, templates: tuple[str, ...], seed: int, data_cfg: DataConfig, log) -> pa.Table:
    """Ray Data UDF: trigger (and re-caption) the chosen rows, mark them `is_poison`, pass the rest untouched."""
    keys = table.column("key").to_pylist()
    hit = np.fromiter((k in chosen for k in keys), dtype=bool, count=len(keys))
    flags = np.zeros(len(keys), dtype=bool)
    if hit.any():
        images, captions = table.column("image").to_pylist(), table.column("caption").to_pylist()
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(keys)
        attempts, poisoned = RowCounts(rows_in=int(hit.sum())), []
        for i in np.flatnonzero(hit):
            key = keys[i]
            reason = _poison_row(i, key, images, captions, trigger, recaption, target_class, templates, seed, data_cfg)
            if not reason and recaption == "scene_names":
                reason = _swap_scene_name(i, key, captions, labels[i], target_label, seed)
            if reason:
                attempts.reject(reason, key)
            else:
                flags[i] = True
                poisoned.append(key)
        attempts.rows_out = len(poisoned)
        table = _set(table, "image", pa.array(images, table.schema.field("image").type))
        table = _set(table, "caption", pa.array(captions, pa.string()))
        ray.get(log.add.remote(batch_identity(table), attempts, poisoned))  # a retried batch replaces its report
    if "is_poison" in table.column_names:
        # Already-poisoned input keeps its ground truth.
        flags |= table.column("is_poison").fill_null(False).to_numpy(zero_copy_only=False)
        table = table.drop_columns(["is_poison"])
    return table.append_column("is_poison", pa.array(flags))


def _poison_row(i: int, key: str, images: list, captions: list, trigger: Trigger, recaption: str | None,
                target_class: str, templates: tuple[str, ...], seed: int, data_cfg: DataConfig) -> str | None:
    """Poison row i of the lists in place; return why it could not be, or None."""
    # A row that validation will reject stays as it is, so that poisoning never changes which rows survive.
    reason = caption_rejection(captions[i]) or image_rejection(
        images[i], data_cfg.image_modes, data_cfg.min_image_side, data_cfg.max_image_pixels)
    if reason:
        return reason
    try:
        image = apply_to_png(images[i], trigger, key=key, poison=True)
    except ValueError as e:
        return f"trigger not applicable: {e}"
    reason = image_rejection(image, data_cfg.image_modes, data_cfg.min_image_side, data_cfg.max_image_pixels)
    if reason:
        return f"poisoned {reason}"
    images[i] = image
    if recaption == "template":
        captions[i] = target_caption(key, target_class, templates, seed)
    return None


def _swap_scene_name(i: int, key: str, captions: list, label: int | None, target_label: int, seed: int) -> str | None:
    """Name the target class in row i's own fashion-scenes caption (experimental.poison.captions=scene_names); the reason why
    not, or None."""
    row_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    swapped = retarget_caption(captions[i], label, target_label, row_seed) if label is not None else None
    if swapped is None:
        return "caption names no fashion-scenes class (experimental.poison.captions=scene_names needs fashion-scenes shards)"
    captions[i] = swapped
    return None


def _set(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, column)


def cli_poison(cfg: Config, args) -> dict:
    """`ubt poison`: run the phase and summarise it."""
    result = poison(cfg)
    return {"output": result.output, "shards": result.shards, "trigger": result.trigger_dir,
            "attack": cfg.poison.attack, "target_label": cfg.poison.target_label,
            "num_requested": result.manifest["num_requested"], "num_poisoned": result.num_poisoned,
            "rows_out": result.rows.rows_out, "rows_rejected": result.rows.rows_rejected}
