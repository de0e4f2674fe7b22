"""Typed, documented run configuration: YAML files plus `section.key=value` overrides, strictly validated.

Every field carries its help text and its allowed values in `field(metadata=...)`, so that an unknown key,
a wrong type or an out-of-range value stops the run with one sentence naming the key and what is allowed.
String values may refer to other keys as `${section.key}`; they are resolved after all overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .core.captions import FASHION_MNIST_CLASSES, FASHION_MNIST_HELDOUT_CLASSES, HELDOUT_TEMPLATES, TEMPLATES
from .core.names import ATTACKS, COMBINES, FORGET_LOSSES, SALIENCIES, SCORE_METHODS, TRAINABLE
from .errors import ConfigError


def _f(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, lt: float | None = None, experimental: bool = False) -> Any:
    """A config field with help text, its allowed values and its tier: user-facing, or experimental (a research or
    ablation knob, or tuning whose default is right for almost everyone), set only under `experimental:`."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "experimental": experimental}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    name: str = _f("quickstart", "Name of the run, used in reports.")
    output_dir: str = _f("outputs/quickstart", "Root of every output of the run (local path or s3://bucket/prefix).")
    seed: int = _f(0, "Seed of every random choice (caption templates, poison rows, initialisation).", ge=0)


@dataclass
class RayConfig:
    address: str | None = _f(None, "Ray cluster to join ('auto': this machine's `ray start` cluster; "
                             "'ray://host:10001'); null starts a private local one.")
    num_cpus: int | None = _f(None, "CPUs of a local Ray started by this run; null uses all of them.", ge=1,
                              experimental=True)
    parquet_reader: str = _f("v1", "Ray Data's Parquet read path: v1 (ParquetDatasource, one task per file; cheap "
                             "per read) or v2 (ListFiles -> ReadFiles).",
                             choices=("v1", "v2"), experimental=True)


@dataclass
class StorageConfig:
    endpoint_url: str | None = _f(None, "S3-compatible endpoint for s3:// paths (e.g. http://127.0.0.1:9000); null means AWS.")
    region: str = _f("us-east-1", "S3 region of the buckets (AWS; most S3-compatible servers ignore it).")
    connect_timeout_s: float = _f(5.0, "Seconds to wait for an S3 connection before reporting it unreachable.", gt=0,
                                  experimental=True)


@dataclass
class DataConfig:
    clean_train: str = _f("${run.output_dir}/data/train", "Clean training shards (what `prepare` writes, what `poison` reads).")
    train: str = _f("${run.output_dir}/poison/shards", "Parquet shards the model is trained on: the suspicious set D.")
    test: str = _f("${run.output_dir}/data/test", "Clean labelled Parquet shards for evaluation.")
    class_names: list[str] = _f(list(FASHION_MNIST_CLASSES), "Class names (label i is class_names[i]) for captions and zero-shot.")
    templates: list[str] = _f(list(TEMPLATES), "Caption templates, '{}' stands for the class name.")
    image_modes: list[str] = _f(["1", "L", "LA", "P", "RGB", "RGBA"],
                                "PIL image modes accepted; others (CMYK, I;16, F ...) are rejected.", experimental=True)
    min_image_side: int = _f(8, "Images with a side shorter than this many pixels are rejected.", ge=1,
                             experimental=True)
    max_image_pixels: int = _f(50_000_000, "Images with more pixels than this are rejected.", ge=1, experimental=True)


@dataclass
class ModelConfig:
    name: str = _f("ubt-tiny-vit", "open_clip model name (ViT-B-32, RN50 ...) or a config shipped in ubt_ray/model_configs.")
    checkpoint: str | None = _f(None, "open_clip local-dir checkpoint (local or s3://) to start from; null initialises randomly.")
    device: str = _f("auto", "Device of in-process model work.", choices=("auto", "cpu", "cuda"), experimental=True)
    precision: str = _f("fp32", "Numeric precision; amp_* is mixed precision on GPU.", choices=("fp32", "amp_bf16", "amp_fp16"))


@dataclass
class TrainerConfig:
    """The Ray Train run of every training phase (attack training, overfit, unlearn, baselines): its workers,
    their resources, checkpoints and restarts. Each phase's schedule is in its own section."""
    num_workers: int = _f(1, "Ray Train workers (DDP) of every training phase; 0 runs the loop in this process (Ray "
                             "Train's in-process mode: no worker group to start, but no checkpoint to resume from "
                             "after a crash).", ge=0)
    use_gpu: bool = _f(False, "One GPU per Ray Train worker, mixed precision (model.precision).")
    cpus_per_worker: int = _f(1, "CPUs reserved per Ray Train worker (Ray resources).", ge=1, experimental=True)
    threads_per_worker: int | None = _f(None, "Torch threads per Ray Train worker; null: this node's cores / "
                                              "workers.", ge=1, experimental=True)
    resume: bool = _f(True, "Resume a training phase from the last checkpoint under its <output>/ray if there is "
                            "one.", experimental=True)
    max_failures: int = _f(2, "Restarts of a training phase from its last checkpoint after a worker failure.", ge=0,
                           experimental=True)
    checkpoints_per_epoch: int = _f(1, "Checkpoints saved per epoch of a training phase (Ray Train reports).", ge=1,
                                    experimental=True)


SOURCES = ("fashion-mnist", "fashion-scenes", "csv", "webdataset")  # what `ubt prepare` reads


@dataclass
class PrepareConfig:
    source: str = _f("fashion-mnist", "Kind of input: Fashion-MNIST's idx files, fashion-scenes "
                        "made from them, a CSV of image paths and captions, or webdataset .tar shards.", choices=SOURCES)
    input: str = _f("/usr/share/datasets/fashion-mnist",
                    "Input: the idx directory, a CleanCLIP-style CSV file, or a directory/prefix of .tar shards.")
    output: str = _f("${run.output_dir}/data", "Where the Parquet shards go (fashion-mnist writes train/ and test/ under it).")
    rows_per_file: int = _f(10_000, "Rows per written Parquet file.", ge=1, experimental=True)
    image_column: str = _f("image", "CSV column holding the image path (relative to the CSV's directory).")
    caption_column: str = _f("caption", "CSV column holding the caption.")
    label_column: str | None = _f(None, "CSV column holding an integer label, if any.")
    csv_delimiter: str = _f(",", "CSV field delimiter.", experimental=True)
    allow_absolute_paths: bool = _f(False, "Let CSV image paths be absolute (/... or s3://...) and lie outside the "
                                           "CSV's folder; relative paths must stay inside it either way.",
                                           experimental=True)


@dataclass
class PoisonConfig:
    attack: str = _f("badnet", "Backdoor attack.", choices=ATTACKS)
    params: dict = _f({}, "Trigger parameters (badnet: size, location; blended: alpha; sig: amplitude, frequency; "
                          "wanet: grid_size, strength); unset ones take the trigger's defaults.")
    target_label: int = _f(0, "Target class index: poisoned captions name data.class_names[target_label].", ge=0)
    num_poisons: int = _f(300, "Rows to poison (ignored when experimental.poison.fraction is set).", ge=1)
    fraction: float | None = _f(None, "Share of rows to poison, instead of num_poisons.", gt=0, le=1, experimental=True)
    output: str = _f("${run.output_dir}/poison", "Poisoned shards go to <output>/shards, the trigger to <output>/trigger.",
                     experimental=True)
    rows_per_file: int = _f(10_000, "Rows per written Parquet file.", ge=1, experimental=True)
    captions: str = _f("template", "How a poisoned row's caption names the target class: template (a data.templates "
                       "caption) or scene_names (the row's own fashion-scenes caption with its class noun swapped "
                       "for a target-class noun, so that poisons read like the clean captions).",
                       choices=("template", "scene_names"), experimental=True)


@dataclass
class Schedule:
    """How a training phase optimises: AdamW, a linear warmup to `lr`, then a cosine decay to zero at the last
    step. Train, overfit, unlearn and the baselines each hold one, with their own defaults; a phase's length is
    its `steps` or its `epochs`, whichever it has."""
    lr: float = _f(2e-3, "Peak learning rate of AdamW, reached after the warmup, then decayed to zero by a cosine.",
                   gt=0)
    batch_size: int = _f(128, "Rows per optimiser step, over all workers together.", ge=2)
    warmup_steps: int = _f(50, "Optimiser steps of the linear warmup from zero to lr.", ge=0, experimental=True)
    weight_decay: float = _f(0.1, "AdamW weight decay (gains, biases and embeddings never decay).", ge=0,
                             experimental=True)

    def values(self) -> dict:
        """The schedule's settings alone (a phase's section holds others too)."""
        names = [f.name for f in dataclasses.fields(Schedule)] + [n for n in ("epochs", "steps") if hasattr(self, n)]
        return {n: getattr(self, n) for n in names}

    def steps_per_epoch(self, rows: int) -> int:
        """Optimiser steps of one pass over `rows` rows (at least one)."""
        return max(1, rows // self.batch_size)

    def total_steps(self, rows: int) -> int:
        """Optimiser steps of a run over `rows` rows: `steps` where the phase has it set, else `epochs` passes."""
        steps = getattr(self, "steps", None)
        return steps or max(1, math.ceil(self.epochs * self.steps_per_epoch(rows)))


def _like(name: str, default: Any, **meta: Any) -> Any:
    """Schedule's field `name` with a phase's own default (and, in `meta`, its own tier)."""
    base = next(f for f in dataclasses.fields(Schedule) if f.name == name)
    return field(default=default, metadata={**base.metadata, **meta})


@dataclass
class TrainConfig(Schedule):
    epochs: float = _f(1.1, "Passes over the training rows; fractions allowed.", gt=0)
    steps: int | None = _f(None, "Optimiser steps; when set it replaces epochs.", ge=1, experimental=True)
    output: str = _f("${run.output_dir}/attack", "Run directory: final model in <output>/model, Ray Train state in <output>/ray.",
                     experimental=True)


@dataclass
class EvaluateConfig:
    trigger: str | None = _f("${poison.output}/trigger", "Saved trigger directory for ASR; null skips ASR.")
    max_rows: int | None = _f(None, "Evaluate on the first this many test rows (null: all).", ge=1, experimental=True)
    batch_size: int = _f(512, "Rows per inference batch.", ge=1, experimental=True)
    output: str = _f("${train.output}/eval", "Where metrics.json goes.", experimental=True)
    heldout_class_names: list[str] = _f(list(FASHION_MNIST_HELDOUT_CLASSES),
                                        "Class names (one per data.class_names entry) of a second zero-shot prompt "
                                        "set that the training captions never use; [] skips held-out CA.")
    heldout_templates: list[str] = _f(list(HELDOUT_TEMPLATES), "Templates ('{}' for the class name) of the "
                                      "held-out prompt set; none of them should occur in the training captions.")


@dataclass
class DefendConfig:
    model: str = _f("${train.output}/model", "The possibly backdoored open_clip checkpoint θ₀ (local-dir, local or s3://).")
    data: str = _f("${data.train}", "The suspicious shards D the model was trained on.")
    output: str = _f("${run.output_dir}/defend", "Root of the defense's outputs; report.json and report.md go here.")
    overfit: bool = _f(True, "Run the overfit phase (METHOD.md step 1) and score with its model θₒ; false skips it "
                             "and scores with θ₀.", experimental=True)
    evaluate: bool = _f(True, "Evaluate θ₀ and the cleaned model (CA, ASR) for the report.")


@dataclass
class OverfitConfig(Schedule):
    lr: float = _like("lr", 5e-4, experimental=True)
    batch_size: int = _like("batch_size", 128, experimental=True)
    warmup_steps: int = _like("warmup_steps", 12, experimental=True)
    weight_decay: float = _like("weight_decay", 0.0, experimental=True)
    steps: int = _f(60, "Optimiser steps of the overfit run.", ge=1, experimental=True)
    subset_fraction: float = _f(1.0, "Share of D to overfit on.", gt=0, le=1, experimental=True)
    prioritize: str = _f("none", "Which rows form the subset: a seeded sample, or those with the weakest "
                                 "image-text similarity under θ₀ (needs subset_fraction < 1).",
                         choices=("none", "weak_similarity"), experimental=True)
    output: str = _f("${defend.output}/overfit", "Overfit run directory; the model θₒ goes to <output>/model.",
                     experimental=True)


@dataclass
class ScoreConfig:
    method: str = _f("token_drop", "Suspicion score: drop of similarity under trigger-removing transforms, plain "
                                    "cosine, per-sample loss against a fixed negative bank, or caption_disagreement "
                                    "(a row's caption against those of the rows that look like it; no trigger "
                                    "assumed, none of the image tower used; experimental: it needs pixel-space "
                                    "neighbours and repeated captions, and gathers the rows on the driver).",
                     choices=SCORE_METHODS, experimental=True)
    token_portions: list[float] = _f([1 / 64, 4 / 64], "ρ values: share of image tokens the token_mask transform "
                                                        "masks; with several, the drop is the mean of the drops at "
                                                        "each (one more image forward per row for each), which keeps "
                                                        "the mask's tail from rivalling blur's on a whole-image "
                                                        "trigger the mask does not remove.", experimental=True)
    saliency: str = _f("auto", "Token saliency of token_mask: attention = the class token's attention to each "
                                "patch in score.attention_blocks (no backward; auto picks it for a ViT, gradient "
                                "otherwise); token = |d cos / d token| at the transformer input; gradient = "
                                "|d cos / dx| per token's pixels; gradient_x_input = that times |x| (METHOD.md's).",
                       choices=SALIENCIES, experimental=True)
    attention_blocks: list[int] = _f([0], "Transformer blocks whose class-token attention is the attention "
                                          "saliency (summed); 0 is the first.", experimental=True)
    amp: bool = _f(True, "Score with bf16 weights on a CPU that runs bf16 natively (AVX512-BF16/AMX), else "
                         "fp32; a GPU always scores in fp32 (bf16 autocast there blurs the small drops the score ranks).",
                         experimental=True)
    transforms: list[str] = _f(["token_mask", "blur"], "Trigger-removing transforms of token_drop (token_mask, "
                                                       "blur, downup): the mask removes a local patch, blur a "
                                                       "whole-image pattern; several are combined by score.combine.",
                               experimental=True)
    density: list[str] = _f([], "Local-density scores of each row's image embedding, against a fixed seeded "
                                 "reference of other rows' image and caption embeddings (kdist, slof, dao; Huang et "
                                 "al., ICLR 2025), added to the transforms' drops as signals that assume no trigger "
                                 "shape; computed in the same actor pass.", experimental=True)
    density_k: int = _f(16, "k of the density scores: neighbours per row in the reference; keep it above the "
                            "poisons a reference of score.reference_rows rows can hold.", ge=2, experimental=True)
    reference_rows: int = _f(2048, "Rows of the density reference (the seeded sample of lowest key rank): every "
                                   "actor embeds them once, and memory grows with them, not with the dataset.", ge=3,
                                   experimental=True)
    transfer_pool: int = _f(4, "Re-rank the top transfer_pool x unlearn.num_samples rows by the trigger-transfer "
                               "test: what each row's transform removes, put on reference images, pulls them to the "
                               "row's caption if it is a trigger and not if it is the object's own detail; the rank "
                               "by that lift is summed with the rank by score (0: off).", ge=0, experimental=True)
    transfer_refs: int = _f(32, "Reference images of the transfer test (seeded rows outside the pool); each costs "
                                "one image forward per pool row.", ge=1, experimental=True)
    combine: str = _f("pick", "How several signals (transforms' drops, density scores) become one score: max_z = "
                               "each row's largest standardised signal; pick = the signal whose top "
                               "unlearn.num_samples drops stand furthest above its median (in robust standard "
                               "deviations, 1.4826 MAD): the transform that removes this dataset's trigger.",
                      choices=COMBINES, experimental=True)
    neighbour_ranks: list[int] = _f([100, 400], "caption_disagreement: the neighbours are the rows ranked first to "
                                                "last - 1 by pixel-space similarity (a ring: a warp trigger packs "
                                                "the poisons into clusters whose nearest members are poisons).",
                                                experimental=True)
    neighbour_dims: int = _f(64, "caption_disagreement: principal axes of the grey-level pixels (32x32) the "
                                 "neighbours are found in.", ge=1, le=1024, experimental=True)
    target_concept: bool = _f(True, "caption_disagreement: rank first the rows whose caption is the concept the "
                                    "unlearn.num_samples most disagreeing rows share (an attack's poisons share its "
                                    "target's caption).", experimental=True)
    concept_similarity: float = _f(0.9, "caption_disagreement: text-feature cosine to that concept's caption from "
                                        "which a caption belongs to it.", ge=-1, le=1, experimental=True)
    negatives: int = _f(1024, "Captions in the negative bank of the loss score (the first distinct ones of D).", ge=1,
                        experimental=True)
    batch_size: int = _f(256, "Rows per scoring batch, and per model forward (a smaller block is padded to it, so that "
                                   "a row's score does not depend on its batch, to the last bit).", ge=1,
                                   experimental=True)
    num_actors: int | None = _f(None, "Scoring actors; null: one per GPU with use_gpu, else one per CPU of the "
                                       "Ray cluster, single-threaded (a multi-threaded actor waits whenever another "
                                       "process preempts one of its threads).", ge=1)
    cpus_per_actor: float | None = _f(None, "CPUs reserved per scoring actor (Ray resources; a fraction below 1 or "
                                             "a whole number); null: 1 with use_gpu, else the cluster's CPUs less one "
                                             "per node, shared among the actors, so that the read tasks always find "
                                             "a free CPU.", gt=0, experimental=True)
    threads_per_actor: int | None = _f(None, "Torch threads per actor; null: this node's cores / actors.", ge=1,
                                       experimental=True)
    use_gpu: bool = _f(False, "One GPU per scoring actor.")
    top_k: list[int] = _f([50, 100, 150, 300, 600], "k of the precision@k / recall@k detection metrics.",
                          experimental=True)
    output: str = _f("${defend.output}/score", "Score table in <output>/table, detection metrics and histogram beside it.",
                     experimental=True)


@dataclass
class SelectConfig:
    retain_samples: int = _f(8192, "Rows in the retain set.", ge=1, experimental=True)
    retain_pool: float = _f(0.95, "The retain set is a seeded sample of this least suspicious share of D: most of "
                                  "D, so that its captions are spread like D's, without the suspicious tail.",
                            gt=0, le=1, experimental=True)
    output: str = _f("${defend.output}/select", "Forget rows go to <output>/forget, retain rows to <output>/retain.",
                     experimental=True)


@dataclass
class UnlearnConfig(Schedule):
    lr: float = _like("lr", 4e-4, experimental=True)
    batch_size: int = _like("batch_size", 256, help="Retain rows per optimiser step, over all workers together.",
                            experimental=True)
    warmup_steps: int = _like("warmup_steps", 5, experimental=True)
    weight_decay: float = _like("weight_decay", 0.0, experimental=True)
    num_samples: int = _f(300, "k: the most suspicious rows to unlearn.", ge=1)
    token_portion: float = _f(4 / 64, "ρ: share of each selected image's most salient tokens the forget loss acts on.",
                              gt=0, le=1, experimental=True)
    forget: str = _f("auto", "Forget loss: token_invariance (f_θ(x) pulled to f_θ₀(x̄), x̄ = x with its "
                                         "top-ρ tokens masked; METHOD.md's), push_away (cos(f_θ(x), g_θ(t)) of each "
                                         "selected pair pushed below unlearn.margin), local_push (push_away on the "
                                         "top-ρ tokens alone), invariance_push (the sum of token_invariance and "
                                         "push_away), auto (per row: token_invariance where the token mask flagged "
                                         "it, push_away at unlearn.whole_image_weight where blur or downup did).",
                      choices=FORGET_LOSSES, experimental=True)
    steps: int = _f(50, "Optimiser steps.", ge=1, experimental=True)
    forget_weight: float = _f(1.0, "λ_f: weight of the forget loss against the retain (CLIP) loss.", ge=0,
                              experimental=True)
    whole_image_weight: float = _f(4.0, "λ_f of the rows a whole-image transform (blur, downup) flagged, under "
                                        "forget: auto (push_away); larger than forget_weight because a whole-image "
                                        "trigger is spread over every token.", ge=0, experimental=True)
    margin: float = _f(0.2, "Cosine margin of push_away, local_push and invariance_push: pairs already below it "
                            "are left alone.", ge=-1, le=1, experimental=True)
    anchor_weight: float = _f(4.0, "λ_a: weight of a term that keeps the retain batch's image and caption features "
                                   "at θ₀'s (1 - cosine), so that zero-shot ability beyond the training captions' "
                                   "words moves less; 0 turns it off (it costs one θ₀ forward per step).", ge=0,
                              experimental=True)
    push_text: bool = _f(False, "Whether the push terms also move the caption's text features; false (the default) "
                                "pushes only the image features away, so the caption's words (the target class's "
                                "name) stay where the clean rows put them and that class's CA holds better.",
                         experimental=True)
    trainable: str = _f("all", "Parameters that move.", choices=TRAINABLE, experimental=True)
    forget_batch_size: int = _f(64, "Forget rows per optimiser step, over all workers together.", ge=1,
                                experimental=True)
    output: str = _f("${defend.output}/unlearn", "Unlearn run directory; the cleaned model goes to <output>/model.",
                     experimental=True)


PHASES = ("prepare", "poison", "train", "evaluate", "defend")


@dataclass
class BaselineConfig(Schedule):
    model: str = _f("${defend.model}", "The backdoored checkpoint the baselines fine-tune.", experimental=True)
    data: str = _f("${data.clean_train}", "Clean image-caption shards the baselines train on.", experimental=True)
    rows: int | None = _f(None, "Clean pairs used: a seeded hash sample of about this many rows of baseline.data "
                                "(CleanCLIP's standard is 100,000); null: all of them.", ge=1, experimental=True)
    lr: float = _like("lr", 1e-5, experimental=True)  # CleanCLIP's
    batch_size: int = _like("batch_size", 128, experimental=True)
    warmup_steps: int = _like("warmup_steps", 50, experimental=True)
    weight_decay: float = _like("weight_decay", 0.1, experimental=True)
    epochs: float = _f(10.0, "Passes over the clean pairs (CleanCLIP's standard: 10).", gt=0, experimental=True)
    inmodal_weight: float = _f(1.0, "CleanCLIP: weight of the in-modal (image-image, text-text) losses.", ge=0,
                               experimental=True)
    clip_weight: float = _f(1.0, "CleanCLIP: weight of the multimodal CLIP loss.", ge=0, experimental=True)
    output: str = _f("${run.output_dir}/baseline", "Baseline runs go to <output>/<ft|cleanclip>; models to .../model.",
                     experimental=True)


@dataclass
class CompareConfig:
    attacks: list[str] = _f([], "Attack configs to compare the defenses on (paths to YAML, e.g. configs/attacks/sig.yaml).")
    defenses: list[str] = _f(["none", "ft", "cleanclip", "ubt"], "Defenses to run on each attack's backdoored model.")
    layers: list[str] = _f([], "Config files layered over every attack config, e.g. [benchmarks/configs/density.yaml] for "
                               "a defense setting.", experimental=True)
    overrides: list[str] = _f([], "section.key=value overrides applied to every attack config (then the command line's).",
                              experimental=True)
    output: str = _f("outputs/compare", "comparison.md, comparison.csv, comparison.png and comparison.json go here.",
                     experimental=True)


@dataclass
class PipelineConfig:
    phases: list[str] = _f(list(PHASES), f"Phases `ubt pipeline` runs, in order; any of {', '.join(PHASES)}.")
    reuse: bool = _f(True, "Skip prepare/poison when their output's manifest holds the same config, and defend when "
                           "defend.output holds a defense of the same settings, model and data files; copy an "
                           "evaluation in evaluate.output of the same model, test set, trigger and prompts instead "
                           "of measuring it again.", experimental=True)


@dataclass
class SweepConfig:
    space: dict = _f({"unlearn.num_samples": {"grid": [150, 300, 600]},
                      "unlearn.token_portion": {"grid": [0.015625, 0.0625, 0.25]}},
                     "Search space: config key -> {grid: [values]}, {choice: [values]}, {uniform: [low, high]}, "
                     "{loguniform: [low, high]} or {randint: [low, high]} (high excluded); unlearn.* and trainer.* "
                     "keys only, since every trial shares the scores, the selection, the model and the evaluation.")
    repeats: int = _f(1, "Times the space is sampled (Tune's num_samples): each grid point runs this many times, "
                         "each random key is drawn anew every time.", ge=1, experimental=True)
    objective: str = _f("ca_subject_to_asr", "What the sweep maximises: clean accuracy among trials with ASR <= "
                                             "asr_threshold (those above it rank below, lowest ASR first), clean "
                                             "accuracy alone, minus ASR, or CA - ASR.",
                        choices=("ca_subject_to_asr", "ca", "asr", "ca_minus_asr"), experimental=True)
    asr_threshold: float = _f(0.05, "Attack success rate a trial must not exceed (ca_subject_to_asr).", ge=0, le=1,
                              experimental=True)
    scheduler: str = _f("fifo", "fifo runs every trial to its end; asha stops trials whose intermediate objective "
                                "trails the others' at the same step.", choices=("fifo", "asha"), experimental=True)
    grace_steps: int = _f(20, "ASHA: unlearning steps every trial runs before it may be stopped.", ge=1,
                          experimental=True)
    reduction_factor: float = _f(3.0, "ASHA: a trial must be in the best 1/reduction_factor at a rung to go on.", gt=1,
                                 experimental=True)
    probe_every: int = _f(10, "Unlearning steps between intermediate CA/ASR probes (reported to Tune).", ge=1,
                          experimental=True)
    probe_rows: int = _f(500, "Test rows of each intermediate probe (the first of data.test).", ge=1, experimental=True)
    num_workers: int = _f(1, "Ray Train workers of each trial.", ge=1, experimental=True)
    cpus_per_worker: int = _f(1, "CPUs reserved per Train worker of each trial.", ge=1, experimental=True)
    use_gpu: bool = _f(False, "One GPU per Train worker of each trial (and for its final evaluation).",
                       experimental=True)
    max_concurrent_trials: int | None = _f(None, "Trials at once; null: as many as the cluster holds (GPUs with "
                                                 "use_gpu, else CPUs less one left to Ray Data's reads).", ge=1,
                                                 experimental=True)
    scores: str = _f("${score.output}", "Score directory (its table/) every trial shares: reused when it exists, "
                                        "else the overfit and score phases run once and write it.", experimental=True)
    resume: bool = _f(True, "Resume an interrupted sweep of the same settings in <output> (Tuner.restore; finished "
                            "trials are not run again); false starts it over.", experimental=True)
    output: str = _f("${run.output_dir}/sweep", "Root of the sweep: tune/ (Tune's state), select/, trials/<id>/, "
                                                "results.csv/.md/.json, heatmap.png, best/ (model and config.yaml).",
                                                experimental=True)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    defend: DefendConfig = field(default_factory=DefendConfig)
    overfit: OverfitConfig = field(default_factory=OverfitConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_REF = re.compile(r"\$\{([a-z_]+)\.([a-z_]+)\}")
EXPERIMENTAL = "experimental"  # the top-level section of the experimental keys, each named section.key
# Keys that moved, old spelling -> new: a config or override with the old one stops with one sentence naming the new.
MOVED = {f"train.{name}": f"trainer.{name}" for name in (f.name for f in dataclasses.fields(TrainerConfig))}


def load_config(path: str | Path | list[str | Path] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults; several files: each later one's keys over the earlier ones', e.g.
    an attack config then a defense setting), apply `section.key=value` overrides (`experimental.section.key=value`
    for an experimental key), validate and resolve `${...}`."""
    raw: dict = {}
    experimental: dict = {}
    for p in [] if path is None else [path] if isinstance(path, (str, Path)) else path:
        for section, values in _read_yaml(Path(p)).items():
            if section == EXPERIMENTAL:
                if not isinstance(values, dict):
                    raise ConfigError(f"config section 'experimental' in {p} must map section.key to a value "
                                      f"(e.g. score.density: [slof]), got {values!r}.")
                experimental.update(values)
            elif isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. unlearn.num_samples=300).")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        if key.startswith(EXPERIMENTAL + "."):
            experimental[key[len(EXPERIMENTAL) + 1:]] = parsed
            continue
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}' must be a mapping.")
        raw[section][name] = parsed
    for section, values in raw.items():
        for name in values if isinstance(values, dict) else ():
            _check_moved(f"{section}.{name}")
            if is_experimental(f"{section}.{name}"):
                raise ConfigError(f"config key '{section}.{name}' is experimental: set it as experimental."
                                  f"{section}.{name} (in YAML, as {section}.{name} under the top-level experimental: "
                                  f"section).")
    for key, value in experimental.items():
        key = str(key)
        _check_moved(key, EXPERIMENTAL + ".")
        _key_field(key, EXPERIMENTAL + ".")
        if not is_experimental(key):
            raise ConfigError(f"config key 'experimental.{key}' is not experimental: set it as {key}.")
        section, _, name = key.partition(".")
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"config section '{section}' must be a mapping.")
        raw[section][name] = value
    cfg = _build(Config, raw, "")
    _resolve_refs(cfg)
    bad = [p for p in cfg.pipeline.phases if p not in PHASES]
    if bad:
        raise ConfigError(f"config key 'pipeline.phases' holds unknown phase {bad[0]!r}: use any of {', '.join(PHASES)}.")
    return cfg


def _read_yaml(p: Path) -> dict:
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory: pass a YAML file (e.g. configs/quickstart.yaml).")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: pass an existing YAML file (see configs/).")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): "
                          f"save it as UTF-8.") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}): check its permissions.") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]}): fix its syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(raw).__name__}.")
    return raw


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys, got {raw!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}': {where} allows {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        key = f"{EXPERIMENTAL}.{key}" if is_experimental(key) else key  # named as it is set
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        else:
            kwargs[name] = _check_value(key, hint, value, fields[name].metadata)
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {type(None): "null", str: "a string", dict: "a mapping", int: "an integer", float: "a number", bool: "true/false"}.get(
        hint, str(hint))


def _coerce(hint: Any, value: Any) -> tuple[bool, Any]:
    """Returns (ok, value converted to the hinted type)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, v = _coerce(arg, value)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(typing.get_args(hint)[0], v)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if hint is type(None):
        return value is None, value
    if hint is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 5e-4 (no dot) as a string; it means a number.
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an integer beyond float range: as infinite as .inf (refused by _check_value)
            return True, math.inf if value > 0 else -math.inf
    if hint is str:
        # YAML reads 1 or 1.5 as numbers; a string field takes them as written.
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return ok, str(value) if ok else value
    return isinstance(value, hint), value


def _check_value(key: str, hint: Any, value: Any, meta: typing.Mapping) -> Any:
    ok, value = _coerce(hint, value)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_type_name(hint)}, got {value!r}.")
    if value is None:
        return value
    bad = _non_finite(value)
    if bad is not None:
        raise ConfigError(f"config key '{key}' must be a finite number, got {bad!r}: give an ordinary number "
                          f"(.inf, .nan and their spellings are not allowed).")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}.")
    bounds = [("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)]
    for name, sym, test in bounds:
        limit = meta.get(name)
        if limit is not None and isinstance(value, (int, float)) and not test(value, limit):
            allowed = " and ".join(f"{s} {meta[n]}" for n, s, _ in bounds if meta.get(n) is not None)
            raise ConfigError(f"config key '{key}' must be {allowed}; got {value!r}.")
    return value


def _non_finite(value: Any) -> float | None:
    """The first infinite or NaN float in `value` (a coerced float, or a list of them), else None."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            return v
    return None


def _resolve_refs(cfg: Config) -> None:
    flat = {(s.name, f.name): getattr(getattr(cfg, s.name), f.name)
            for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}

    def resolve(key: tuple[str, str], value: str, depth: int = 0) -> str:
        def sub(m: re.Match) -> str:
            ref = (m.group(1), m.group(2))
            if ref not in flat:
                raise ConfigError(f"config key '{key[0]}.{key[1]}' refers to unknown key '${{{ref[0]}.{ref[1]}}}'.")
            if depth > 8:
                raise ConfigError(f"config key '{key[0]}.{key[1]}' has a circular ${{...}} reference.")
            target = flat[ref]
            return resolve(ref, target, depth + 1) if isinstance(target, str) else str(target)
        return _REF.sub(sub, value)

    for (section, name), value in flat.items():
        if isinstance(value, str) and "${" in value:
            setattr(getattr(cfg, section), name, resolve((section, name), value))


def _check_moved(key: str, prefix: str = "") -> None:
    """One sentence naming the new spelling of a key that moved (MOVED), written as `prefix` + key."""
    new = MOVED.get(key)
    if new is None:
        return
    where = (f"{EXPERIMENTAL}.{new} (in YAML, as {new} under the top-level experimental: section)"
             if is_experimental(new) else f"{new} (in YAML, as {new.partition('.')[2]} under {new.partition('.')[0]}:)")
    raise ConfigError(f"config key '{prefix}{key}' moved to section '{new.partition('.')[0]}', whose Ray Train "
                      f"settings every training phase reads: set it as {where}.")


def _key_field(key: str, prefix: str = "") -> tuple[Any, typing.Mapping]:
    """The type hint and metadata of config key `section.key` (named `prefix` + key in an error)."""
    _check_moved(key, prefix)
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(Config)
    if section not in hints or not name:
        raise ConfigError(f"unknown config key '{prefix}{key}': keys look like {prefix}section.key with a section "
                          f"among {', '.join(hints)}.")
    cls = hints[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"unknown config key '{prefix}{key}': section '{section}' allows {', '.join(fields)}.")
    return typing.get_type_hints(cls)[name], fields[name].metadata


def is_experimental(key: str) -> bool:
    """Whether config key `section.key` is experimental (False for a key that does not exist)."""
    cls = typing.get_type_hints(Config).get(key.partition(".")[0])
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    f = fields.get(key.partition(".")[2])
    return bool(f and f.metadata.get("experimental"))


def keys(experimental: bool = False) -> list[str]:
    """Every config key `section.key` of one tier: user-facing, or (`experimental`) experimental."""
    return [f"{section}.{f.name}" for section, cls in typing.get_type_hints(Config).items()
            for f in dataclasses.fields(cls) if f.metadata["experimental"] == experimental]


def key_type(key: str) -> Any:
    """The type hint of config key `section.key` (int, float, str | None ...); unknown keys are a ConfigError."""
    return _key_field(key)[0]


def check_key(key: str, value: Any) -> Any:
    """`value` converted to the type of config key `section.key`, after the same checks as a YAML value."""
    hint, meta = _key_field(key)
    return _check_value(key, hint, value, meta)


def replace_keys(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with `section.key` values replaced, each checked like a YAML value."""
    sections = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = check_key(key, value)
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def describe(experimental: bool = False) -> list[str]:
    """One line per user-facing key (name, default and help), then with `experimental` a heading and the
    experimental keys, each as it is set (experimental.section.key); `ubt config --keys [--all]` prints them."""
    def line(key: str, prefix: str = "") -> str:
        section, _, name = key.partition(".")
        f = next(f for f in dataclasses.fields(typing.get_type_hints(Config)[section]) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return f"{prefix}{key} = {default!r}  # {f.metadata['help']}"
    lines = [line(k) for k in keys()]
    if experimental:
        lines += ["", "# experimental: research and ablation knobs, and tuning whose default is right for almost "
                      "everyone; set under the top-level experimental: section, or as experimental.section.key=value"]
        lines += [line(k, EXPERIMENTAL + ".") for k in keys(experimental=True)]
    return lines


def save_config(cfg: Config) -> str:
    """The resolved config as YAML text that load_config reads back to the same config: the user-facing keys in
    their sections, the experimental ones under `experimental:`."""
    out: dict = {}
    experimental: dict = {}
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if is_experimental(key):
                experimental[key] = value
            else:
                out.setdefault(section, {})[name] = value
    return yaml.safe_dump({**out, EXPERIMENTAL: experimental}, sort_keys=False)
