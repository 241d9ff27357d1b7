"""Every registered codec (``geoindex.storage.codecs``): bytes per tile on disk and final-tile agreement with ``flat``.

Indexes built once with fp16, then given each codec from the vectors of their FAISS files (a
finished level keeps its vectors once, there):

* encoder: Blue Marble tiles at zoom 4, 6, 8 of a small region embedded with the chosen encoder;
  queries are rendered views of the region (not tile-aligned) embedded with the same encoder.
* tiles (``--tiles DIR``, e.g. the Blue Marble pyramid at zoom 4 and 6): every tile of the folder
  at ``--tile-zooms``; queries are rendered views anywhere on Earth, embedded with the same encoder.
* synthetic: a 7-level index (z4..z16) of tree-structured synthetic embeddings, as in scale.py.

Bytes are counted over every file of a level that its manifest lists (parquet shards, FAISS
file, re-rank code), beside the code bytes of one FAISS entry. ``pq`` is IVF-PQ (by_residual off)
whose top ``rerank * k`` candidates per level are re-scored from the finer re-rank code.

Run: ``.venv/bin/python benchmarks/codecs.py --encoder efficientnet-lite0 --tiles DIR`` (``--quick``: tiny encoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._common import (
    BenchRun,
    Report,
    benchmark_parser,
    build_synthetic_index,
    markdown_table,
    resolve_encoder,
    run_benchmark,
)
from benchmarks.latency import build_region_index, make_photos, region_coverage
from geoindex.storage.codecs import REGISTRY

NAME = "codecs"
KINDS = ("parquet", "faiss", "rerank")  # the files of a level, as level_bytes sorts them
CODECS = ("flat", *(c for c in REGISTRY if c != "flat"))  # flat first: the reference the others are compared with


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True)
    p.add_argument("--queries", type=int, help="queries per index (default 1000)")
    p.add_argument("--k", type=int, nargs="+", default=[16, 64], help="beam widths (default 16 64)")
    p.add_argument("--region-tiles", type=int, help="zoom-4 tiles of the encoder index (default 2; 1 --quick)")
    p.add_argument("--synthetic-tiles", type=int, help="deepest-level tiles of the synthetic index (default 100000)")
    p.add_argument("--tiles", type=Path, help="a {z}/{x}/{y} tile folder indexed whole (e.g. the Blue Marble pyramid)")
    p.add_argument("--tile-zooms", type=int, nargs=3, default=[4, 6, 2], metavar=("START", "STOP", "STEP"),
                   help="schedule of the --tiles index (default 4 6 2)")
    a = p.parse_args(argv)
    if a.smoke:
        a.queries, a.region_tiles, a.synthetic_tiles = a.queries or 50, 1, a.synthetic_tiles or 2000
    elif a.quick:
        a.region_tiles, a.synthetic_tiles = a.region_tiles or 1, a.synthetic_tiles or 20_000
    a.queries = a.queries or 1000
    a.region_tiles = a.region_tiles or 2
    a.synthetic_tiles = a.synthetic_tiles or 100_000
    return a


def with_codec(src: Path, dst: Path, codec: str) -> None:
    """Copy an index and rebuild every IVF level with ``codec`` from the vectors kept in its FAISS file."""
    from benchmarks._common import publish_slim
    from geoindex.storage.manifest import Manifest
    from geoindex.storage.store import finish_level

    shutil.copytree(src, dst)
    manifest = Manifest.load(dst)
    levels = [manifest.levels[0]]
    for prev, info in zip(manifest.levels, manifest.levels[1:]):
        new = finish_level(dst, info.zoom, n_parents=prev.rows, codec=codec, dim=manifest.dim)
        levels.append(dataclasses.replace(new, encoder=info.encoder))
    manifest = dataclasses.replace(manifest, codec=codec, levels=tuple(levels))
    manifest.save(dst)
    publish_slim(dst, manifest)


def level_bytes(path: Path) -> list[dict]:
    """Per level (top first): rows and the bytes of every file its manifest lists, by kind."""
    from geoindex.storage.manifest import Manifest
    from geoindex.storage.store import FAISS_FILE

    out = []
    for lv in Manifest.load(path).levels:
        kinds = {"parquet": 0, "faiss": 0, "rerank": 0}
        for f in lv.files:
            kind = "parquet" if f.name.endswith(".parquet") else "faiss" if f.name == FAISS_FILE else "rerank"
            kinds[kind] += f.size
        out.append({"zoom": lv.zoom, "rows": lv.rows, "total": sum(kinds.values()), **kinds})
    return out


def evaluate(paths: dict[str, Path], xq: np.ndarray, ks: Sequence[int]) -> dict[str, dict]:
    """Per codec: bytes per tile on disk (every file) and in one FAISS entry, and final-tile agreement with flat."""
    from geoindex.retrieval.beam import beam_search
    from geoindex.retrieval.levels.stored import FaissLevel
    from geoindex.storage.codecs import get_codec
    from geoindex.storage.store import list_shards, open_store, read_embeddings

    finals: dict[tuple[str, int], np.ndarray] = {}
    scores: dict[tuple[str, int], np.ndarray] = {}
    out: dict[str, dict] = {}
    # exact embeddings of the deepest level (flat keeps them as encoded), to score whatever tile a codec returns
    _, flat = open_store(paths["flat"])
    deep = np.concatenate([read_embeddings(p) for p in list_shards(paths["flat"], flat[-1].zoom)]).astype(np.float32)
    for codec, path in paths.items():
        manifest, stored = open_store(path)
        levels = [FaissLevel(s) for s in stored]
        sizes = level_bytes(path)
        rows = sum(lv["rows"] for lv in sizes)
        ivf = sizes[1:]
        ivf_rows = sum(lv["rows"] for lv in ivf)
        deepest = sizes[-1]
        r: dict = {"rows": rows, "levels": sizes,
                   "bytes_per_tile": sum(lv["total"] for lv in sizes) / rows,
                   "ivf_bytes_per_tile": sum(lv["total"] for lv in ivf) / ivf_rows,
                   "faiss_bytes_per_tile": sum(lv["faiss"] for lv in sizes) / rows,
                   "code_bytes": int(stored[-1].index.code_size),
                   "rerank_code_bytes": get_codec(codec).rerank_bytes(manifest.dim),
                   "deepest_level_rows": deepest["rows"],
                   "deepest_level_bytes_per_tile": deepest["total"] / deepest["rows"],
                   **{f"deepest_level_{kind}_bytes_per_tile": deepest[kind] / deepest["rows"]
                      for kind in ("parquet", "faiss", "rerank")}}
        # bytes a tile adds (slope of all of a level's files between the two deepest levels): fixed costs
        # (pq's two sets of codebooks, 256 x d float32 each per level) fade as levels grow
        (b1, n1), (b2, n2) = ((ivf[-2]["total"], ivf[-2]["rows"]) if len(ivf) > 1 else (0, 0),
                              (deepest["total"], deepest["rows"]))
        r["marginal_bytes_per_tile"] = (b2 - b1) / (n2 - n1) if n2 != n1 else float("nan")
        if codec == "pq":
            r["pq_m"] = int(stored[-1].index.pq.M)
            r["pq_nbits"] = int(stored[-1].index.pq.nbits)
            r["rerank"] = levels[-1].rerank
        for k in ks:
            t = time.perf_counter()
            hits = beam_search(xq, levels, k)
            r[f"search_s_k{k}"] = time.perf_counter() - t
            x, y = hits[-1].x[:, 0], hits[-1].y[:, 0]
            finals[(codec, k)] = np.stack([x, y], axis=1)
            ids = hits[-1].I[:, 0]
            r[f"median_top2_gap_k{k}"] = float(np.median(hits[-1].D[:, 0] - hits[-1].D[:, 1]))
            scores[(codec, k)] = np.einsum("nd,nd->n", deep[np.maximum(ids, 0)], xq)
        out[codec] = r
    for codec in paths:
        for k in ks:
            out[codec][f"agreement_k{k}"] = float(np.mean(np.all(finals[(codec, k)] == finals[("flat", k)], axis=1)))
            # ties: several tiles can hold the same embedding (identical ocean tiles); a tile that scores
            # as high as flat's under exact arithmetic is as good an answer
            out[codec][f"score_agreement_k{k}"] = float(np.mean(scores[(codec, k)] >= scores[("flat", k)] - 1e-6))
        out[codec]["final_tile_agreement"] = min(out[codec][f"agreement_k{k}"] for k in ks)
        out[codec]["final_score_agreement"] = min(out[codec][f"score_agreement_k{k}"] for k in ks)
    return out


def world_views(source, n: int, seed: int, zoom: float) -> list:  # type: ignore[no-untyped-def]
    """Views anywhere on Earth (between 60 S and 70 N) that align with no tile: fractional zoom, rotation."""
    rng = np.random.default_rng(seed)
    return [source.render_view(float(rng.uniform(-60, 70)), float(rng.uniform(-180, 180)),
                               zoom=float(rng.uniform(zoom, zoom + 0.8)), size=256,
                               rotation_deg=float(rng.uniform(-20, 20))) for _ in range(n)]


def with_every_codec(base: Path, work: Path, prefix: str) -> dict[str, Path]:
    paths = {"fp16": base}
    for codec in CODECS:
        if codec != "fp16":
            with_codec(base, work / f"{prefix}-{codec}", codec)
            paths[codec] = work / f"{prefix}-{codec}"
    return {c: paths[c] for c in CODECS}


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import DirectorySource, RasterSource
    from geoindex.storage.codecs import get_codec
    from geoindex.storage.codecs.pq import TRAIN_SAMPLE

    bench = BenchRun.start(NAME, argv)
    enc_name = resolve_encoder(a)
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-codecs-"))
    source = RasterSource()
    encoder = create_encoder(enc_name)
    coverage, bounds = region_coverage(a.region_tiles)
    schedule = LevelSchedule(4, 8, 2) if not a.smoke else LevelSchedule(4, 6, 2)
    indexes: dict[str, dict[str, dict]] = {}

    # encoder-embedded tiles
    base = work / "enc-fp16"
    build_s = build_region_index(base, source, encoder, coverage, schedule)
    print(f"encoder index built in {build_s:.0f} s; embedding {a.queries} queries...", file=sys.stderr)
    xq = encoder.encode(make_photos(source, bounds, a.queries, a.seed + 1))
    indexes["encoder_index"] = evaluate(with_every_codec(base, work, "enc"), xq, a.k)

    # a tile folder, whole
    tiles_note = ""
    if a.tiles is not None:
        tile_schedule = LevelSchedule(*a.tile_zooms)
        base = work / "tiles-fp16"
        build_s = build_region_index(base, DirectorySource(a.tiles), encoder, Coverage.world(), tile_schedule)
        print(f"tiles index built in {build_s:.0f} s; embedding {a.queries} queries...", file=sys.stderr)
        xq = encoder.encode(world_views(source, a.queries, a.seed + 2, zoom=float(tile_schedule.stop) + 0.2))
        indexes["tiles_index"] = evaluate(with_every_codec(base, work, "tiles"), xq, a.k)
        tiles_note = (f"Tiles index: every tile of `{a.tiles}` at {list(tile_schedule.zooms)} embedded with "
                      f"`{enc_name}`, {indexes['tiles_index']['flat']['rows']:,} rows; {a.queries} queries = views "
                      "of the embedded Blue Marble raster anywhere between 60 S and 70 N (fractional zoom, rotated).")

    # synthetic 7 levels
    synth_paths = {}
    for codec in CODECS:
        built = build_synthetic_index(work / f"syn-{codec}", a.synthetic_tiles, dim=encoder.dim, codec=codec,
                                      n_queries=a.queries, seed=a.seed)
        synth_paths[codec] = built.path
    indexes["synthetic_index"] = evaluate(synth_paths, built.queries, a.k)
    shutil.rmtree(work, ignore_errors=True)

    enc_res, syn_res = indexes["encoder_index"], indexes["synthetic_index"]
    real = indexes.get("tiles_index", enc_res)  # the real-data index agreement and bytes are read from
    results = {c: {"code_bytes": enc_res[c]["code_bytes"],
                   "rerank_code_bytes": enc_res[c]["rerank_code_bytes"],
                   "bytes_per_tile": real[c]["bytes_per_tile"],
                   "marginal_bytes_per_tile": syn_res[c]["marginal_bytes_per_tile"],
                   "synthetic_deepest_level_bytes_per_tile": syn_res[c]["deepest_level_bytes_per_tile"],
                   "ivf_bytes_per_tile": real[c]["ivf_bytes_per_tile"],
                   "deepest_level_bytes_per_tile": real[c]["deepest_level_bytes_per_tile"],
                   "final_tile_agreement": min(r[c]["final_tile_agreement"] for r in indexes.values()
                                               if r is not syn_res),
                   "final_score_agreement": min(r[c]["final_score_agreement"] for r in indexes.values()
                                                if r is not syn_res),
                   "synthetic_bytes_per_tile": syn_res[c]["bytes_per_tile"],
                   "synthetic_final_tile_agreement": syn_res[c]["final_tile_agreement"],
                   **{name: r[c] for name, r in indexes.items()}} for c in CODECS}
    ks = "/".join(map(str, a.k))
    real_name = "tiles idx" if "tiles_index" in indexes else "encoder idx"
    table = markdown_table(
        ["codec", "code bytes (+8 id)", "re-rank code bytes", "bytes per added tile, all files (synthetic)",
         "all files / tile, synthetic z16 level", f"all files / tile, deepest level ({real_name})",
         f"of which parquet / FAISS / re-rank ({real_name})", f"agreement k={ks} ({real_name})",
         f"agreement k={ks} (encoder idx)", f"as-good-as-flat ({real_name})", f"agreement k={ks} (synthetic)"],
        [[c, enc_res[c]["code_bytes"], enc_res[c]["rerank_code_bytes"], syn_res[c]["marginal_bytes_per_tile"],
          syn_res[c]["deepest_level_bytes_per_tile"], real[c]["deepest_level_bytes_per_tile"],
          " / ".join(f"{real[c][f'deepest_level_{kind}_bytes_per_tile']:.0f}" for kind in KINDS),
          " / ".join(f"{real[c][f'agreement_k{k}']:.4f}" for k in a.k),
          " / ".join(f"{enc_res[c][f'agreement_k{k}']:.4f}" for k in a.k),
          " / ".join(f"{real[c][f'score_agreement_k{k}']:.4f}" for k in a.k),
          " / ".join(f"{syn_res[c][f'agreement_k{k}']:.4f}" for k in a.k)] for c in CODECS],
    )
    gaps = ", ".join(f"{real_name} {real['flat'][f'median_top2_gap_k{k}']:.2e} vs synthetic "
                     f"{syn_res['flat'][f'median_top2_gap_k{k}']:.2e} at k={k}" for k in a.k)
    sq8 = min(results["sq8"]["final_tile_agreement"], results["sq8"]["synthetic_final_tile_agreement"])
    pq_agree = min(results["pq"]["final_tile_agreement"], results["pq"]["synthetic_final_tile_agreement"])
    small_agree = min(results["pq_small"]["final_tile_agreement"],
                      results["pq_small"]["synthetic_final_tile_agreement"])
    small_marginal = syn_res["pq_small"]["marginal_bytes_per_tile"]
    fp16_marginal = syn_res["fp16"]["marginal_bytes_per_tile"]
    small = get_codec("pq_small")
    targets = (("sq8 final-tile agreement with flat >= 0.99", f"{sq8:.4f} (worst of every index and k)", sq8 >= 0.99),
               ("pq final-tile agreement with flat >= 0.99", f"{pq_agree:.4f} (worst of every index and k)",
                pq_agree >= 0.99),
               ("pq_small final-tile agreement with flat >= 0.99", f"{small_agree:.4f} (worst of every index and k)",
                small_agree >= 0.99),
               ("a pq level on disk <= 400 bytes per tile, every file counted",
                f"pq_small {small_marginal:.1f} per added tile (synthetic: {enc_res['pq_small']['code_bytes']} code "
                f"bytes + 8-byte id + {enc_res['pq_small']['rerank_code_bytes']} re-rank bytes + parquet tiles), "
                f"{real['pq_small']['deepest_level_bytes_per_tile']:.0f} per tile in the {real_name}'s deepest level "
                f"({real['pq_small']['deepest_level_rows']:,} rows, two sets of codebooks included); pq "
                f"{syn_res['pq']['marginal_bytes_per_tile']:.1f}", small_marginal <= 400),
               ("fp16 level on disk about half the earlier layout's (parquet fp16 + FAISS fp16)",
                f"{fp16_marginal:.1f} per added tile vs {2 * (2 * encoder.dim) + 8:.0f}+ before",
                fp16_marginal <= 0.6 * (4 * encoder.dim + 8)))
    notes = [
        f"Encoder index: `{enc_name}` embeddings of Blue Marble tiles, {a.region_tiles} zoom-4 tile(s) at "
        f"{list(schedule.zooms)}, {enc_res['flat']['rows']} rows; {a.queries} queries = rendered views of the region "
        "embedded with the same encoder.",
        *([tiles_note] if tiles_note else []),
        f"Synthetic index: {syn_res['flat']['rows']} rows over 7 levels (z4..z16), d={encoder.dim}, "
        f"{a.queries} queries = noisy copies of random leaves.",
        "Bytes count every file a level's manifest lists: parquet shards (tiles only: a finished level keeps its "
        "vectors once, in its FAISS file), index.faiss (the first level is always IndexFlatIP fp32; IVF entries "
        "add an 8-byte id each) and pq's re-rank code (rerank.npy + its codebooks). Bytes per added tile = the "
        "slope of a level's total between the two deepest synthetic levels; fixed costs (codebooks) fade there. "
        "as-good-as-flat: the codec's final tile scores at least as high as flat's under exact arithmetic "
        "(identical tiles, e.g. open ocean, share an embedding, so exact ties are not disagreements). "
        f"Median score gap between flat's best and second-best final tile: {gaps}. "
        "flat and fp16 hold the same values (the encoder's float16 output), so their agreement is 1 by construction.",
        f"pq: IVF-PQ, by_residual off, M={enc_res['pq']['pq_m']} sub-vectors x {enc_res['pq']['pq_nbits']} bits "
        f"(the largest divisor of d={encoder.dim} up to 64), codebooks trained on up to {TRAIN_SAMPLE:,} rows of "
        f"the level; each level's top {enc_res['pq']['rerank']}k PQ candidates are re-scored from the level's "
        "float16 vectors (rerank.npy, memory-mapped, read a few thousand rows per query; the level's only copy of "
        f"its vectors). pq_small: the same IVF-PQ, re-scored from a finer product code of "
        f"{small.rerank_bytes(encoder.dim)} one-byte sub-vectors instead.",
        "The machine is shared with other engineers' jobs (see the load average): times are indicative only.",
    ]
    return bench.report("codecs: bytes on disk and agreement with flat", enc_name, results, (table,), notes,
                        targets)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
