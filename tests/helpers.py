"""Small builders shared by tests: images as bytes, shard tables."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image


def free_port() -> int:
    """A TCP port free on loopback now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(size=(28, 28), mode="L", fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=None if mode != "CMYK" else "CMYK")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def caption_shards(directory, rows: int = 512, files: int = 2, seed: int = 0) -> str:
    """A small shard set of random 28x28 PNGs with template captions and labels; returns the directory."""
    import pathlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ubt_ray.core.captions import FASHION_MNIST_CLASSES, template_captions

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=rows).astype(np.int32)
    captions = template_captions(labels, FASHION_MNIST_CLASSES, seed=seed)
    images = [image_bytes(seed=seed * 100_000 + i) for i in range(rows)]
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        sl = slice(f * per, min(rows, (f + 1) * per))
        pq.write_table(pa.table({"key": [f"row-{i:06d}" for i in range(rows)][sl], "image": images[sl],
                                 "caption": captions[sl], "label": labels[sl]}), str(out / f"part-{f}.parquet"))
    return str(out)


BROKEN_KEY = "row-000007"  # the row of `scoring_input` whose image bytes are not an image


def scoring_input(root, rows: int, files: int, poison_every: int):
    """Shards of `rows` caption rows in `files` files with an `is_poison` column (every poison_every-th key) and
    one row (BROKEN_KEY) whose image bytes are not an image, and a seeded random model: (shards, model) paths."""
    import pathlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ubt_ray.config import ModelConfig
    from ubt_ray.models import load_clip, save_clip

    root = pathlib.Path(root)
    src = pathlib.Path(caption_shards(root / "src", rows=rows, files=files))
    data = root / "shards"
    data.mkdir()
    for f in sorted(src.glob("*.parquet")):
        t = pq.read_table(f)
        keys = t.column("key").to_pylist()
        images = [b"not an image" if k == BROKEN_KEY else im for k, im in zip(keys, t.column("image").to_pylist())]
        t = t.set_column(t.column_names.index("image"), "image", pa.array(images, pa.binary()))
        t = t.append_column("is_poison", pa.array([int(k[-6:]) % poison_every == 0 for k in keys]))
        pq.write_table(t, data / f.name)
    model = root / "model"
    save_clip(load_clip(ModelConfig(), seed=3), str(model))
    return data, model


def last_json(text: str, storage_cfg=None) -> dict:
    """The full summary of the `ubt` command whose stdout is `text`: the JSON file named on its last
    `summary: PATH` line (the command saves it under its output; `storage_cfg` reaches it on S3)."""
    from ubt_ray import storage
    from ubt_ray.cli import SUMMARY_LINE
    path = next(line[len(SUMMARY_LINE):] for line in reversed(text.splitlines()) if line.startswith(SUMMARY_LINE))
    return storage.read_json(path, storage_cfg)


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def fashion_mnist_shards(directory, split: str = "train", rows: int = 3000, files: int = 2, seed: int = 0) -> str:
    """The first `rows` Fashion-MNIST rows of a split as shards (PNG, template caption, label), like `ubt prepare`."""
    import pathlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ubt_ray.config import load_config
    from ubt_ray.core.captions import FASHION_MNIST_CLASSES, template_captions
    from ubt_ray.core.images import encode_png
    from ubt_ray.phases.prepare import read_idx

    cfg = load_config()
    stem = "train" if split == "train" else "t10k"
    images = read_idx(f"{FASHION_MNIST}/{stem}-images-idx3-ubyte.gz", cfg)[:rows]
    labels = read_idx(f"{FASHION_MNIST}/{stem}-labels-idx1-ubyte.gz", cfg)[:rows].astype(np.int32)
    captions = template_captions(labels, FASHION_MNIST_CLASSES, seed=seed * 2 + (split != "train"))
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        sl = slice(f * per, min(rows, (f + 1) * per))
        pq.write_table(pa.table({"key": [f"fm-{split}-{i:05d}" for i in range(rows)][sl],
                                 "image": [encode_png(im) for im in images[sl]],
                                 "caption": captions[sl], "label": labels[sl]}), str(out / f"part-{f}.parquet"))
    return str(out)


def small_clip_config(width: int, vision_layers: int, head_width: int) -> dict:
    """An open_clip model config smaller than ubt-tiny-vit, with its 8x8 grid of patch tokens on 32-pixel images
    and a one-layer text tower, so that training it in a test costs seconds."""
    return {"embed_dim": width,
            "vision_cfg": {"image_size": 32, "layers": vision_layers, "width": width, "head_width": head_width,
                           "patch_size": 4},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": width // head_width,
                         "layers": 1}}


def write_random_clip(out, model_cfg: dict, seed: int = 0) -> str:
    """A randomly initialised open_clip local-dir checkpoint of `model_cfg` (ubt-tiny-vit's preprocessing)."""
    import pathlib

    import open_clip
    import torch

    from ubt_ray.config import ModelConfig
    from ubt_ray.core.models import write_checkpoint_dir
    from ubt_ray.models import load_clip

    torch.manual_seed(seed)
    out = pathlib.Path(out)
    out.mkdir(parents=True)
    write_checkpoint_dir(open_clip.model.CLIP(**model_cfg), model_cfg, load_clip(ModelConfig()).preprocess_cfg, out)
    return str(out)


def registered_checkpoints(run_dir) -> list[dict]:
    """The checkpoints Ray Train has registered for the run (what a rerun resumes from): those in its checkpoint
    manager's snapshot, written after the workers' report. A checkpoint_* directory alone is not enough: a
    fresh-clone run here killed the run 1 s after one appeared, before it was registered, and the rerun
    started over."""
    import json
    import pathlib
    try:
        return json.loads((pathlib.Path(run_dir) / "ray" / "train" / "checkpoint_manager_snapshot.json").read_text())[
            "checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return []


# The default defense, sized for backdoor_fixture's model: its selection (150 rows, half the poisons) and retain
# sample (1,500 of 3,000 rows) scaled down from the quickstart's 300 of 60,000 and 8,192.
UBT = ["unlearn.num_samples=150", "experimental.select.retain_samples=1500", "experimental.score.top_k=[50, 150, 300]"]


def backdoor_fixture(root, attack: str = "blended", seed: int = 2) -> list[str]:
    """The overrides of tests/test_defend.py's backdoored model (benchmarks/defense_seeds.py runs it per seed):
    3,000 Fashion-MNIST rows with 150 poisons of `attack`, a small CLIP (2 vision layers, width 64) trained
    10 epochs; writes the clean and test shards and the initial model under `root`."""
    init = write_random_clip(root / "init", small_clip_config(width=64, vision_layers=2, head_width=32))
    return [f"run.output_dir={root}", f"data.clean_train={fashion_mnist_shards(root / 'clean', rows=3000)}",
            f"data.test={fashion_mnist_shards(root / 'test', split='test', rows=1000)}",
            f"poison.attack={attack}", "poison.num_poisons=150", f"model.checkpoint={init}", "train.epochs=10",
            # Deterministic on one machine (same poisons, same model, same defense) since reads take Ray Data's
            # v1 path; see test_defend_removes_the_backdoor_and_keeps_clean_accuracy for the seed.
            f"run.seed={seed}",
            "experimental.train.warmup_steps=10", "experimental.trainer.threads_per_worker=2",
            # Every training phase in this process (Ray Train's num_workers=0): DDP is test_train's subject,
            # and a worker actor's start costs each run 10-25 s here.
            "trainer.num_workers=0",
            # One scoring actor: on this little data each more actor costs its start and model load more
            # than its share of the work saves (the actor pool is
            # test_score_on_ray_data_scores_every_row_once_like_in_process's).
            "score.num_actors=1"]
