"""Zero-shot classification, the CA/ASR/detection metrics against hand-computed values, and the evaluate phase."""

import argparse
import json
import math
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from ubt_ray import storage
from ubt_ray.config import load_config
from ubt_ray.core.images import encode_png
from ubt_ray.core.models import Clip
from ubt_ray.core.triggers import build_trigger
from ubt_ray.core.zeroshot import (
    attack_success_rate,
    auroc,
    class_accuracies,
    class_embeddings,
    clean_accuracy,
    image_embeddings,
    precision_recall_at_k,
    zero_shot_predict,
)
from ubt_ray.errors import UserError
from ubt_ray.models import load_clip, save_clip
from ubt_ray.phases.evaluate import Attack, cli_evaluate, decode_rows, evaluate

PREPROCESS = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The 2 test cores are shared with other tests' Ray workers; OpenMP threads spinning against them run ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- metrics, by hand --------------------------------------------------------------------------------------

def test_clean_accuracy():
    assert clean_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert clean_accuracy(torch.tensor([3, 3]), np.array([3, 3])) == 1.0
    with pytest.raises(ValueError):
        clean_accuracy([0, 1], [0])


def test_class_accuracies_per_label_and_none_for_an_absent_class():
    # label 0: 2 of 3 right; label 1: 0 of 1; label 2: no row; label 3: 1 of 1
    assert class_accuracies([0, 0, 1, 0, 3], [0, 0, 0, 1, 3], 4) == [2 / 3, 0.0, None, 1.0]
    with pytest.raises(ValueError):
        class_accuracies([0, 1], [0], 2)


def test_attack_success_rate_counts_only_images_outside_the_target_class():
    labels = [0, 0, 0, 1, 2, 3, 3]
    preds = [0, 0, 0, 0, 2, 0, 1]  # target-class rows predicted as target must not count as successes
    asr, n = attack_success_rate(preds, labels, target=0)
    assert n == 4 and asr == 0.5  # rows 3..6: hits at labels 1 and 3
    # The CleanCLIP bug would report accuracy on triggered images (4/7) or count target rows (5/7).
    with pytest.raises(ValueError, match="no image outside"):
        attack_success_rate([1, 1], [1, 1], target=1)


def test_auroc_hand_computed_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # Ties: pos {2, 3, 3}, neg {1, 3}: pairs (pos>neg)=3, ties=2 -> (3 + 0.5*2) / 6.
    assert auroc([2, 3, 3, 1, 3], [1, 1, 1, 0, 0]) == pytest.approx(4 / 6)
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([3, 2, 1], [0, 0, 1]) == 0.0
    # Order of rows does not matter.
    rng = np.random.default_rng(0)
    s, t = rng.integers(0, 5, 50).astype(float), rng.integers(0, 2, 50).astype(bool)
    perm = rng.permutation(50)
    assert auroc(s, t) == pytest.approx(auroc(s[perm], t[perm]))
    with pytest.raises(ValueError, match="both"):
        auroc([1, 2], [1, 1])


def test_precision_recall_at_k_hand_computed_with_tie_at_cutoff():
    scores = [0.9, 0.8, 0.7, 0.7, 0.1]
    poison = [1, 0, 1, 0, 1]
    m = precision_recall_at_k(scores, poison, [1, 2, 3, 10])
    assert m["precision@1"] == 1.0 and m["recall@1"] == pytest.approx(1 / 3)
    assert m["precision@2"] == 0.5 and m["recall@2"] == pytest.approx(1 / 3)
    # k=3 cuts through the 0.7 tie (one poison of two): expected hits 1 + 0.5.
    assert m["precision@3"] == pytest.approx(1.5 / 3) and m["recall@3"] == pytest.approx(0.5)
    # k beyond the row count takes every row.
    assert m["precision@10"] == pytest.approx(3 / 5) and m["recall@10"] == 1.0
    with pytest.raises(ValueError):
        precision_recall_at_k(scores, poison, [0])


# --- zero-shot on stub models ------------------------------------------------------------------------------

class StubClip(torch.nn.Module):
    """encode_text: a fixed vector per (class, template) token; encode_image: always the class-k direction."""

    def __init__(self, text_vectors: torch.Tensor, image_class: int, dim: int):
        super().__init__()
        self.text_vectors, self.image_class, self.dim = text_vectors, image_class, dim
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode_text(self, tokens):
        return self.text_vectors[tokens[:, 0]]

    def encode_image(self, x):
        out = torch.zeros(len(x), self.dim)
        out[:, self.image_class] = 3.0  # unnormalised on purpose
        return out


def stub_tokenizer(class_names, templates):
    prompts = [t.format(c) for c in class_names for t in templates]
    return lambda texts: torch.tensor([[prompts.index(t)] for t in texts])


def test_class_embeddings_average_normalised_prompt_embeddings():
    names, templates = ["cat", "dog"], ["a {}", "the {}"]
    # Prompt vectors of very different norms: without per-prompt normalisation the mean would lean to [3, 0].
    vectors = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [-1.0, 0.0]])
    emb = class_embeddings(StubClip(vectors, 0, 2), stub_tokenizer(names, templates), names, templates)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(emb, torch.tensor([[s, s], [-s, -s]]))
    with pytest.raises(ValueError, match="'{}'"):
        class_embeddings(StubClip(vectors, 0, 2), stub_tokenizer(names, templates), names, ["no slot"])


def test_model_predicting_class_k_gives_ca_share_of_k_and_asr_without_target_rows():
    names, templates, k = ["a", "b", "c", "d"], ["{}"], 2
    model = StubClip(torch.eye(4), image_class=k, dim=4)
    classifier = class_embeddings(model, stub_tokenizer(names, templates), names, templates)
    labels = torch.tensor([0, 1, 2, 2, 2, 3, 3, 0, 1, 2])
    pixels = torch.zeros((len(labels), 3, 4, 4), dtype=torch.uint8)
    preds = zero_shot_predict(model, pixels, classifier, PREPROCESS, batch_size=3)
    assert preds.tolist() == [k] * len(labels)
    assert clean_accuracy(preds, labels) == pytest.approx(4 / 10)
    # Target = k: every non-target image hits; the 4 class-k images are left out of the count.
    assert attack_success_rate(preds, labels, target=k) == (1.0, 6)
    # Target != k: no hit, and the target's own images are left out.
    assert attack_success_rate(preds, labels, target=3) == (0.0, 8)


def test_image_embeddings_normalised_batch_independent_and_mode_restored():
    clip = load_clip(load_config(None, ["experimental.model.device=cpu"]).model, seed=0)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8))
    clip.model.train()
    a = image_embeddings(clip.model, pixels, clip.preprocess_cfg, batch_size=2)
    b = image_embeddings(clip.model, pixels, clip.preprocess_cfg, batch_size=5)
    assert clip.model.training
    assert a.shape == (5, 128) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    expected = F.normalize(clip.model.eval().encode_image((pixels.float() / 255 - torch.tensor(
        clip.preprocess_cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(clip.preprocess_cfg["std"]).view(1, 3, 1, 1)), dim=-1)
    torch.testing.assert_close(a, expected.detach(), atol=1e-5, rtol=1e-5)


# --- the evaluate phase on a tiny random model -------------------------------------------------------------

N_ROWS, TARGET = 100, 0


def write_test_shards(directory, labels, with_label=True):
    rng = np.random.default_rng(1)
    images = [encode_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in labels]
    cols = {"key": [f"t-{i:03d}" for i in range(len(labels))], "image": pa.array(images, pa.binary()),
            "caption": [f"a photo of {y}" for y in labels]}
    if with_label:
        cols["label"] = pa.array(labels, pa.int32())
    directory.mkdir(parents=True)
    table = pa.table(cols)
    # Two files, so that reading and max_rows cross a file boundary.
    pq.write_table(table.slice(0, 60), directory / "part-0.parquet")
    pq.write_table(table.slice(60), directory / "part-1.parquet")


@pytest.fixture
def eval_setup(tmp_path):
    labels = [i % 10 for i in range(N_ROWS)]
    write_test_shards(tmp_path / "test", labels)
    trigger_dir = build_trigger("badnet", {}, 0).save(tmp_path / "trigger")
    (trigger_dir / "attack.json").write_text(json.dumps(
        {"attack": "badnet", "target_label": TARGET, "target_name": "a t-shirt"}))
    overrides = [f"run.output_dir={tmp_path}", f"data.test={tmp_path / 'test'}", f"evaluate.trigger={trigger_dir}",
                 f"experimental.evaluate.output={tmp_path / 'eval'}", "experimental.model.device=cpu", "experimental.evaluate.batch_size=32"]
    return tmp_path, labels, overrides


def test_evaluate_writes_metrics_and_manifest(eval_setup):
    tmp_path, labels, overrides = eval_setup
    result = evaluate(load_config(None, overrides))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics == result.metrics
    assert 0.0 <= metrics["clean_accuracy"] <= 1.0 and 0.0 <= metrics["attack_success_rate"] <= 1.0
    assert metrics["asr_images"] == sum(y != TARGET for y in labels) == 90
    assert 0.0 <= metrics["clean_target_rate"] <= 1.0
    # One accuracy per class; weighted by the classes' test rows (10 each) they make the CA.
    per_class = metrics["class_accuracy"]
    assert len(per_class) == 10 and sum(per_class) / 10 == pytest.approx(metrics["clean_accuracy"])
    assert metrics["test_rows"] == N_ROWS and metrics["target_label"] == TARGET and metrics["attack"] == "badnet"
    assert result.clean_accuracy == metrics["clean_accuracy"]
    assert result.attack_success_rate == metrics["attack_success_rate"]
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["phase"] == "evaluate" and manifest["metrics"]["test_rows"] == N_ROWS

    # The same weights saved as a checkpoint and passed as --model give the same metrics.
    cfg = load_config(None, overrides)
    save_clip(load_clip(cfg.model, device="cpu", seed=cfg.run.seed), str(tmp_path / "ckpt"))
    again = cli_evaluate(cfg, argparse.Namespace(model=str(tmp_path / "ckpt")))
    assert again["model"] == str(tmp_path / "ckpt")
    assert again["clean_accuracy"] == result.clean_accuracy
    assert again["attack_success_rate"] == result.attack_success_rate
    # Another checkpoint's evaluation does not silently replace that one (by default evaluate.output holds θ₀'s).
    shutil.copytree(tmp_path / "ckpt", tmp_path / "other")
    with pytest.raises(UserError, match=r"holds the evaluation of .*ckpt.*experimental.evaluate.output=PATH"):
        cli_evaluate(cfg, argparse.Namespace(model=str(tmp_path / "other")))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == str(tmp_path / "ckpt")
    storage.allow_overwrite(True)
    try:
        assert cli_evaluate(cfg, argparse.Namespace(model=str(tmp_path / "other")))["model"] == str(tmp_path / "other")
    finally:
        storage.allow_overwrite(False)


def test_evaluate_max_rows_and_missing_trigger(eval_setup):
    tmp_path, labels, overrides = eval_setup
    # 75 rows cross the boundary of the two shard files.
    first = evaluate(load_config(None, overrides + ["experimental.evaluate.max_rows=75"]))
    assert first.metrics["test_rows"] == 75
    assert first.metrics["asr_images"] == sum(y != TARGET for y in labels[:75])
    none = evaluate(load_config(None, overrides + ["evaluate.trigger=null", "experimental.evaluate.max_rows=20"]))
    assert none.attack_success_rate is None and none.metrics["asr_images"] == 0 and none.metrics["test_rows"] == 20
    assert none.metrics["clean_target_rate"] is None
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["attack_success_rate"] is None
    missing = evaluate(load_config(None, overrides + [f"evaluate.trigger={tmp_path / 'nowhere'}",
                                                       "experimental.evaluate.max_rows=20"]))
    assert missing.attack_success_rate is None


class TriggerSpotter(StubClip):
    """Predicts the target class on any image that is not all black, class 1 on black ones."""

    def __init__(self, n_templates):
        super().__init__(torch.eye(10).repeat_interleave(n_templates, dim=0), image_class=1, dim=10)
        self.visual = types.SimpleNamespace(image_size=32)

    def encode_image(self, x):
        lit = (x != x.flatten()[0]).flatten(1).any(dim=1)
        return F.one_hot(torch.where(lit, TARGET, 1), 10).float()


def test_evaluate_measures_asr_on_triggered_non_target_images(tmp_path, monkeypatch):
    labels = [i % 10 for i in range(40)]
    black = encode_png(np.zeros((28, 28), np.uint8))
    lit = np.zeros((28, 28), np.uint8)
    lit[0, 0] = 255
    # The four class-2 images are lit: the model calls them the target class without any trigger.
    images = [encode_png(lit) if y == 2 else black for y in labels]
    (tmp_path / "test").mkdir()
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(40)], "image": pa.array(images, pa.binary()),
                             "label": pa.array(labels, pa.int32())}), tmp_path / "test" / "part-0.parquet")
    trigger_dir = build_trigger("badnet", {"location": "random"}, 0).save(tmp_path / "trigger")
    (trigger_dir / "attack.json").write_text(json.dumps({"attack": "badnet", "target_label": TARGET}))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"data.test={tmp_path / 'test'}", "experimental.model.device=cpu",
                             f"evaluate.trigger={trigger_dir}", f"experimental.evaluate.output={tmp_path / 'eval'}",
                             "evaluate.heldout_class_names=[]"])  # the stub tokenizer knows the training prompts only
    names, templates = cfg.data.class_names, cfg.data.templates
    stub = Clip(TriggerSpotter(len(templates)), {}, PREPROCESS, None, stub_tokenizer(names, templates))
    monkeypatch.setattr("ubt_ray.phases.evaluate.load_clip", lambda *a, **k: stub)
    result = evaluate(cfg)
    assert result.clean_accuracy == pytest.approx(0.1)  # black images -> class 1, a tenth of the rows
    assert result.attack_success_rate == 1.0 and result.metrics["asr_images"] == 36
    assert result.metrics["clean_target_rate"] == pytest.approx(4 / 36)  # ASR's floor: the clean lit ones


def test_decode_rows_triggers_the_stored_image_with_its_key():
    trigger = build_trigger("badnet", {"location": "random"}, 3)
    attack = Attack(trigger, "badnet", 0, "mem")
    originals = [np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8) for i in range(3)]
    keys = ["a", "b", "c"]
    out = decode_rows(keys, [encode_png(o) for o in originals], 28, attack)
    for key, original, got in zip(keys, originals, out):
        expected = trigger.apply(original[..., None], key)[..., 0]
        for channel in got:
            np.testing.assert_array_equal(channel.numpy(), expected)
    clean = decode_rows(keys, [encode_png(o) for o in originals], 28)
    np.testing.assert_array_equal(clean[0, 0].numpy(), originals[0])


def test_evaluate_user_errors(eval_setup):
    tmp_path, labels, overrides = eval_setup
    write_test_shards(tmp_path / "unlabelled", labels, with_label=False)
    with pytest.raises(UserError, match="no label column"):
        evaluate(load_config(None, overrides + [f"data.test={tmp_path / 'unlabelled'}"]))
    (tmp_path / "trigger" / "attack.json").unlink()
    with pytest.raises(UserError, match="attack.json"):
        evaluate(load_config(None, overrides))
    with pytest.raises(UserError, match="outside data.class_names"):
        evaluate(load_config(None, overrides + ["evaluate.trigger=null", "data.class_names=[a, b]"]))


def test_evaluate_reports_ca_on_the_heldout_prompt_set(eval_setup):
    """Held-out CA is the CA that the held-out names and templates give as the training prompt set, measured from
    the same image embeddings; [] skips it; names that do not pair with the classes are one sentence."""
    tmp_path, labels, overrides = eval_setup
    cfg = load_config(None, overrides)
    result = evaluate(cfg)
    assert result.clean_accuracy_heldout == result.metrics["clean_accuracy_heldout"]
    names = ",".join(f'"{n}"' for n in cfg.evaluate.heldout_class_names)
    templates = ",".join(f'"{t}"' for t in cfg.evaluate.heldout_templates)
    swapped = evaluate(load_config(None, overrides + [f"data.class_names=[{names}]", f"data.templates=[{templates}]",
                                                      "evaluate.heldout_class_names=[]"]))
    assert swapped.clean_accuracy == result.clean_accuracy_heldout
    assert swapped.clean_accuracy_heldout is None and swapped.metrics["clean_accuracy_heldout"] is None
    with pytest.raises(UserError, match="evaluate.heldout_class_names has 2 names but data.class_names has 10"):
        evaluate(load_config(None, overrides + ["evaluate.heldout_class_names=[a, b]"]))
