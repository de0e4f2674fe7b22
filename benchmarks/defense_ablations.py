"""Benchmark: UBT's ablations on one backdoored model (METHOD.md steps 1-4), in one process and one local Ray.

    .venv/bin/python benchmarks/defense_ablations.py --config configs/quickstart.yaml [--groups ...] [overrides...]

Needs the config's backdoored model and shards (run `ubt pipeline` first). Groups:
  detection  the scores: token_drop at token portions 1/64, 4/64, 16/64, 1.0; cosine; loss; scored with θ₀
             (no overfit); after an overfit on the 10% weakest-similarity rows (prioritize: weak_similarity)
  forget     token_invariance / push_away / local_push
  portion    unlearn.token_portion 1/64, 4/64, 16/64, 1.0
  samples    unlearn.num_samples 50 / 150 / 300 / 600
  scores     the whole defense with cosine, loss, no-overfit and weak-similarity scores
Every unlearning variant is evaluated (CA, ASR) on `--eval-rows` test rows. Writes defense_ablations.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ubt_ray import storage  # noqa: E402
from ubt_ray.cluster import ensure_ray  # noqa: E402
from ubt_ray.config import Config, load_config  # noqa: E402
from ubt_ray.phases.evaluate import evaluate  # noqa: E402
from ubt_ray.phases.overfit import overfit  # noqa: E402
from ubt_ray.phases.score import score  # noqa: E402
from ubt_ray.phases.select import select  # noqa: E402
from ubt_ray.phases.unlearn import unlearn  # noqa: E402

from results_io import write_results  # noqa: E402

GROUPS = ("detection", "forget", "portion", "samples", "scores")
PORTIONS = (1 / 64, 4 / 64, 16 / 64, 1.0)


def replace(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


class Bench:
    def __init__(self, cfg: Config, root: str, eval_rows: int):
        self.cfg, self.root = replace(cfg, "evaluate", max_rows=eval_rows), root
        self.rows: list[dict] = []
        self.overfits: dict[str, tuple[str, float]] = {}
        self.scores: dict[str, tuple[str, dict, float]] = {}

    def overfit_model(self, name: str, cfg: Config) -> tuple[str, float]:
        if name not in self.overfits:
            cfg = replace(cfg, "overfit", output=f"{self.root}/overfit-{name}")
            r = overfit(cfg, cfg.defend.model, cfg.defend.data)
            self.overfits[name] = (r.model, r.wall_time_s)
        return self.overfits[name]

    def scored(self, name: str, cfg: Config, model: str) -> tuple[str, dict, float]:
        if name not in self.scores:
            out = f"{self.root}/score-{name}"
            r = score(replace(cfg, "score", output=out), model, cfg.defend.data, k=cfg.unlearn.num_samples)
            self.scores[name] = (out, r.detection or {}, r.wall_time_s)
        return self.scores[name]

    def detection_row(self, group: str, variant: str, name: str, cfg: Config, model: str, overfit_s: float) -> None:
        _, det, took = self.scored(name, cfg, model)
        self.rows.append({"group": group, "variant": variant, "auroc": det.get("auroc"),
                          "precision@150": det.get("precision@150"), "precision@300": det.get("precision@300"),
                          "recall@300": det.get("recall@300"), "overfit_s": overfit_s, "score_s": took})
        print(json.dumps(self.rows[-1]), flush=True)

    def unlearn_row(self, group: str, variant: str, score_name: str, cfg: Config, overfit_s: float = 0.0) -> None:
        score_dir, det, score_s = self.scores[score_name]
        tag = f"{score_name}-{variant}".replace("/", "_").replace(" ", "_")
        cfg = replace(cfg, "select", output=f"{self.root}/select-{tag}")
        cfg = replace(cfg, "unlearn", output=f"{self.root}/unlearn-{tag}")
        sel = select(cfg, score_dir, cfg.defend.data, k=cfg.unlearn.num_samples)
        u = unlearn(cfg, cfg.defend.model, sel.forget, sel.retain)
        ev = evaluate(replace(cfg, "evaluate", output=f"{self.root}/eval-{tag}"), u.model)
        self.rows.append({"group": group, "variant": variant, "auroc": det.get("auroc"),
                          "forget_precision": sel.stats.get("forget_precision"),
                          "retain_poisons": sel.stats.get("retain_poisons"),
                          "clean_accuracy": ev.clean_accuracy, "attack_success_rate": ev.attack_success_rate,
                          "defense_s": round(overfit_s + score_s + sel.wall_time_s + u.wall_time_s, 1),
                          "unlearn_s": round(u.wall_time_s, 1)})
        print(json.dumps(self.rows[-1]), flush=True)


def run(cfg: Config, groups: list[str], eval_rows: int) -> dict:
    ensure_ray(cfg.ray)
    root = storage.join(cfg.defend.output, "ablations")
    b = Bench(cfg, root, eval_rows)
    cfg = b.cfg
    before = evaluate(replace(cfg, "evaluate", output=f"{root}/eval-before"), cfg.defend.model)
    model, overfit_s = b.overfit_model("default", cfg)
    default = "token_drop-rho" + "+".join(f"{p:.4f}" for p in cfg.score.token_portions)
    b.scored(default, cfg, model)

    if "detection" in groups:
        label = " + ".join(f"{p * 64:g}/64" for p in cfg.score.token_portions)
        b.detection_row("detection", f"token_drop ρ={label} (config)", default, cfg, model, overfit_s)
        for rho in PORTIONS:
            b.detection_row("detection", f"token_drop ρ={rho * 64:g}/64", f"token_drop-rho{rho:.4f}",
                            replace(cfg, "score", token_portions=[rho]), model, overfit_s)
        for method in ("cosine", "loss"):
            b.detection_row("detection", method, method, replace(cfg, "score", method=method), model, overfit_s)
        b.detection_row("detection", "token_drop, no overfit (θ₀)", "no-overfit", cfg, cfg.defend.model, 0.0)
        weak_cfg = replace(cfg, "overfit", subset_fraction=0.1, prioritize="weak_similarity")
        weak_model, weak_s = b.overfit_model("weak", weak_cfg)
        b.detection_row("detection", "token_drop, overfit on 10% weakest similarity", "weak", cfg, weak_model, weak_s)
    if "forget" in groups:
        for forget in ("token_invariance", "push_away", "local_push"):
            b.unlearn_row("forget", forget, default, replace(cfg, "unlearn", forget=forget), overfit_s)
    if "portion" in groups:
        for rho in PORTIONS:
            b.unlearn_row("portion", f"unlearn ρ={rho * 64:g}/64", default,
                          replace(cfg, "unlearn", token_portion=rho), overfit_s)
    if "samples" in groups:
        for k in (50, 150, 300, 600):
            b.unlearn_row("samples", f"k={k}", default, replace(cfg, "unlearn", num_samples=k), overfit_s)
    if "scores" in groups:
        for name in ("cosine", "loss", "no-overfit", "weak"):
            if name in b.scores:
                b.unlearn_row("scores", f"score {name}", name, cfg, 0.0 if name == "no-overfit" else overfit_s)
    return {"before": {"clean_accuracy": before.clean_accuracy, "attack_success_rate": before.attack_success_rate},
            "eval_rows": eval_rows, "model": cfg.defend.model, "rows": b.rows}


def to_markdown(result: dict) -> str:
    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.3f}"):
        return "" if x is None else fmt.format(x)

    b = result["before"]
    out = [f"Backdoored model: CA {pct(b['clean_accuracy'])}, ASR {pct(b['attack_success_rate'])} "
           f"(on {result['eval_rows']} test rows).", ""]
    det = [r for r in result["rows"] if r["group"] == "detection"]
    if det:
        out += ["| score | AUROC | precision@150 | precision@300 | recall@300 | overfit | scoring |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {num(r['auroc'])} | {pct(r['precision@150'])} | {pct(r['precision@300'])} | "
                f"{pct(r['recall@300'])} | {r['overfit_s']:.0f} s | {r['score_s']:.0f} s |" for r in det]
        out.append("")
    rest = [r for r in result["rows"] if r["group"] != "detection"]
    if rest:
        out += ["| ablation | variant | forget-set precision | CA after | ASR after | defense time | unlearn time |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['group']} | {r['variant']} | {pct(r['forget_precision'])} | {pct(r['clean_accuracy'])} | "
                f"{pct(r['attack_success_rate'])} | {r['defense_s']:.0f} s | {r['unlearn_s']:.0f} s |" for r in rest]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--eval-rows", type=int, default=5000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args, overrides = parser.parse_known_args()
    started = time.time()
    result = run(load_config(args.config, overrides), args.groups, args.eval_rows)
    result["total_s"] = round(time.time() - started, 1)
    write_results(args.out, "defense_ablations", result, to_markdown(result))


if __name__ == "__main__":
    main()
