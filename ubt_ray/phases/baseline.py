"""baseline: the defenses UBT is compared with, on the same training loop and the same evaluation.

- `ft`: CLIP-loss fine-tuning of the backdoored model on clean pairs.
- `cleanclip`: CleanCLIP (Bansal et al., ICCV 2023): the CLIP loss plus in-modal self-supervised losses on
  augmented views (core/cleanclip.py), clean pairs only, at its paper's weights.

Both fine-tune `baseline.model` on `baseline.data` (a seeded sample of `baseline.rows` of it when set) for
`baseline.epochs` at `baseline.lr`, then evaluate CA and ASR like every other phase. The clean samples they
consumed (optimiser steps x batch size) are reported next to the rows they had. With `pipeline.reuse`, a finished
baseline in its output of the same model, data, test files and settings is read back instead of run again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .. import storage
from ..cluster import ensure_ray
from ..config import Config
from ..core.models import CHECKPOINT_SUFFIXES
from ..errors import UserError
from ..manifest import finished_output, fingerprint
from ..shards import count_rows, write_hash_sample
from ..train_loop import FitResult, FitSpec, fit
from .evaluate import EvalResult, evaluate_to, evaluation_files

BASELINES = {"ft": "clip", "cleanclip": "cleanclip"}
RESULT_JSON = "result.json"


@dataclass
class BaselineResult:
    kind: str
    model: str
    clean_rows: int
    clean_samples: int
    fit: FitResult
    evaluation: EvalResult | None
    wall_time_s: float
    reused: bool = False


def baseline(cfg: Config, kind: str, model_uri: str | None = None, evaluate_after: bool = True) -> BaselineResult:
    """Run baseline `kind` (ft or cleanclip) from `model_uri` (default baseline.model); the model goes to
    <baseline.output>/<kind>/model, its metrics to <baseline.output>/<kind>/eval."""
    if kind not in BASELINES:
        raise UserError(f"unknown baseline {kind!r}: use one of {', '.join(BASELINES)}.")
    started = time.time()
    b = cfg.baseline
    model_uri = model_uri or b.model
    if not storage.exists(model_uri, cfg.storage):
        raise UserError(f"experimental.baseline.model={model_uri} does not exist: train the backdoored model first "
                        f"(`ubt train`) or point baseline.model at an open_clip local-dir checkpoint.")
    out = storage.join(b.output, kind)
    signature = fingerprint(cfg, ("baseline", "trainer", "model", "evaluate", "data"),
                            {"model_files": (model_uri, CHECKPOINT_SUFFIXES), "data_files": (b.data, (".parquet",)),
                             **evaluation_files(cfg, evaluate_after)}, kind=kind)
    done = (finished_output(out, signature, cfg, RESULT_JSON, needs=("model",))
            if cfg.pipeline.reuse and evaluate_after else None)
    if done is not None:
        return BaselineResult(done["kind"], done["model"], done["clean_rows"], done["clean_samples"],
                              FitResult(**done["fit"]), EvalResult(**done["evaluation"]), done["wall_time_s"],
                              reused=True)
    storage.claim_output(out, f"baseline-{kind}", cfg.storage)
    data = _clean_rows(cfg, out)
    rows = count_rows(data, cfg.storage)
    kwargs = ({"clip_weight": b.clip_weight, "inmodal_weight": b.inmodal_weight, "seed": cfg.run.seed}
              if kind == "cleanclip" else {})
    r = fit(cfg, FitSpec(phase=f"baseline-{kind}", data=data, output=out, schedule=b, objective=BASELINES[kind],
                         objective_kwargs=kwargs, init=dataclasses.replace(cfg.model, checkpoint=model_uri)))
    ev = None
    if evaluate_after:
        ev = evaluate_to(cfg, r.model, storage.join(out, "eval"))
    result = BaselineResult(kind, r.model, rows, r.samples, r, ev, time.time() - started)
    if ev is not None:
        storage.write_json(storage.join(out, RESULT_JSON), {**dataclasses.asdict(result), "fingerprint": signature},
                           cfg.storage)
    return result


def _clean_rows(cfg: Config, out: str) -> str:
    """baseline.data, or a seeded hash sample of about baseline.rows of it written under <out>/clean."""
    b = cfg.baseline
    available = count_rows(b.data, cfg.storage)
    if b.rows is None or b.rows >= available:
        return b.data
    ensure_ray(cfg.ray)
    return write_hash_sample(b.data, storage.join(out, "clean"), b.rows / available, cfg)
