"""Research tool: how fast a tiny CLIP learns the classes of a dataset, in a plain PyTorch loop (no Ray).

    .venv/bin/python benchmarks/scenes_learnability.py [--data scenes|fmnist] [--captions full|class]
        [--set NAME=VALUE ...] [--steps N] [--rows N] [--eval-every N] [--model NAME] [--supervised] [--name NAME]

Generates `--rows` training rows and 2,000 test rows in memory from the Fashion-MNIST idx files (scenes through
ubt_ray.core.scenes, with `--set` overriding its module constants, e.g. `--set MIN_SCALE=0.85 MAX_SCALE=0.85`;
or Fashion-MNIST's grey items as they are), trains a randomly initialised model with the CLIP loss (AdamW,
the attack training's defaults: batch 128, lr 2e-3, weight decay 0.1, 50 warmup steps, cosine decay) and, every
`--eval-every` steps, prints the loss, zero-shot CA on the test rows (the scenes' training prompt set) and a
linear probe's accuracy on the frozen image embeddings (1,500 rows to fit, 500 to test): whether the image tower
holds the class at all. `--captions class` replaces each caption by "a photo of <a class name>.".
`--supervised` trains the image tower with a linear head on the labels (cross-entropy, same optimiser and schedule)
instead of the CLIP loss: an upper bound on what the tower learns in the budget when told the class outright.
Writes results/NAME.{json,md} with its provenance.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from results_io import write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ubt_ray.core import scenes, zeroshot  # noqa: E402
from ubt_ray.core.batches import normalize  # noqa: E402
from ubt_ray.core.models import create_clip  # noqa: E402
from ubt_ray.core.objectives import clip_loss  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_ROWS = 2000


def read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return (read_idx(next(FMNIST.glob(f"{prefix}-images-idx3-ubyte*"))),
            read_idx(next(FMNIST.glob(f"{prefix}-labels-idx1-ubyte*"))))


def rows(data: str, split: str, n: int, size: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(uint8 pixels (n, 3, size, size), captions, labels) of the first n rows of a split."""
    items, labels = fashion_mnist(split)
    items, labels = items[:n], labels[:n].astype(int)
    if data == "fmnist":
        x = torch.from_numpy(items.copy()).float()[:, None]
        x = F.interpolate(x, size=size, mode="bilinear").clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
        return x, [f"a photo of {scenes.TRAIN_PROMPT_CLASS_NAMES[y]}." for y in labels], labels
    rendered = [scenes.render_scene(items[i], labels[i], 0, split, i) for i in range(n)]
    x = torch.from_numpy(np.stack([s.image.transpose(2, 0, 1) for s in rendered]))
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=size, mode="bilinear").clamp(0, 255).round().to(torch.uint8)
    return x, [s.caption for s in rendered], labels


def linear_probe(emb: torch.Tensor, labels: np.ndarray) -> float:
    """Accuracy on the last 500 rows of a softmax classifier fitted on the first 1,500 (frozen embeddings)."""
    y = torch.as_tensor(labels)
    w = torch.zeros(emb.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(emb[:1500] @ w * 10 + b, y[:1500])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((emb[1500:] @ w * 10 + b).argmax(1) == y[1500:]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("scenes", "fmnist"), default="scenes")
    p.add_argument("--captions", choices=("full", "class"), default="full")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override a scenes module constant")
    p.add_argument("--model", default="ubt-tiny-vit-64")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--supervised", action="store_true", help="cross-entropy on the labels instead of the CLIP loss")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--name", default=None)
    args = p.parse_args()
    for assignment in args.set:
        key, value = assignment.split("=", 1)
        current = getattr(scenes, key)
        setattr(scenes, key, tuple(value.split(",")) if isinstance(current, tuple) else type(current)(float(value)))
    torch.manual_seed(0)
    clip = create_clip(args.model, seed=0)
    model, size = clip.model, clip.image_size
    x, captions, labels = rows(args.data, "train", args.rows, size)
    tx, _, tlabels = rows(args.data, "test", TEST_ROWS, size)
    if args.captions == "class":
        rng = np.random.default_rng(0)
        captions = [f"a photo of {scenes.with_article(scenes.SCENE_CLASS_NAMES[y][rng.integers(3)])}."
                    for y in labels]
    tokens = clip.tokenizer(captions)
    classifier_prompts = (scenes.TRAIN_PROMPT_CLASS_NAMES, scenes.TRAIN_PROMPT_TEMPLATES)
    head = torch.nn.Linear(model.visual.output_dim, 10)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.1)
    y = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(0)
    order, pos, losses, curve = torch.randperm(len(x), generator=gen), 0, [], []
    started = time.time()
    for step in range(args.steps):
        if pos + args.batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        model.train()
        if args.supervised:
            loss = F.cross_entropy(head(model.encode_image(normalize(x[idx], clip.preprocess_cfg))), y[idx])
        else:
            image_f, text_f, scale = model(normalize(x[idx], clip.preprocess_cfg), tokens[idx])[:3]
            loss = clip_loss(image_f, text_f, scale, local=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            emb = zeroshot.image_embeddings(model, tx, clip.preprocess_cfg, 512)
            if args.supervised:
                with torch.no_grad():
                    logits = head(model.encode_image(normalize(tx, clip.preprocess_cfg)))
            else:
                logits = emb @ zeroshot.class_embeddings(model, clip.tokenizer, *classifier_prompts).T
            point = {"step": step + 1, "loss": round(float(np.mean(losses[-50:])), 3),
                     "clean_accuracy": round(float((logits.argmax(1).numpy() == tlabels).mean()), 3),
                     "linear_probe": round(linear_probe(emb, tlabels), 3),
                     "train_time_s": round(time.time() - started, 1)}
            curve.append(point)
            print(point, flush=True)
    name = args.name or f"scenes_learnability_{args.data}_{args.captions}"
    accuracy = "supervised head accuracy" if args.supervised else "zero-shot CA"
    md = [f"| step | loss | {accuracy} | linear probe | time |", "|---|---|---|---|---|"] + [
        f"| {c['step']} | {c['loss']:.3f} | {100 * c['clean_accuracy']:.1f}% | {100 * c['linear_probe']:.1f}% | "
        f"{c['train_time_s'] / 60:.1f} min |" for c in curve]
    setting = (("supervised (cross-entropy on the labels), " if args.supervised else "") +
               f"data {args.data}, captions {args.captions}, model {args.model}, {args.rows} rows, batch "
               f"{args.batch_size}, lr {args.lr}" + (f", scenes constants {' '.join(args.set)}" if args.set else ""))
    write_results(args.out, name, {"setting": vars(args), "curve": curve}, f"{setting}\n\n" + "\n".join(md))


if __name__ == "__main__":
    main()
