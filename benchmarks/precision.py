"""Encoder precision on this CPU: fp32 vs bf16 (autocast) vs int8 (dynamic Linear), cost and agreement.

One run, each encoder's precisions interleaved so that machine noise hits them alike:

* cost, every encoder: photo encode p50 (one photo, preprocessing included) and batch tiles/s
  (64 preprocessed tiles per forward).
* quality, pretrained encoders only (random weights say nothing about it): an index of the whole
  world at zoom 4 and 6 from the embedded Blue Marble imagery is built once per precision; views of
  random places (off-grid, another scale, rotated) are searched at the same precision. Reported:
  final-tile agreement with fp32 (same index precision as query precision), the same for queries at
  that precision against the fp32 index (a query at another precision than the build), and
  true-tile recall (the view's centre lies in the final z6 tile).

Writes benchmarks/results/precision.json:
``{"results": {encoder: {precision: {photo_ms_p50, tiles_per_s, final_tile_agreement, recall, ...}}},
"default": {encoder: precision}}``.

Run: ``.venv/bin/python benchmarks/precision.py`` (``--quick``: fewer queries and repetitions).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks._common import BenchRun, Report, benchmark_parser, markdown_table, run_benchmark

NAME = "precision"
ENCODERS = ("vit-b-32-random", "efficientnet-lite0")
QUALITY_ENCODERS = ("efficientnet-lite0",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), help="registry names (default: %(default)s)")
    p.add_argument("--queries", type=int, help="views searched per precision (default 600; 100 --quick)")
    p.add_argument("--reps", type=int, help="timed repetitions per precision (default 20; 5 --quick)")
    p.add_argument("--variants", nargs="+", help="measure only these variants (and fp32, every ratio's reference)")
    a = p.parse_args(argv)
    small = a.quick or a.smoke
    a.queries = a.queries or (20 if a.smoke else 100 if small else 600)
    a.reps = a.reps or (2 if a.smoke else 5 if small else 20)
    return a


BASELINE = "fp32"  # torch fp32 with today's inference graph (conv nets: BatchNorm folded): every ratio's reference
BEFORE = "fp32-before"  # torch fp32 as encoders ran before issue 15: the live network, torchvision preprocessing


def variants(name: str, only: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
    """label -> (precision, runtime) measured for an encoder; runtime ``eager`` and ``openvino`` are
    this benchmark's own (see ``_encoder``)."""
    from geoindex.models import onnx_runtime
    from geoindex.models.encoders import ENCODERS as REGISTRY
    from geoindex.models.families import FAMILIES

    out = {BASELINE: ("fp32", "torch")}
    exports = FAMILIES[REGISTRY[name].family].exports_onnx
    if exports:
        out[BEFORE] = ("fp32", "eager")
    out["fp32-torch-preprocessing"] = ("fp32", "torch+torch-preprocessing")
    if exports and onnx_runtime.available():
        out["fp32-onnxruntime"] = ("fp32", "onnxruntime")
        out["fp32-onnxruntime-torch-preprocessing"] = ("fp32", "onnxruntime+torch-preprocessing")
    if exports and onnx_runtime.available() and _openvino_available():
        out["fp32-openvino"] = ("fp32", "openvino")
        out["bf16-openvino"] = ("bf16", "openvino")
    out["bf16"] = ("bf16", "torch")
    if REGISTRY[name].family == "open_clip":
        out["int8"] = ("int8", "torch")
    if only:
        unknown = sorted(set(only) - set(out))
        if unknown:
            raise SystemExit(f"--variants: {', '.join(unknown)} not measured for {name}; choose from {', '.join(out)}")
        out = {label: v for label, v in out.items() if label == BASELINE or label in only}
    return out


def _openvino_available() -> bool:
    """OpenVINO is not a dependency: measured here when installed (pip install openvino), to decide."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class _OpenVinoNetwork:
    """pixels (n, 3, S, S) -> features, the folded network exported to ONNX and compiled by OpenVINO
    on the first call, for that call's image size (as ``onnx_runtime.OnnxNetwork`` does)."""

    def __init__(self, graph, precision: str, threads: int) -> None:  # type: ignore[no-untyped-def]
        self.graph, self.precision, self.threads = graph, precision, threads
        self.request = None

    def _compile(self, sample: torch.Tensor):  # type: ignore[no-untyped-def]
        import openvino as ov

        from geoindex.models import onnx_runtime

        model = ov.Core().read_model(io.BytesIO(onnx_runtime._export(self.graph, sample)))
        compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[self.precision]})
        return compiled.create_infer_request()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.contiguous()
        if self.request is None:
            self.request = self._compile(torch.zeros_like(x[:1]))
        return torch.from_numpy(self.request.infer({0: x.numpy()})[0].copy())


def _encoder(base, variant: tuple[str, str]):  # type: ignore[no-untyped-def]
    """``base`` at a variant. ``eager``: the live network and torchvision's own preprocessing, as
    before issue 15; ``openvino``: the folded network under OpenVINO (benchmark only); a
    ``+torch-preprocessing`` suffix: the encoder's ``preprocessing="torch"`` (resized in torch, not PIL)."""
    from geoindex.models.families import FAMILIES

    precision, runtime = variant
    runtime, _, preprocessing = runtime.partition("+")
    if preprocessing:  # images resized as tensor operations (pixels.resize_crop_normalize), tiles too
        return base.with_precision(precision, runtime=runtime, preprocessing="torch")
    if runtime == "eager":
        enc = base.with_precision("fp32", runtime="torch")
        enc._inference_network = lambda: enc.visual
        enc.preprocess = FAMILIES[enc.spec.family].build(enc.spec, None)[1]
        return enc
    if runtime == "openvino":
        enc = base.with_precision("fp32", runtime="torch")
        network = _OpenVinoNetwork(FAMILIES[enc.spec.family].for_inference(enc.visual), precision,
                                   torch.get_num_threads())
        enc._inference_network = lambda: network
        return enc
    return base.with_precision(precision, runtime=runtime)


def time_cost(name: str, reps: int, seed: int, only: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Photo p50 ms and batch tiles/s per precision, interleaved rep by rep."""
    import torch
    from PIL import Image

    from geoindex.models.encoders import create_encoder

    base = create_encoder(name, precision="fp32")
    encoders = {label: _encoder(base, v) for label, v in variants(name, only).items()}
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    tiles = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(64)]
    batch = torch.stack([base.preprocess(t) for t in tiles])
    photo_s: dict[str, list[float]] = {p: [] for p in encoders}
    prep_s: dict[str, list[float]] = {p: [] for p in encoders}
    forward_s: dict[str, list[float]] = {p: [] for p in encoders}
    batch_s: dict[str, list[float]] = {p: [] for p in encoders}
    for enc in encoders.values():  # warm-up: first-call allocations, int8 quantisation
        enc.encode([photo])
        enc.encode_tensor(batch[:8])
    for rep in range(reps):
        for p, enc in encoders.items():
            t = time.perf_counter()
            enc.encode([photo])
            photo_s[p].append(time.perf_counter() - t)
            # the same photo in its two parts, to say where a variant's time goes
            t = time.perf_counter()
            pixels = enc.preprocess_images([photo])
            prep_s[p].append(time.perf_counter() - t)
            t = time.perf_counter()
            enc.encode_tensor(pixels)
            forward_s[p].append(time.perf_counter() - t)
            if rep < max(2, reps // 4):
                t = time.perf_counter()
                enc.encode_tensor(batch)
                batch_s[p].append(time.perf_counter() - t)
    return {p: {"photo_ms_p50": float(np.median(photo_s[p]) * 1e3),
                "photo_preprocess_ms_p50": float(np.median(prep_s[p]) * 1e3),
                "photo_forward_ms_p50": float(np.median(forward_s[p]) * 1e3),
                "tiles_per_s": float(len(batch) / np.median(batch_s[p]))} for p in encoders}


def views(n: int, seed: int) -> tuple[list, np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Views of random places (|lat| < 60): centre anywhere, zoom 5.5-6.5, any rotation."""
    from geoindex.sources import RasterSource

    source = RasterSource()
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-60, 60, n)
    lon = rng.uniform(-180, 180, n)
    images = [source.render_view(float(a), float(o), zoom=float(rng.uniform(5.5, 6.5)),
                                 rotation_deg=float(rng.uniform(-180, 180))) for a, o in zip(lat, lon)]
    return images, lat, lon


def quality(name: str, n_queries: int, seed: int, work: Path,
            only: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Final-tile agreement with fp32 and true-tile recall, per precision, on a world z4+z6 index."""
    import geoindex
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule, tile_of_array
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import RasterSource
    from geoindex.storage.build import build_level

    images, lat, lon = views(n_queries, seed)
    tx, ty = tile_of_array(lat, lon, zoom=6)
    schedule = LevelSchedule(4, 6, 2)
    finals: dict[tuple[str, str], np.ndarray] = {}
    queries: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, float]] = {}
    labels = variants(name, only)
    for p, variant in labels.items():
        path = work / f"{name}-{p}"
        encoder = _encoder(create_encoder(name, precision="fp32"), variant)
        t = time.perf_counter()
        for zoom in schedule.zooms:
            build_level(path, zoom, source=RasterSource(), encoder=encoder, coverage=Coverage.world(),
                        schedule=schedule, shard_size=8192)
        out[p] = {"build_s": time.perf_counter() - t}
        print(f"{name} {p}: index built in {out[p]['build_s']:.0f} s", file=sys.stderr)
        queries[p] = encoder.encode(images)  # this variant's runtime for the queries too, encoded once
        for index_p in {p, BASELINE}:
            index = geoindex.open_index(work / f"{name}-{index_p}")
            results = index.search_embeddings(queries[p], k=16)
            finals[(p, index_p)] = np.array([(r.tile.x, r.tile.y) for r in results])
    truth = np.stack([tx, ty], axis=1)
    for p in out:
        same = finals[(p, p)]
        out[p]["final_tile_agreement"] = float(np.mean(np.all(same == finals[("fp32", "fp32")], axis=1)))
        out[p]["final_tile_agreement_vs_fp32_index"] = float(
            np.mean(np.all(finals[(p, "fp32")] == finals[("fp32", "fp32")], axis=1)))
        out[p]["recall"] = float(np.mean(np.all(same == truth, axis=1)))
        cosine = np.sum(queries[p] * queries[BASELINE], axis=1)  # both L2-normalised
        out[p]["query_cosine_to_fp32_p50"] = float(np.median(cosine))
        out[p]["query_cosine_to_fp32_min"] = float(cosine.min())
    return out


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    from geoindex.models.encoders import ENCODERS as REGISTRY
    from geoindex.models.malloc import keep_freed_memory

    bench = BenchRun.start(NAME, argv)
    keep_freed_memory()  # batches of 64 would otherwise page-fault their activations in on every call
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-precision-"))
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    try:
        for name in a.encoders:
            cost = time_cost(name, a.reps, a.seed, a.variants)
            qual = quality(name, a.queries, a.seed + 1, work, a.variants) if REGISTRY[name].meaningful else {}
            results[name] = {p: {**cost[p], "final_tile_agreement": None, "recall": None, **qual.get(p, {})}
                             for p in cost}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default = {name: default_variant(name) for name in results}
    recommended = {name: recommended_precision(results[name]) for name in results}
    rows = []
    for name, by_p in results.items():
        fp32, before = by_p[BASELINE], by_p.get(BEFORE)
        for p, r in by_p.items():
            rows.append([name, p + (" (default)" if default[name] == p else ""), r["photo_ms_p50"],
                         f"{fp32['photo_ms_p50'] / r['photo_ms_p50']:.2f}x",
                         f"{before['photo_ms_p50'] / r['photo_ms_p50']:.2f}x" if before else "-", r["tiles_per_s"],
                         f"{r['tiles_per_s'] / fp32['tiles_per_s']:.2f}x",
                         f"{r['tiles_per_s'] / before['tiles_per_s']:.2f}x" if before else "-",
                         r["final_tile_agreement"], r.get("final_tile_agreement_vs_fp32_index"), r["recall"]])
    table = markdown_table(["encoder", "variant", "photo ms p50", "vs fp32", f"vs {BEFORE}", "tiles/s (batch 64)",
                            "vs fp32", f"vs {BEFORE}", "final-tile agreement with fp32", "same, fp32 index",
                            "true-tile recall"], rows)
    targets = []
    for name in QUALITY_ENCODERS:
        if name not in results:
            continue
        by_p = results[name]
        for ref in (BASELINE, BEFORE):
            f = by_p.get(ref)
            for p, r in by_p.items():
                if f is None or p in (BASELINE, BEFORE):
                    continue
                speed = f["photo_ms_p50"] / r["photo_ms_p50"]
                agree = r["final_tile_agreement"] or 0.0
                # why a miss is a miss: how much of the photo is preprocessing, how fast the forward pass alone is
                forward = f["photo_forward_ms_p50"] / r["photo_forward_ms_p50"]
                targets.append((f"{name} {p}: photo >= 1.7x {ref} at >= 0.99 final-tile agreement",
                                f"{speed:.2f}x at {agree:.3f} (query cosine to fp32 >= "
                                f"{r.get('query_cosine_to_fp32_min', 1.0):.5f}); forward pass alone {forward:.2f}x, "
                                f"preprocessing {r['photo_preprocess_ms_p50']:.1f} of {r['photo_ms_p50']:.1f} ms",
                                speed >= 1.7 and agree >= 0.99))
                tiles = r["tiles_per_s"] / f["tiles_per_s"]
                targets.append((f"{name} {p}: tiles/s >= 1.7x {ref} (at >= 0.99 agreement)",
                                f"{tiles:.2f}x at {agree:.3f}", tiles >= 1.7 and agree >= 0.99))
    notes = [
        f"Quality: {a.queries} views of random places (|lat| < 60, zoom 5.5-6.5, any rotation) of the embedded "
        "Blue Marble; index = the whole world at z4 and z6 from the same imagery, built at each precision; k=16. "
        "Random-weight encoders get no quality figure.",
        "Variants: `fp32` is torch fp32 with today's inference graph (conv nets: BatchNorm folded, channels-last; "
        "the baseline of the table's ratios); `fp32-before` is torch fp32 as encoders ran before issue 15 (the live "
        "network, unfolded, channels-last, torchvision's preprocessing); `fp32-onnxruntime` the folded network "
        "under ONNX Runtime; `-torch-preprocessing`: the same, with the encoder's preprocessing='torch' (images and "
        "tiles resized by torch's antialiased bicubic, geoindex.models.pixels.resize_crop_normalize, instead of "
        "PIL's; the "
        "index is built that way too); `fp32-openvino` / `bf16-openvino` the folded network under OpenVINO "
        "(LATENCY hint; "
        "measured only where `openvino` is installed, it is not a dependency); bf16 = torch autocast; int8 = "
        "dynamically quantised Linear layers (ViT). Every variant but fp32-before and the -torch-preprocessing "
        "ones preprocesses with geoindex.models.pixels' PIL path (bit-identical to torchvision's).",
        "Photo ms = preprocessing (PIL's bicubic resize of the 640x480 photo to 298x224, crop, normalise; on "
        "one core) + the forward pass of one image, each also timed alone (photo_preprocess_ms_p50, "
        "photo_forward_ms_p50); -torch-preprocessing variants resize in torch instead. Preprocessing is the same "
        "code for every other variant but fp32-before, so it caps the photo speed-up a faster forward pass can give.",
        "Final-tile agreement can fall far below the query embeddings' cosine to fp32 "
        "(query_cosine_to_fp32_min / _p50 in the JSON): where the index's tiles score within a variant's rounding "
        "of each other (open ocean, desert, ice in Blue Marble at z4/z6, scored by an ImageNet network), any "
        "rounding picks another final tile.",
        "`default` in the JSON is what create_encoder picks on this machine (precision auto: bf16 only for "
        "encoders whose spec sets cpu_bf16; runtime auto: ONNX Runtime for fp32 conv nets on a CPU); "
        "`recommended` is the fastest variant measured to keep >= 0.99 final-tile agreement.",
    ]
    payload = {"results": results, "default": default, "recommended": recommended}
    return bench.report("encoder precision: cost and agreement with fp32", ", ".join(a.encoders), payload, (table,),
                        notes, targets)


def default_variant(name: str) -> str:
    """The variant ``create_encoder(name)`` runs on this machine (precision auto, runtime auto)."""
    from geoindex.models.encoders import ENCODERS as REGISTRY
    from geoindex.models.encoders import create_encoder, resolve_precision

    precision = resolve_precision("auto", spec=REGISTRY[name])
    runtime = create_encoder(name, precision=precision).runtime
    return precision if runtime == "torch" else f"{precision}-{runtime}"


def recommended_precision(by_p: dict[str, dict[str, float | None]]) -> str:
    """The fastest precision whose measured final-tile agreement with fp32 is >= 0.99 (fp32 if none is measured)."""
    ok = [p for p, r in by_p.items() if (r["final_tile_agreement"] or 0) >= 0.99 or p == BASELINE]
    return min(ok, key=lambda p: by_p[p]["photo_ms_p50"] or float("inf"))


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
