"""Scoring through real Ray: the actor-pool score on Ray Data equals the in-process computation (token drops,
trigger transfer, caption disagreement, density, pick), counts every row once, and bounded top-k selection."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from ubt_ray.config import ModelConfig, load_config
from ubt_ray.core.batches import decode_images, normalize
from ubt_ray.core.density import Reference, density_scores, key_rank, reference_keys
from ubt_ray.core.score_rows import combine
from ubt_ray.core.neighbours import grey_vectors, pixel_space, ring_disagreement, target_concept_first
from ubt_ray.core.scoring import prepare_model, score_batch, text_features, token_grid, tokens_to_take
from ubt_ray.core.transfer import fuse_ranks, transfer_lift
from ubt_ray.errors import UserError
from ubt_ray.models import load_clip
from ubt_ray.phases.score import robust_stats, score, signal_statistics, tail_strengths
from ubt_ray.shards import merge_top_k, top_k

from helpers import BROKEN_KEY, caption_shards, scoring_input

@pytest.fixture(scope="module")
def scored_input(tmp_path_factory):
    """Three shard files, a few rows marked poisoned, one row whose image bytes are not an image."""
    return scoring_input(tmp_path_factory.mktemp("score"), rows=300, files=3, poison_every=25)


def test_score_on_ray_data_scores_every_row_once_like_in_process(ray_local, scored_input, tmp_path, monkeypatch):
    data, model = scored_input
    # The token mask alone (the default adds blur and picks one; the several-transform path is tested below).
    cfg = load_config(None, ["score.num_actors=2", "experimental.score.batch_size=64", f"experimental.score.output={tmp_path / 'scores'}",
                             "experimental.score.top_k=[5, 10]", "experimental.score.transforms=[token_mask]"])
    # Both actors up before the first block goes out: otherwise one that starts 10 s late (seen once) finds the
    # 300 rows already scored, and the check below of both actors' shares would be about start-up timing.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    result = score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)
    table = pq.read_table(result.table)
    keys = table.column("key").to_pylist()
    source = pq.read_table(data)
    expected = [k for k in source.column("key").to_pylist() if k != BROKEN_KEY]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    assert (result.rows.rows_in, result.rows.rows_out, result.rows.rows_rejected) == (300, 299, 1)
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["rows"]["rejected_examples"] == {"image undecodable (UnidentifiedImageError)": [BROKEN_KEY]}
    assert manifest["actors"] == 2
    # Both actors scored rows: three small files are one read task, which one actor would otherwise take alone.
    assert len(manifest["rows_per_actor"]) == 2 and sum(manifest["rows_per_actor"]) == 300

    # The same function in this process, with the same settings, in batches of another size, gives the same scores,
    # to the last bit (each forward on score.batch_size rows, wherever the rows came from).
    clip = load_clip(ModelConfig(checkpoint=str(model)))
    prepare_model(clip.model, cfg.score.amp)
    rows = {r["key"]: r for r in source.to_pylist() if r["key"] != BROKEN_KEY}
    mine = {}
    for start in range(0, len(expected), 50):
        chunk = expected[start:start + 50]
        out = score_batch(clip.model, decode_images([rows[k]["image"] for k in chunk], 32),
                          text_features(clip.model, clip.tokenizer([rows[k]["caption"] for k in chunk])),
                          clip.preprocess_cfg,
                          token_grid(clip.model, 32), token_portion=tuple(cfg.score.token_portions),
                          rows_per_forward=cfg.score.batch_size)
        mine.update(zip(chunk, out["score"].tolist()))
    got = dict(zip(keys, table.column("score").to_pylist()))
    assert [got[k] for k in expected] == [mine[k] for k in expected]
    assert table.column("token_order").type == pa.list_(pa.int16())
    detection = json.loads((tmp_path / "scores" / "detection.json").read_text())
    assert detection["poisons"] == 12 and 0 <= detection["auroc"] <= 1 and "precision@10" in detection
    assert (tmp_path / "scores" / "score_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_transfer_rerank_on_ray_data_equals_the_in_process_test(ray_local, scored_input, tmp_path):
    """score.transfer_pool: the pool is the top rows by the combined score; each pool row's lift equals the one
    core/transfer.py gives in this process against the same seeded reference rows (outside the pool), and the
    pool's scores are its own values re-ordered by fuse_ranks; every other row keeps its score."""
    data, model = scored_input
    cfg = load_config(None, ["score.num_actors=2", "experimental.score.batch_size=64", "unlearn.num_samples=20",
                             "experimental.score.transfer_pool=2", "experimental.score.transfer_refs=10",
                             f"experimental.score.output={tmp_path / 'scores'}", "experimental.score.top_k=[5, 10]"])
    result = score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)
    assert (result.rows.rows_in, result.rows.rows_out, result.rows.rows_rejected) == (300, 299, 1)
    table = pq.read_table(result.table).sort_by("key")
    before = table.column("score_before_transfer").to_numpy()
    after = table.column("score").to_numpy()
    lift = table.column("transfer_lift").to_numpy(zero_copy_only=False)
    keys = table.column("key").to_pylist()
    pool = np.argsort(-before, kind="stable")[:40]
    assert set(np.flatnonzero(~np.isnan(lift))) == set(pool)
    outside = np.setdiff1d(np.arange(len(keys)), pool)
    assert np.array_equal(after[outside], before[outside])
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["transfer"]["pool_rows"] == 40 and manifest["transfer"]["reference_rows"] == 10

    source = {r["key"]: r for r in pq.read_table(data).to_pylist()}
    pool_keys = {keys[i] for i in pool}
    # The 10 rows of lowest seeded rank outside the pool; an undecodable one among them is left out.
    ref_keys = [k for _, k in sorted((key_rank(cfg.run.seed, k), k) for k in source if k not in pool_keys)[:10]
                if k != BROKEN_KEY]
    clip = load_clip(ModelConfig(checkpoint=str(model)))
    prepare_model(clip.model, cfg.score.amp)
    grid = token_grid(clip.model, 32)
    dtype = next(clip.model.parameters()).dtype
    ordered = [keys[i] for i in pool]
    x = normalize(decode_images([source[k]["image"] for k in ordered], 32), clip.preprocess_cfg).to(dtype)
    y = normalize(decode_images([source[k]["image"] for k in ref_keys], 32), clip.preprocess_cfg).to(dtype)
    with torch.no_grad():
        text = text_features(clip.model, clip.tokenizer([source[k]["caption"] for k in ordered]))
    rows = table.take(pa.array(pool))
    order = torch.tensor(np.stack(rows.column("token_order").to_numpy(zero_copy_only=False)).astype(np.int64))
    mine = transfer_lift(clip.model, x, text, y, rows.column("transform").to_pylist(), order,
                         tokens_to_take(max(cfg.score.token_portions), grid), grid, cfg.score.batch_size)
    assert np.allclose(lift[pool], mine.numpy(), atol=1e-6, equal_nan=True)
    assert np.array_equal(after[pool], fuse_ranks(before[pool], lift[pool]).astype(np.float32))


def test_caption_disagreement_on_ray_data_scores_every_row_once_like_in_process(ray_local, scored_input,
                                                                                 tmp_path):
    """The two-pass score (actors embed, tasks find neighbours) gives each decodable row the score the core
    functions give it on the whole set at once, and counts the undecodable row."""
    data, model = scored_input
    cfg = load_config(None, ["experimental.score.method=caption_disagreement", "score.num_actors=2", "experimental.score.batch_size=64",
                             "experimental.score.neighbour_ranks=[5, 30]", "experimental.score.neighbour_dims=16", "unlearn.num_samples=20",
                             f"experimental.score.output={tmp_path / 'scores'}", "experimental.score.top_k=[5, 10]"])
    result = score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)
    table = pq.read_table(result.table)
    source = pq.read_table(data)
    expected = [k for k in source.column("key").to_pylist() if k != BROKEN_KEY]
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    assert (result.rows.rows_in, result.rows.rows_out, result.rows.rows_rejected) == (300, 299, 1)
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["rows"]["rejected_examples"] == {"image undecodable (UnidentifiedImageError)": [BROKEN_KEY]}
    assert manifest["neighbour_ranks"] == [5, 30] and manifest["principal_axes"] == 16

    clip = load_clip(ModelConfig(checkpoint=str(model)))
    rows = {r["key"]: r for r in source.to_pylist()}
    space = pixel_space(grey_vectors(decode_images([rows[k]["image"] for k in expected], 32)), 16)
    with torch.no_grad():
        text = text_features(clip.model, clip.tokenizer([rows[k]["caption"] for k in expected]))
    disagreement = ring_disagreement(torch.arange(len(expected)), space, text, 5, 30)
    mine, _, _ = target_concept_first(disagreement, text, 20, cfg.score.concept_similarity)
    got = dict(zip(keys, table.column("score").to_pylist()))
    assert np.allclose([got[k] for k in expected], mine.numpy(), atol=1e-5)
    assert set(table.column_names) == {"key", "score", "disagreement", "target_similarity", "is_poison"}


def test_density_scores_on_ray_data_equal_the_in_process_computation(ray_local, scored_input, tmp_path):
    """score.density in the streaming actor pass: every row's k-distance, SLOF and DAO equal, to the last bit,
    those computed in this process from the same seeded reference rows, with one actor or two (blocks cut
    differently among them); the drop and the density scores are combined into one score, and the table says
    which signal gave each row's score."""
    data, model = scored_input
    common = ["experimental.score.density=[kdist, slof, dao]", "experimental.score.reference_rows=100", "experimental.score.density_k=8",
              "experimental.score.top_k=[5, 10]", "experimental.score.transforms=[token_mask]",
              "experimental.score.combine=max_z"]
    tables = []
    for actors in (1, 2):
        cfg = load_config(None, common + [f"score.num_actors={actors}", "experimental.score.batch_size=64",
                                          f"experimental.score.output={tmp_path / f'scores-{actors}'}"])
        result = score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)
        assert (result.rows.rows_in, result.rows.rows_out, result.rows.rows_rejected) == (300, 299, 1)
        manifest = json.loads((tmp_path / f"scores-{actors}" / "manifest.json").read_text())
        assert manifest["density_reference_rows"] == 100
        tables.append(pq.read_table(result.table).sort_by("key"))
    columns = ["density_kdist", "density_slof", "density_dao"]
    for c in columns + ["drop_token_mask"]:
        assert tables[0].column(c).to_pylist() == tables[1].column(c).to_pylist(), c

    source = pq.read_table(data).sort_by("key")
    rows = {r["key"]: r for r in source.to_pylist()}
    keys = [k for k in rows if k != BROKEN_KEY]
    clip = load_clip(ModelConfig(checkpoint=str(model)))
    prepare_model(clip.model, cfg.score.amp)
    grid = token_grid(clip.model, 32)

    def embed(chosen):
        with torch.no_grad():
            text = text_features(clip.model, clip.tokenizer([rows[k]["caption"] for k in chosen]))
        out = score_batch(clip.model, decode_images([rows[k]["image"] for k in chosen], 32), text,
                          clip.preprocess_cfg, grid, rows_per_forward=64, embeddings=True)
        return out["image_embedding"].double(), text.double()

    chosen = [k for k in reference_keys(list(rows), seed=cfg.run.seed, size=100) if k != BROKEN_KEY]
    images, captions = embed(chosen)
    reference = Reference(images, chosen, 8, captions=captions)
    mine = density_scores(embed(keys)[0], keys, reference)
    assert tables[0].column("key").to_pylist() == keys
    for name in ("kdist", "slof", "dao"):
        assert tables[0].column(f"density_{name}").to_pylist() == mine[name].float().tolist(), name
    # max_z over the four signals: each row's score is its largest standardised signal, named in `transform`.
    stats = json.loads((tmp_path / "scores-1" / "manifest.json").read_text())["signal_stats"]
    z = np.stack([(tables[0].column(c).to_numpy() - mean) / std for c, (mean, std) in stats.items()], axis=1)
    names = [c[len("drop_"):] if c.startswith("drop_") else c for c in stats]
    assert np.allclose(tables[0].column("score").to_numpy(), z.max(axis=1), atol=1e-5)
    assert tables[0].column("transform").to_pylist() == [names[i] for i in z.argmax(axis=1)]


def test_pick_combination_takes_the_transform_whose_top_drops_stand_out(ray_local, tmp_path):
    """Blur's drops have a group of 5 far outliers (a trigger blur removes), the token mask's drops are one
    spread-out distribution with a larger std: pick takes blur, and its score is blur's drop on every row."""
    rng = np.random.default_rng(0)
    n = 400
    blur = rng.normal(0.0, 0.01, n)
    blur[[3, 50, 120, 300, 399]] = 0.3
    table = pa.table({"key": [f"row-{i:06d}" for i in range(n)], "drop_blur": blur.astype(np.float32),
                      "drop_token_mask": rng.normal(0.0, 0.2, n).astype(np.float32)})
    ds = ray.data.from_arrow(table).repartition(4)
    stats = {c: (float(table.column(c).to_numpy().mean()), float(table.column(c).to_numpy().std()))
             for c in ("drop_blur", "drop_token_mask")}
    strengths = tail_strengths(ds, stats, 5)
    assert strengths["drop_blur"] > 5 > strengths["drop_token_mask"] > 1
    # pick's units: the median and 1.4826 MAD, from every row, or from a seeded sample of max_rows of them.
    robust = robust_stats(ds, ["drop_blur", "drop_token_mask"], seed=0)
    for t in ("drop_blur", "drop_token_mask"):
        d = table.column(t).to_numpy().astype(np.float64)
        assert robust[t] == pytest.approx((np.median(d), 1.4826 * np.median(np.abs(d - np.median(d)))), rel=1e-6)
    sampled = robust_stats(ds, ["drop_token_mask"], seed=0, max_rows=200)["drop_token_mask"]
    assert sampled != robust["drop_token_mask"]
    assert sampled == robust_stats(ds, ["drop_token_mask"], seed=0, max_rows=200)["drop_token_mask"]
    assert abs(sampled[0] - robust["drop_token_mask"][0]) < 0.1 * robust["drop_token_mask"][1]
    robust_tails = tail_strengths(ds, robust, 5)
    assert robust_tails["drop_blur"] > 20 > 4 > robust_tails["drop_token_mask"] > 1
    # The one read of the columns (up to max_rows) gives what the separate aggregates give.
    columns = ["drop_blur", "drop_token_mask"]
    drops = tmp_path / "drops"
    drops.mkdir()
    for i in range(4):
        pq.write_table(table.slice(i * 100, 100), drops / f"part-{i}.parquet")
    cfg = load_config(None, [])
    read_once = signal_statistics(str(drops), cfg, columns, rows=n, k=5)
    assert read_once[1] == robust and read_once[2] == pytest.approx(robust_tails, rel=1e-9)
    aggregated = signal_statistics(str(drops), cfg, columns, rows=n, k=5, max_rows=200)[0]  # Ray Data aggregates
    for c in columns:
        assert read_once[0][c] == pytest.approx((float(ds.mean(c)), float(ds.std(c))), rel=1e-6, abs=1e-9)
        assert aggregated[c] == pytest.approx(read_once[0][c], rel=1e-6, abs=1e-9)
    out = combine(table, stats, picked="drop_blur")
    assert out.column("score").to_pylist() == table.column("drop_blur").to_pylist()
    assert set(out.column("transform").to_pylist()) == {"blur"}
    # max_z instead: each row's larger standardised drop, so a token-mask row can come first.
    assert set(combine(table, stats).column("transform").to_pylist()) == {"blur", "token_mask"}


def test_score_refuses_actors_that_would_starve_the_reads(ray_local, scored_input, tmp_path):
    """Actors holding every CPU leave the read tasks none and the job would hang: a one-sentence error instead."""
    data, model = scored_input
    cfg = load_config(None, ["score.num_actors=4", "experimental.score.cpus_per_actor=1",
                             f"experimental.score.output={tmp_path / 'scores'}"])
    with pytest.raises(UserError, match="reserves all 4 CPUs"):
        score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)


def test_several_transforms_on_rows_that_are_all_rejected_count_them_instead_of_crashing(ray_local, scored_input,
                                                                                          tmp_path):
    """With every image undecodable there are no drops to standardise or pick from: the rows are counted as
    rejected and the table is empty, as with one transform."""
    _, model = scored_input
    data = tmp_path / "broken"
    data.mkdir()
    t = pq.read_table(caption_shards(tmp_path / "src", rows=20, files=1))
    pq.write_table(t.set_column(t.column_names.index("image"), "image", pa.array([b"not an image"] * 20)),
                   data / "part-0.parquet")
    cfg = load_config(None, ["score.num_actors=1", f"experimental.score.output={tmp_path / 'scores'}",
                             "experimental.score.transforms=[token_mask, blur]", "experimental.score.combine=pick"])
    result = score(cfg, str(model), str(data), k=cfg.unlearn.num_samples)
    assert (result.rows.rows_in, result.rows.rows_out, result.rows.rows_rejected) == (20, 0, 20)


def test_top_k_is_the_same_whatever_the_number_of_blocks(ray_local):
    rng = np.random.default_rng(0)
    n, k = 5000, 37
    scores = np.round(rng.normal(size=n), 2)  # rounded: many ties, broken by key
    table = pa.table({"key": [f"k{i:05d}" for i in rng.permutation(n)], "score": scores})
    full = sorted(zip(-scores, table.column("key").to_pylist()))[:k]
    expected = [key for _, key in full]
    for blocks in (1, 3, 16):
        got = top_k(ray.data.from_arrow(table).repartition(blocks), k, "score")
        assert got.column("key").to_pylist() == expected, blocks
    # The driver-side merge alone, over tables of every size, agrees too.
    parts = [table.slice(i, 700) for i in range(0, n, 700)]
    assert merge_top_k(parts, k, "score").column("key").to_pylist() == expected
