"""Config loading: every user mistake stops with one sentence naming the key and what is allowed."""

import subprocess
import sys

import pytest

from ubt_ray.cli import main
from ubt_ray.config import load_config, save_config
from ubt_ray.errors import ConfigError


def test_defaults_resolve_references():
    cfg = load_config(None, ["run.output_dir=/tmp/abc"])
    assert cfg.data.train == "/tmp/abc/poison/shards"
    assert cfg.prepare.output == "/tmp/abc/data"
    assert cfg.evaluate.output == "/tmp/abc/attack/eval"


def test_override_types_are_parsed():
    cfg = load_config(None, ["train.lr=5e-4", "train.epochs=3", "model.checkpoint=null", "train.use_gpu=true",
                             "poison.params={size: 3, location: random}", "run.name=123"])
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.epochs, float) and cfg.train.epochs == 3.0
    assert cfg.model.checkpoint is None and cfg.train.use_gpu is True
    assert cfg.poison.params == {"size": 3, "location": "random"}
    assert cfg.run.name == "123"


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", ["unknown config key 'train.lrr'", "lr"]),
    ("nosection.x=1", ["unknown config key 'nosection'"]),
    ("train.lr=abc", ["'train.lr' must be a number", "'abc'"]),
    ("train.batch_size=1.5", ["'train.batch_size' must be an integer"]),
    ("train.use_gpu=3", ["'train.use_gpu' must be true/false"]),
    ("train.lr=-1", ["'train.lr' must be > 0", "-1"]),
    ("poison.fraction=1.5", ["'poison.fraction' must be > 0 and <= 1", "1.5"]),
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
    """-c attack.yaml -c setting.yaml: the setting's keys win, the attack's other keys of a section stay."""
    attack, setting = tmp_path / "attack.yaml", tmp_path / "setting.yaml"
    attack.write_text("run:\n  name: a\nscore:\n  batch_size: 64\n  transforms: [token_mask]\n")
    setting.write_text("score:\n  transforms: [token_mask, blur]\n  combine: pick\n")
    cfg = load_config([attack, setting], ["score.combine=max_z"])
    assert cfg.run.name == "a" and cfg.score.batch_size == 64
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
    assert main(["prepare", "fashion-mnist", "prepare.rows_per_file=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ubt prepare: error: config key 'prepare.rows_per_file' must be >= 1; got 0."


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
