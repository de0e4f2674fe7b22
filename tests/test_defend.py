"""`ubt defend`, `ubt compare` and the overfit end to end through real Ray, on a small backdoored model built here."""

import json
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ubt_ray.cli import main
from ubt_ray.config import load_config, save_config
from ubt_ray.phases.defend import defense_fingerprint

from helpers import UBT, backdoor_fixture, last_json

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backdoored(ray_local, tmp_path_factory):
    """A small CLIP (2 vision layers, width 64) trained on 3,000 Fashion-MNIST rows with a 150-row Blended backdoor:
    a whole-image trigger (seeded noise mixed into every pixel at alpha 0.2), which no token mask removes."""
    root = tmp_path_factory.mktemp("backdoor")
    overrides = backdoor_fixture(root)
    assert main(["poison", *overrides]) == 0
    assert main(["train", *overrides]) == 0
    return root, overrides


def test_defend_removes_the_backdoor_and_keeps_clean_accuracy(backdoored, capsys):
    root, overrides = backdoored
    capsys.readouterr()
    # The default `ubt defend` (overfit, token mask and blur drops, pick, forget by the flagging transform) on a
    # whole-image trigger. The backdoored model, and so the defense's outcome, differs between CPUs (their kernels
    # round differently) and seeds (docs/results.md, defense_seeds): ASR falls 65-79 points, CA 1.7-5.5 points,
    # lost mostly on the target class and two or three others. So the bounds: a 40-point fall of ASR, which
    # skipping the unlearning (ASR unchanged) fails, and at most 8 points of CA, which wrecking the model fails.
    # The model evaluated as the pipeline does just before a defense: the defense copies that evaluation of θ₀.
    assert main(["evaluate", *overrides, "--model", str(root / "attack" / "model")]) == 0
    evaluated = json.loads((root / "attack" / "eval" / "metrics.json").read_text())
    code = main(["defend", *overrides, *UBT])
    assert code == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    assert not summary["reused"]
    before, after = summary["before"], summary["after"]
    copied = json.loads((root / "defend" / "eval_before" / "metrics.json").read_text())
    assert copied["reused_from"] == str(root / "attack" / "eval") and "reused_from" not in evaluated
    assert {k: v for k, v in copied.items() if k != "reused_from"} == evaluated
    assert before["attack_success_rate"] == evaluated["attack_success_rate"]
    # Other prompts or another model make another evaluation.
    from ubt_ray.phases.evaluate import evaluation_fingerprint
    cfg = load_config(None, overrides)
    model = str(root / "attack" / "model")
    assert evaluation_fingerprint(cfg, model) == evaluated["fingerprint"]
    assert evaluation_fingerprint(load_config(None, [*overrides, "evaluate.heldout_templates=['a {}.']"]),
                                  model) != evaluated["fingerprint"]
    assert evaluation_fingerprint(cfg, str(root / "init")) != evaluated["fingerprint"]
    assert before["attack_success_rate"] >= 0.6, before  # the backdoor is there to remove
    assert after["attack_success_rate"] <= before["attack_success_rate"] - 0.4, (before, after)
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.08, (before, after)
    assert summary["detection"]["auroc"] >= 0.75
    # The pick took the blur: no token mask removes a trigger spread over every pixel.
    scored = json.loads((root / "defend" / "score" / "manifest.json").read_text())
    assert scored["picked_signal"] == "drop_blur", scored["tail_strengths"]
    assert "| after UBT |" in out and "CA (held-out prompts)" in out
    assert all(0 <= m["clean_accuracy_heldout"] <= 1 for m in (before, after)), (before, after)
    report = json.loads((root / "defend" / "report.json").read_text())
    assert json.loads((root / "defend" / "manifest.json").read_text())["phase"] == "defend"
    assert set(report["phases"]) == {"overfit", "score", "select", "unlearn"}
    assert report["selection"]["num_forget"] == 150 and report["selection"]["num_retain"] == 1500
    assert (root / "defend" / "report.md").read_text().startswith("# UBT defense report")
    # Every phase's manifest carries the same cost block (cost.py); the report sums the defense's phases.
    from ubt_ray.cost import FIELDS
    manifests = {p.parent.relative_to(root).as_posix(): json.loads(p.read_text())
                 for p in root.glob("**/manifest.json") if "ray" not in p.parts}
    assert {"poison", "attack", "defend", "defend/overfit", "defend/score", "defend/select", "defend/unlearn",
            "defend/eval_before", "defend/eval_after"} <= set(manifests)
    assert all(list(m["cost"]) == list(FIELDS) for m in manifests.values()), manifests.keys()
    unlearned = manifests["defend/unlearn"]["cost"]
    # 50 steps of 256 retain + 64 forget rows, forward and backward; the anchor term's θ₀ forward of the 256 retain
    # rows each step; θ₀'s targets of the 150 forget rows once.
    assert (unlearned["forward_sample_passes"], unlearned["backward_sample_passes"]) == (
        50 * 320 + 50 * 256 + 150, 50 * 320)
    scored = manifests["defend/score"]["cost"]
    rows_per_forward = load_config(None, [*overrides, *UBT]).score.batch_size
    # Each row forwarded as itself, under the token mask at two portions and under the blur.
    assert scored["forward_sample_passes"] >= 4 * 3000 and scored["forward_sample_passes"] % rows_per_forward == 0
    # One actor (the fixture's score.num_actors) reserving the module's 4 Ray CPUs but the one left to the reads.
    assert scored["backward_sample_passes"] == 0 and scored["reserved_cpus"] == 3 and scored["reserved_gpus"] == 0
    evaluated_after = json.loads((root / "defend" / "eval_after" / "metrics.json").read_text())
    assert manifests["defend/eval_after"]["cost"]["forward_sample_passes"] == evaluated_after["sample_passes"] > 0
    assert report["cost"]["forward_sample_passes"] == sum(p["cost"]["forward_sample_passes"]
                                                         for p in report["phases"].values())
    assert report["cost"]["reserved_cpu_seconds"] == pytest.approx(sum(
        p["cost"]["reserved_cpu_seconds"] for p in report["phases"].values()), abs=0.2)
    # The cost blocks are the one account of the work: no phase keeps another count of its passes beside them.
    assert not any("sample_passes" in p for p in report["phases"].values())
    assert report["phases"]["unlearn"]["samples"] == 50 * 256
    # The defend manifest adds the evaluations before and after, whose results carry their manifests.
    assert manifests["defend"]["cost"]["forward_sample_passes"] == report["cost"]["forward_sample_passes"] + sum(
        manifests[f"defend/{e}"]["cost"]["forward_sample_passes"] for e in ("eval_before", "eval_after"))
    # `ubt plan` on this finished defense: the scoring at ten times the rows takes ten times as long.
    assert main(["plan", "--defense", str(root / "defend"), "--rows", "30000"]) == 0
    planned = capsys.readouterr().out
    assert "| score | 30,000 |" in planned and "assumptions:" in planned and "unlearn.steps=50" in planned
    # The cleaned model is a plain open_clip checkpoint, and differs from the backdoored one.
    cleaned, _, _ = open_clip.create_model_and_transforms(f"local-dir:{summary['cleaned_model']}")
    original, _, _ = open_clip.create_model_and_transforms(f"local-dir:{root / 'attack' / 'model'}")
    assert any(not torch.equal(a, b) for a, b in zip(cleaned.state_dict().values(), original.state_dict().values()))
    # The same defense asked for again is the finished one; another setting is another defense.
    assert main(["defend", *overrides, *UBT]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["reused"] and again["after"] == summary["after"] and again["cleaned_model"] == summary["cleaned_model"]
    assert defense_fingerprint(load_config(None, [*overrides, *UBT])) == report["fingerprint"]
    assert defense_fingerprint(load_config(None, [*overrides, *UBT, "experimental.unlearn.steps=51"])) != report["fingerprint"]


def test_caption_disagreement_finds_the_poisons_by_their_captions(backdoored, tmp_path, capsys):
    """The trigger-agnostic score on the backdoored fixture's shards: its poisons (another class's image with the
    target's caption) rank at the top, ahead of the 2,850 clean rows, with no image-tower forward."""
    root, overrides = backdoored
    capsys.readouterr()
    assert main(["score", "-c", str(REPO / "benchmarks" / "configs" / "caption_disagreement.yaml"), "--model",
                 str(root / "attack" / "model"), *overrides, "experimental.score.neighbour_ranks=[10, 60]",
                 f"experimental.score.output={tmp_path}", "unlearn.num_samples=150", "experimental.score.top_k=[150]"]) == 0
    detection = json.loads((tmp_path / "detection.json").read_text())
    assert detection["poisons"] == 150 and detection["auroc"] >= 0.95 and detection["precision@150"] >= 0.7, detection
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "t-shirt" in manifest["target_caption"]


def test_overfit_on_the_weakest_similarity_subset(backdoored, capsys):
    root, overrides = backdoored
    capsys.readouterr()
    out = root / "overfit-subset"  # beside the defend test's default overfit, which this must not replace
    overrides = [*overrides, f"experimental.overfit.output={out}"]
    assert main(["overfit", *overrides, "experimental.overfit.steps=3", "experimental.overfit.warmup_steps=0", "experimental.overfit.batch_size=64", "experimental.overfit.subset_fraction=0.1",
                 "experimental.overfit.prioritize=weak_similarity"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["samples"] == 192
    # The similarity scoring that chose the subset is part of the overfit's cost, in its own manifest.
    overfitted = json.loads((out / "manifest.json").read_text())["cost"]
    similarity = json.loads((out / "similarity" / "manifest.json").read_text())
    assert similarity["config"]["score"]["method"] == "cosine"
    assert similarity["cost"]["forward_sample_passes"] >= 3000
    assert overfitted["forward_sample_passes"] == 192 + similarity["cost"]["forward_sample_passes"]
    assert overfitted["backward_sample_passes"] == 192
    assert overfitted["reserved_cpu_seconds"] >= similarity["cost"]["reserved_cpu_seconds"]
    subset = pq.read_table(out / "subset")
    sims = pq.read_table(out / "similarity" / "table").to_pandas().set_index("key")["cos"]
    assert abs(subset.num_rows - round(0.1 * len(sims))) <= 1
    # The subset is exactly the rows whose similarity under θ₀ is weakest.
    assert sims[subset.column("key").to_pylist()].max() <= sims.drop(subset.column("key").to_pylist()).min()
    open_clip.create_model_and_transforms(f"local-dir:{summary['model']}")
    assert main(["overfit", *overrides, "experimental.overfit.prioritize=weak_similarity"]) == 2  # needs a subset


def test_compare_runs_every_defense_on_the_backdoored_model(backdoored, tmp_path, capsys):
    """`ubt compare` on one attack: no defense, FT, CleanCLIP and UBT (all brief), one table, CSV and chart."""
    root, overrides = backdoored
    attack_yaml = tmp_path / "attack.yaml"
    attack_yaml.write_text(save_config(load_config(None, overrides)))
    # UBT as the defend test ran it, which compare finds finished and reuses; brief baselines, from a config file
    # layered over the attack's (compare.layers).
    brief = tmp_path / "brief_baselines.yaml"
    brief.write_text(yaml.safe_dump({"experimental": {
        "baseline.output": str(root / "compare-baseline"), "baseline.rows": 500, "baseline.epochs": 1,
        "baseline.batch_size": 64, "baseline.lr": 1e-4}}))
    defended = (root / "defend" / "report.json").exists()
    capsys.readouterr()
    compare_yaml = tmp_path / "compare.yaml"
    compare_yaml.write_text(yaml.safe_dump({"compare": {"attacks": [str(attack_yaml)]}, "experimental": {
        "compare.layers": [str(brief)], "compare.overrides": UBT, "compare.output": str(tmp_path / "cmp")}}))
    code = main(["compare", "--config", str(compare_yaml)])
    assert code == 0
    printed = capsys.readouterr()
    rows = {r["defense"]: r for r in last_json(printed.out)["rows"]}
    assert list(rows) == ["none", "ft", "cleanclip", "ubt"]
    assert ("UBT: reused the finished defense" in printed.err) == defended
    report = json.loads((root / "defend" / "report.json").read_text())
    assert (rows["ubt"]["clean_accuracy"], rows["ubt"]["attack_success_rate"]) == (
        report["after"]["clean_accuracy"], report["after"]["attack_success_rate"])
    before = json.loads((root / "defend" / "eval_before" / "metrics.json").read_text())
    assert rows["none"]["attack_success_rate"] == before["attack_success_rate"]
    assert rows["none"]["clean_samples"] == 0
    for kind in ("ft", "cleanclip"):  # on clean pairs only: the layer's ~500 for one epoch, not 3,000 for ten
        assert 0 < rows[kind]["clean_samples"] <= 1000
    assert rows["ubt"]["clean_samples"] == 0 and "suspicious_samples" not in rows["ubt"]
    # The defenses' costs: CleanCLIP forwards and back-propagates each row and its augmented view.
    assert rows["ft"]["forward_passes"] == rows["ft"]["backward_passes"] == rows["ft"]["clean_samples"]
    assert rows["cleanclip"]["forward_passes"] == rows["cleanclip"]["backward_passes"] == \
        2 * rows["cleanclip"]["clean_samples"]
    assert rows["ubt"]["forward_passes"] == report["cost"]["forward_sample_passes"] > 3000
    assert rows["none"]["forward_passes"] == 0 and all(r["reserved_cpu_s"] >= 0 for r in rows.values())
    for kind in ("ft", "cleanclip"):
        open_clip.create_model_and_transforms(f"local-dir:{root / 'compare-baseline' / kind / 'model'}")
    csv_rows = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert csv_rows[0].startswith("attack,defense,clean_accuracy,clean_accuracy_heldout,attack_success_rate") and len(csv_rows) == 5
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| CleanCLIP |" in (tmp_path / "cmp" / "comparison.md").read_text() and "| UBT |" in printed.out
