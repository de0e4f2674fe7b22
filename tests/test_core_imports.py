"""ubt_ray.core is the plain-PyTorch library: it imports nothing from the rest of the package (config, storage,
manifest, phases ...). The program layer adapts its config objects to the core's paths, tensors and values."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "ubt_ray" / "core"


def outside_imports(path: Path) -> list[str]:
    """The imports in `path` (a module of ubt_ray.core, at any depth of its code) that reach outside the core."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 or (node.level == 0 and (node.module or "").split(".")[0] == "ubt_ray"
                                   and not (node.module or "").startswith("ubt_ray.core")):
                bad.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import "
                           f"{', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "ubt_ray" and not a.name.startswith("ubt_ray.core")]
    return bad


def test_core_modules_import_only_the_core():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) > 5
    bad = [line for path in modules for line in outside_imports(path)]
    assert not bad, "ubt_ray.core imports from the program layer:\n" + "\n".join(bad)


def test_the_scan_catches_outside_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from ..config import Config\nfrom .. import storage\nimport ubt_ray.manifest\n"
                    "from ubt_ray.errors import UserError\nfrom .rows import RowCounts\nimport ubt_ray.core.rows\n"
                    "def f():\n    from ..phases import score\n")
    assert [line.split(": ", 1)[1] for line in outside_imports(path)] == [
        "from ..config import Config", "from .. import storage", "import ubt_ray.manifest",
        "from ubt_ray.errors import UserError", "from ..phases import score"]


def test_importing_the_core_loads_no_program_module():
    names = [f"ubt_ray.core.{p.stem}" for p in sorted(CORE.glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('ubt_ray'))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=CORE.parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = run.stdout.split()
    assert set(names) <= set(loaded)
    assert [m for m in loaded if m != "ubt_ray" and not m.startswith("ubt_ray.core")] == []


# Each single phase reads its own config section and the shared ones (where the run lives, the cluster, storage,
# the data and the model, whether finished outputs are reused); what it needs from elsewhere, its caller passes
# in (the selection size k, the model and data paths, overfit's scoring method). The training phases also read
# `trainer`, the Ray Train settings of every training run, and so does the one training loop they all run
# (train_loop.py), which takes each phase's schedule from the phase, never another phase's section. The composite
# commands (defend, sweep, compare) assemble phases and read their sections by design; a baseline's saved result
# holds its evaluation, so the fingerprint it is reused by names the evaluate section.
PACKAGE = Path(__file__).resolve().parent.parent / "ubt_ray"
PHASES = PACKAGE / "phases"
SHARED = {"run", "ray", "storage", "data", "model", "pipeline"}
TRAINER = {"trainer"}
OWN = {"prepare": {"prepare"}, "poison": {"poison"}, "train": {"train", *TRAINER}, "evaluate": {"evaluate"},
       "overfit": {"overfit", *TRAINER}, "score": {"score"}, "disagreement": {"score"}, "select": {"select"},
       "unlearn": {"unlearn", *TRAINER}, "baseline": {"baseline", "evaluate", *TRAINER}}


def sections_read(path: Path) -> set[str]:
    """The Config sections that `path` reads or hands on: `cfg.<section>` (any variable named cfg), the section
    names of a `fingerprint(cfg, (...), ...)`, and `<section>=` in a `replace(cfg, ...)`."""
    from ubt_ray.config import Config
    sections = set(Config.__dataclass_fields__)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
            found.add(node.attr)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id == "cfg":
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "fingerprint" and len(node.args) > 1 and isinstance(node.args[1], ast.Tuple):
                found |= {e.value for e in node.args[1].elts if isinstance(e, ast.Constant)}
            elif name == "replace":
                found |= {k.arg for k in node.keywords}
    return found & sections


def test_the_section_scan_sees_reads_fingerprints_and_handed_on_sections(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f(cfg, other):\n    a = cfg.score.method + other.unlearn.steps\n"
                    "    fingerprint(cfg, ('train', 'model'), {})\n    dataclasses.replace(cfg, select=None)\n"
                    "    dataclasses.replace(other, evaluate=None)\n")
    assert sections_read(path) == {"score", "train", "model", "select"}


def test_single_phases_read_only_their_own_config_section():
    bad = {name: sorted(sections_read(PHASES / f"{name}.py") - own - SHARED) for name, own in OWN.items()}
    bad = {name: s for name, s in bad.items() if s}
    assert not bad, f"phases reading other phases' config sections (pass the value in instead): {bad}"
    # The scan sees a cross-section read.
    assert "unlearn" in sections_read(PHASES / "defend.py")


def test_the_training_loop_reads_only_the_trainer_and_shared_sections():
    """Every training phase (attack train, overfit, unlearn, baselines) runs train_loop.fit: its workers,
    checkpoints and restarts come from `trainer`, its schedule from the phase's own section."""
    read = sections_read(PACKAGE / "train_loop.py")
    assert "trainer" in read
    assert not read - SHARED - TRAINER, f"the training loop reads phases' config sections: {read - SHARED - TRAINER}"
