"""Config loading: every user mistake stops with one sentence naming the key and what is allowed."""

import subprocess
from pathlib import Path
import sys

import pytest
import yaml

from ubt_ray.cli import main
from ubt_ray.config import keys, load_config, save_config
from ubt_ray.errors import ConfigError


def test_defaults_resolve_references():
    cfg = load_config(None, ["run.output_dir=/tmp/abc"])
    assert cfg.data.train == "/tmp/abc/poison/shards"
    assert cfg.prepare.output == "/tmp/abc/data"
    assert cfg.evaluate.output == "/tmp/abc/attack/eval"


def test_override_types_are_parsed():
    cfg = load_config(None, ["train.lr=5e-4", "train.epochs=3", "model.checkpoint=null", "trainer.use_gpu=true",
                             "poison.params={size: 3, location: random}", "run.name=123"])
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.epochs, float) and cfg.train.epochs == 3.0
    assert cfg.model.checkpoint is None and cfg.trainer.use_gpu is True
    assert cfg.poison.params == {"size": 3, "location": "random"}
    assert cfg.run.name == "123"


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", ["unknown config key 'train.lrr'", "lr"]),
    ("nosection.x=1", ["unknown config key 'nosection'"]),
    ("train.lr=abc", ["'train.lr' must be a number", "'abc'"]),
    ("train.batch_size=1.5", ["'train.batch_size' must be an integer"]),
    ("trainer.use_gpu=3", ["'trainer.use_gpu' must be true/false"]),
    ("train.lr=-1", ["'train.lr' must be > 0", "-1"]),
    ("experimental.poison.fraction=1.5", ["'experimental.poison.fraction' must be > 0 and <= 1", "1.5"]),
    ("poison.attack=trojan", ["'poison.attack' must be one of", "badnet", "'trojan'"]),
    ("train.lr", ["must look like section.key=value"]),
    ("run.output_dir=${run.nothing}", ["unknown key '${run.nothing}'"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    for w in words:
        assert w in msg
    assert "\n" not in msg


def test_the_training_workers_moved_to_the_trainer_section_and_the_old_keys_say_so(tmp_path):
    """Every training phase reads its Ray Train settings from trainer:, not from the attack training's train:;
    the old spelling, on the command line, in a YAML section or under experimental:, names the new key."""
    cfg = load_config(None, ["trainer.num_workers=3", "trainer.use_gpu=true",
                             "experimental.trainer.cpus_per_worker=2"])
    assert (cfg.trainer.num_workers, cfg.trainer.use_gpu, cfg.trainer.cpus_per_worker) == (3, True, 2)
    assert load_config(None).trainer.num_workers == 1 and not hasattr(cfg.train, "num_workers")
    f = tmp_path / "old.yaml"
    for old, new in (("train.num_workers=2", "set it as trainer.num_workers"),
                     ("train.use_gpu=true", "set it as trainer.use_gpu"),
                     ("experimental.train.cpus_per_worker=2", "set it as experimental.trainer.cpus_per_worker"),
                     ("train.threads_per_worker=2", "set it as experimental.trainer.threads_per_worker")):
        key, _, value = old.partition("=")
        for attempt in ([None, [old]], [f, []]):
            if attempt[0] is not None:
                section, _, name = key.partition(".")
                f.write_text(f"experimental:\n  {name}: {value}\n" if section == "experimental"
                             else f"{section}:\n  {name}: {value}\n")
            with pytest.raises(ConfigError) as e:
                load_config(*attempt)
            assert new in str(e.value) and f"config key '{key}' moved to section 'trainer'" in str(e.value)
            assert "\n" not in str(e.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_file_then_overrides_and_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  epochs: 1\nrun:\n  output_dir: /tmp/x\n")
    cfg = load_config(f, ["train.lr=0.02"])
    assert cfg.train.lr == 0.02 and cfg.train.epochs == 1.0
    # The saved resolved config loads back to the same config.
    again = tmp_path / "again.yaml"
    again.write_text(save_config(cfg))
    assert load_config(again) == cfg


def test_config_files_layer_later_keys_over_earlier_ones(tmp_path):
    """-c attack.yaml -c setting.yaml: the setting's keys win, the attack's other keys of a section stay, and the
    files' experimental sections merge key by key."""
    attack, setting = tmp_path / "attack.yaml", tmp_path / "setting.yaml"
    attack.write_text("run:\n  name: a\ntrain:\n  lr: 0.1\n  epochs: 2\n"
                      "experimental:\n  score.batch_size: 64\n  score.transforms: [token_mask]\n")
    setting.write_text("train:\n  lr: 0.2\nexperimental:\n  score.transforms: [token_mask, blur]\n  score.combine: pick\n")
    cfg = load_config([attack, setting], ["experimental.score.combine=max_z"])
    assert cfg.run.name == "a" and cfg.score.batch_size == 64 and (cfg.train.lr, cfg.train.epochs) == (0.2, 2.0)
    assert cfg.score.transforms == ["token_mask", "blur"] and cfg.score.combine == "max_z"
    assert main(["config", "-c", str(attack), "-c", str(setting)]) == 0
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config([attack, tmp_path / "missing.yaml"])


def test_every_shipped_config_loads():
    import pathlib
    repo = pathlib.Path(__file__).resolve().parent.parent
    configs = sorted([*(repo / "configs").rglob("*.yaml"), *(repo / "benchmarks" / "configs").rglob("*.yaml")])
    assert configs, "configs/ ships no YAML"
    for path in configs:
        load_config(path)


def test_cli_reports_one_sentence_and_exit_2(capsys):
    assert main(["prepare", "fashion-mnist", "experimental.prepare.rows_per_file=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ubt prepare: error: config key 'experimental.prepare.rows_per_file' must be >= 1; got 0."


def test_console_script_has_no_traceback_for_user_errors():
    proc = subprocess.run([sys.executable, "-m", "ubt_ray.cli", "config", "train.nope=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown config key 'train.nope'" in proc.stderr


def test_defend_help_names_settings_that_exist():
    """`ubt defend --help` lists the settings a user sets; each one it names is a real key, and its example
    command loads as a config."""
    import re
    import shlex

    from ubt_ray.cli import DEFEND_EPILOG, build_parser
    defend = build_parser()._subparsers._group_actions[0].choices["defend"]
    assert DEFEND_EPILOG in defend.format_help()
    named = set(re.findall(r"\b([a-z_]+\.[a-z_]+)=", DEFEND_EPILOG)) - {"section.key"}
    assert {"defend.model", "defend.data", "unlearn.num_samples", "evaluate.heldout_class_names"} <= named
    cfg = load_config(None, [])
    for key in named:
        section, field = key.split(".")
        assert hasattr(getattr(cfg, section), field), key
    example = shlex.split(DEFEND_EPILOG.split("example:")[1].replace("\\\n", " "))
    assert example[:2] == ["ubt", "defend"]
    cfg = load_config(None, example[2:])
    assert cfg.defend.model == "s3://bucket/clip" and cfg.evaluate.trigger is None


# The user-facing surface: what a user attacking or defending their own model and data sets. Beyond 40: pipeline.phases
# (which phases `ubt pipeline` runs), defend.evaluate (a user without a labelled test set turns the evaluation off)
# model.precision (mixed precision on GPUs) and storage.region (an AWS bucket outside us-east-1).
USER_FACING_KEYS = 43


def test_the_user_facing_surface_is_small_and_every_key_has_one_tier():
    user, experimental = keys(), keys(experimental=True)
    assert len(user) <= USER_FACING_KEYS, f"{len(user)} user-facing keys: mark research knobs experimental=True"
    every = {f"{s}.{f}" for s, v in load_config(None).to_dict().items() for f in v}
    assert set(user) | set(experimental) == every and not set(user) & set(experimental)
    assert {"defend.model", "defend.data", "unlearn.num_samples", "poison.attack"} <= set(user)
    assert {"score.density", "unlearn.forget", "trainer.threads_per_worker"} <= set(experimental)
    # The README states the count; it must stay true.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"lists the {len(user)} user-facing keys" in readme


def test_experimental_keys_are_set_in_their_own_section_only(tmp_path):
    cfg = load_config(None, ["experimental.score.density=[slof]", "experimental.unlearn.trainable=visual"])
    assert cfg.score.density == ["slof"] and cfg.unlearn.trainable == "visual"
    f = tmp_path / "c.yaml"
    f.write_text("experimental:\n  score.density: [slof]\n  unlearn.trainable: visual\n")
    assert load_config(f) == cfg
    for plain in (["score.density=[slof]"], ["experimental.train.lr=0.1"], ["experimental.score.nope=1"]):
        with pytest.raises(ConfigError) as e:
            load_config(None, plain)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="'score.density' is experimental: set it as experimental.score.density"):
        load_config(None, ["score.density=[slof]"])
    with pytest.raises(ConfigError, match="'experimental.train.lr' is not experimental: set it as train.lr"):
        load_config(None, ["experimental.train.lr=0.1"])
    f.write_text("score:\n  density: [slof]\n")
    with pytest.raises(ConfigError, match="set it as experimental.score.density"):
        load_config(f)
    for bad in ("experimental: [score.density]\n", "experimental:\n  score: {density: [slof]}\n"):
        f.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(f)


def test_saved_config_keeps_experimental_keys_under_their_section(tmp_path):
    cfg = load_config(None, ["experimental.score.density=[slof]", "unlearn.num_samples=99"])
    text = save_config(cfg)
    saved = yaml.safe_load(text)
    assert saved["experimental"]["score.density"] == ["slof"] and saved["unlearn"] == {"num_samples": 99}
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert load_config(again) == cfg


def test_help_keys_lists_the_user_facing_keys_and_all_adds_the_experimental(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "defend.model = " in out and "score.density" not in out
    assert len(out.strip().splitlines()) == len(keys())
    assert main(["config", "--keys", "--all"]) == 0
    out = capsys.readouterr().out
    assert "defend.model = " in out and "experimental.score.density = []" in out
