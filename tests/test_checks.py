"""The config checked as a whole before a command runs: each cross-key rule stops the commands that run its phase,
with its one sentence, before Ray starts or anything is written; other commands are not stopped by it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ubt_ray.checks import check_config, command_phases, defense_phases
from ubt_ray.cli import main
from ubt_ray.config import load_config
from ubt_ray.errors import UserError

REPO = Path(__file__).resolve().parent.parent

# (overrides, the commands it stops, a command it does not stop, words of the sentence)
RULES = [
    (["prepare.source=csv", "experimental.prepare.csv_delimiter=;;"], ["prepare"], "train",
     "prepare.csv_delimiter ';;' is not one character"),
    (["prepare.source=fashion-mnist", "data.class_names=[a, b]"], ["prepare"], "train",
     "data.class_names has 2 names but Fashion-MNIST has 10 classes"),
    (["poison.target_label=12"], ["poison"], "train", "poison.target_label=12 has no class name"),
    (["data.templates=[]"], ["poison"], "evaluate", "data.templates is empty"),
    (["poison.attack=blended", "poison.params={alpha: 2}"], ["poison"], "train", "alpha"),
    (["poison.params={size: 3, colour: red}"], ["poison", "pipeline"], "defend",
     "unknown parameter 'colour' for trigger 'badnet'"),
    (["experimental.overfit.prioritize=weak_similarity"], ["overfit", "defend"], "score",
     "experimental.overfit.prioritize=weak_similarity picks the weakest rows of a subset"),
    (["experimental.score.transforms=[blur, blur]"], ["score", "defend", "sweep"], "select", "experimental.score.transforms=['blur', 'blur']"),
    (["experimental.score.neighbour_ranks=[5]"], ["score", "defend"], "unlearn", "experimental.score.neighbour_ranks=[5] must be two ranks"),
    (["experimental.score.token_portions=[]"], ["score"], "train", "experimental.score.token_portions=[] must be one or more shares"),
    (["experimental.score.cpus_per_actor=1.5"], ["score", "defend"], "train",
     "experimental.score.cpus_per_actor=1.5: Ray reserves a fraction of one CPU or whole CPUs"),
    (["experimental.score.density=[lof]"], ["score", "defend"], "select", "experimental.score.density=['lof'] must name each of"),
    (["experimental.score.density=[slof]", "experimental.score.method=cosine"], ["score", "defend"], "unlearn",
     "score.density needs experimental.score.method=token_drop"),
    (["experimental.score.density=[slof]", "experimental.score.reference_rows=16"], ["score", "defend"], "select",
     "experimental.score.reference_rows=16 must exceed experimental.score.density_k=16"),
    (["experimental.score.transforms=[]"], ["score"], "select", "at least one of them (or score.density"),
    (["evaluate.heldout_class_names=[a, b]"], ["evaluate", "defend", "baseline", "sweep"], "score",
     "evaluate.heldout_class_names has 2 names but data.class_names has 10"),
    (["compare.defenses=[ubt, magic]"], ["compare"], "defend", "compare.defenses=['ubt', 'magic'] must be some of"),
    (["compare.defenses=[ubt]", "compare.attacks=[]"], ["compare"], "pipeline", "compare.attacks is empty"),
    (["sweep.space={unlearn.nope: {grid: [1, 2]}}"], ["sweep"], "defend", "sweep.space names an unknown config key"),
    (["pipeline.phases=[prepare, evaluate]"], ["pipeline"], "evaluate",
     "pipeline.phases evaluates but nothing trained a model and model.checkpoint is null"),
]


@pytest.mark.parametrize("overrides,stops,passes,words", RULES)
def test_each_rule_stops_the_commands_that_run_its_phase(overrides, stops, passes, words):
    cfg = load_config(None, [f"compare.attacks=[{REPO}/configs/attacks/badnet.yaml]", *overrides])
    for command in stops:
        with pytest.raises(UserError) as err:
            check_config(cfg, command)
        assert words in str(err.value), (command, str(err.value))
    check_config(cfg, passes)


def test_the_defaults_and_every_shipped_config_pass_every_command():
    for cfg in [load_config(None)] + [load_config(p) for p in sorted((REPO / "configs").rglob("*.yaml"))]:
        for command in ("prepare", "poison", "train", "evaluate", "overfit", "score", "select", "unlearn", "defend",
                        "baseline", "sweep", "pipeline", "config") + (("compare",) if cfg.compare.attacks else ()):
            check_config(cfg, command)


def test_defend_runs_overfit_and_evaluate_only_when_configured():
    assert command_phases(load_config(None), "defend") == {"overfit", "score", "select", "unlearn", "evaluate"}
    assert command_phases(load_config(None, ["experimental.defend.overfit=false", "defend.evaluate=false"]), "defend") == {
        "score", "select", "unlearn"}
    assert command_phases(load_config(None, ["experimental.defend.overfit=false"]), "defend") == {
        "score", "select", "unlearn", "evaluate"}
    assert command_phases(load_config(None, ["pipeline.phases=[train, defend]", "defend.evaluate=false"]),
                          "pipeline") == {"train", "overfit", "score", "select", "unlearn"}


def test_the_cli_stops_with_the_sentence_before_ray_starts_or_anything_is_written(tmp_path, capsys):
    # Before the checks, this pipeline prepared the data (on Ray) and only then found nothing to evaluate; the
    # sweep found the held-out names mismatched only in its trials' evaluations, inside Ray.
    run = tmp_path / "run"
    assert main(["pipeline", f"run.output_dir={run}", "pipeline.phases=[prepare, evaluate]"]) == 2
    assert "ubt pipeline: error: pipeline.phases evaluates but nothing trained a model" in capsys.readouterr().err
    assert main(["sweep", f"run.output_dir={run}", "evaluate.heldout_class_names=[a]"]) == 2
    assert "evaluate.heldout_class_names has 1 names" in capsys.readouterr().err
    assert not run.exists()


def test_compare_checks_every_attack_config_before_the_first_attack_runs(tmp_path, capsys):
    out = f"experimental.compare.output={tmp_path / 'c'}"
    attacks = f"compare.attacks=[{REPO}/configs/attacks/badnet.yaml, {tmp_path}/nope.yaml]"
    assert main(["compare", attacks, out]) == 2
    assert f"config file {tmp_path}/nope.yaml does not exist" in capsys.readouterr().err
    # The command line's overrides reach each attack config, as compare applies them.
    one = f"compare.attacks=[{REPO}/configs/attacks/badnet.yaml]"
    assert main(["compare", one, "experimental.score.transforms=[]", out]) == 2
    assert "experimental.score.transforms=[] must name each of" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # Only the rules of the defenses compare runs: no score settings without UBT.
    check_config(load_config(None, [one, "compare.defenses=[none, ft]"]), "compare", ["experimental.score.transforms=[]"])
    assert defense_phases(load_config(None), ["none", "ft"]) == {"baseline", "evaluate"}
    assert defense_phases(load_config(None, ["defend.evaluate=false"]), ["ubt"]) == {
        "overfit", "score", "select", "unlearn", "evaluate"}


def test_the_checks_leave_the_cli_quick_to_start():
    """`ubt config` and a mistyped key answer in a blink: the CLI and its checks import no torch, Ray or open_clip."""
    code = "import sys, ubt_ray.cli; print(sorted(m for m in ('torch', 'ray', 'open_clip') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
