"""Compare training recipes for the map encoder's output projection on places never trained on, in minutes.

    python benchmarks/recipes.py --recipe '{"lr": 3e-4, "epochs": 10}' --recipe '{"lr": 1e-4, "epochs": 5}'

EfficientNet-Lite0 on the Blue Marble zoom-6 tiles (../shared/data/bluemarble). Cached under
``--cache`` on the first run: the frozen network's features of every zoom-6 tile up to the head
convolution, and three views (``geoindex.training.views``) of every tile with |lat| < 70, encoded by the
photo encoder. Places (seeded): 128 evaluation tiles, the most textured of 1,024, split into 64
trained on and 64 never trained on; 4 regions of 2x2 zoom-4 tiles held out whole (their 64 most
textured tiles evaluated). Each recipe trains a copy of the head convolution and its BatchNorm
(the ``projection`` head) on views 1-2 of every tile outside the held-out tiles and regions,
then scores exhaustive zoom-6 retrieval (all 4,096 tiles: the experiment's k=256) on four splits:
view 3 of trained tiles, all views of held-out tiles, all views in held-out regions, training
views. Recipe keys: lr, epochs, negatives (extra tiles per step from the training pool), l2sp,
tiles ("all" or "eval64": only the 64 trained evaluation tiles), bs, sym (symmetric loss).

This is a probe that ranks recipes quickly; ``pipelines.experiment`` measures the chosen one end
to end (built index, beam search). Appends a section to benchmarks/RESULTS.md and writes
benchmarks/results/recipes.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geoindex.geometry.metrics import great_circle_km  # noqa: E402
from geoindex.geometry.tiles import tile_center_array  # noqa: E402
from geoindex.models.encoders import create_encoder  # noqa: E402
from geoindex.sources import open_source  # noqa: E402
from geoindex.training.views import random_views  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "bluemarble"
Z = 6


def _features(cache: Path, source_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Tile features at the projection cut (all 4,096 z6 tiles) and encoded views (3 per tile, |lat| < 70)."""
    tiles_file, views_file = cache / "tiles.pt", cache / "views.npz"
    src = open_source(str(source_dir))
    enc = create_encoder("efficientnet-lite0", precision="fp32")
    v = enc.visual
    if not tiles_file.is_file():
        tiles = [mercantile.Tile(x, y, Z) for y in range(2**Z) for x in range(2**Z)]
        feats, tex = [], []
        for i in range(0, len(tiles), 64):
            imgs = [src.get(t) for t in tiles[i : i + 64]]
            tex += [float(np.asarray(im.convert("L").resize((64, 64)), np.float32).std()) for im in imgs]
            px = enc.preprocess_images(imgs).to(memory_format=torch.channels_last)
            with torch.no_grad():
                x = v.bn1(v.conv_stem(px))
                for stage in v.blocks:
                    x = stage(x)
            feats.append(x.half())
        torch.save({"proj": torch.cat(feats), "tex": np.array(tex),
                    "codes": np.array([t.y * 2**Z + t.x for t in tiles])}, tiles_file)
    if not views_file.is_file():
        y0, y1 = mercantile.tile(0, 70.0, Z).y, mercantile.tile(0, -70.0, Z).y
        tiles = [mercantile.Tile(x, y, Z) for y in range(y0, y1 + 1) for x in range(2**Z)]
        emb, lat, lon, code = [], [], [], []
        for i in range(0, len(tiles), 32):
            views = random_views(src, tiles[i : i + 32], per_tile=3, seed=[0, i])
            emb.append(enc.encode([view.image for view in views]))
            lat += [view.lat for view in views]
            lon += [view.lon for view in views]
            code += [view.tile.y * 2**Z + view.tile.x for view in views]
        np.savez(views_file, emb=np.concatenate(emb), lat=np.array(lat), lon=np.array(lon), code=np.array(code))
    return torch.load(tiles_file, weights_only=False), dict(np.load(views_file))


class Probe:
    """The places, the splits and one function per recipe: train, then score the four splits."""

    def __init__(self, tiles: dict[str, Any], views: dict[str, np.ndarray]) -> None:
        self.enc = create_encoder("efficientnet-lite0", precision="fp32")
        self.t = tiles
        self.q = torch.from_numpy(views["emb"]).float()
        self.vlat, self.vlon = views["lat"], views["lon"]
        row_of = {int(c): i for i, c in enumerate(tiles["codes"])}
        self.vrow = np.array([row_of[int(c)] for c in views["code"]])
        rng = np.random.default_rng(0)
        pool = np.unique(self.vrow)
        cand = rng.choice(pool, 1024, replace=False)
        chosen = cand[np.argsort(-tiles["tex"][cand], kind="stable")[:128]]
        perm = rng.permutation(chosen)
        held, self.trained_eval = perm[:64], perm[64:]
        xs, ys = tiles["codes"] % 2**Z, tiles["codes"] // 2**Z
        region = np.zeros(len(tiles["codes"]), bool)
        ymin, ymax = ys[pool].min(), ys[pool].max()
        for _ in range(4):
            bx, by = rng.integers(0, 8) * 8, rng.integers(ymin // 8, (ymax - 7) // 8 + 1) * 8
            region |= (xs >= bx) & (xs < bx + 8) & (ys >= by) & (ys < by + 8)
        region_eval = np.array(sorted((r for r in pool if region[r]), key=lambda r: -tiles["tex"][r])[:64])
        self.role = np.arange(len(self.vrow)) % 3  # views 1-2 train, view 3 evaluates trained tiles
        self.splits = {"heldout": self._views(self.trained_eval, [2]), "heldout_tiles": self._views(held, [0, 1, 2]),
                       "heldout_regions": self._views(region_eval, [0, 1, 2]),
                       "train": self._views(self.trained_eval, [0, 1])}
        self.excluded = np.isin(self.vrow, held) | region[self.vrow]
        self.centres = np.array(tile_center_array(xs, ys, zoom=Z)).T

    def _views(self, rows: np.ndarray, roles: list[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.vrow, rows) & np.isin(self.role, roles))

    def _head(self, conv: torch.nn.Module, bn: torch.nn.Module):  # type: ignore[no-untyped-def]
        return lambda x: F.normalize(self.enc.visual.forward_head(bn(conv(x.float()))), dim=-1)

    def score(self, head) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            maps = torch.cat([head(self.t["proj"][i : i + 512]) for i in range(0, len(self.t["codes"]), 512)])
        out = {}
        for name, idx in self.splits.items():
            top = (self.q[idx] @ maps.T).argmax(1).numpy()
            km = great_circle_km(self.vlat[idx], self.vlon[idx], self.centres[top, 0], self.centres[top, 1])
            out[name] = {"z6_top1": float((top == self.vrow[idx]).mean()), "median_km": float(np.median(km)),
                         "acc_200km": float((km <= 200).mean()), "views": int(len(idx))}
        return out

    def untrained(self) -> dict[str, dict[str, float]]:
        return self.score(self._head(self.enc.visual.conv_head, self.enc.visual.bn2))

    def train(self, *, lr: float = 1e-4, epochs: int = 5, negatives: int = 0, l2sp: float = 0.0,
              tiles: str = "all", bs: int = 128, sym: bool = False) -> dict[str, Any]:
        torch.manual_seed(0)
        conv, bn = copy.deepcopy(self.enc.visual.conv_head), copy.deepcopy(self.enc.visual.bn2)
        params = list(conv.parameters()) + list(bn.parameters())
        for p in params:
            p.requires_grad_(True)
        bn.eval()  # frozen statistics, trainable affine
        start = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=lr)
        head = self._head(conv, bn)
        rows = (np.flatnonzero(~self.excluded & (self.role < 2)) if tiles == "all"
                else self._views(self.trained_eval, [0, 1]))
        pool = np.unique(self.vrow[rows])
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        for _ in range(epochs):
            order = rng.permutation(rows)
            for s in range(0, len(order), bs):
                b = order[s : s + bs]
                uniq, target = np.unique(self.vrow[b], return_inverse=True)
                if negatives:
                    extra = rng.choice(pool, negatives + len(uniq), replace=False)
                    uniq = np.concatenate([uniq, extra[~np.isin(extra, uniq)][:negatives]])
                logits = (1 / 0.07) * self.q[b] @ head(self.t["proj"][uniq]).T
                tgt = torch.from_numpy(target.reshape(-1))
                loss = F.cross_entropy(logits, tgt)
                if sym:  # tiles -> photos too, over the tiles that have a photo in the batch
                    first = {int(t): i for i, t in reversed(list(enumerate(tgt.tolist())))}
                    cols = sorted(first)
                    loss = (loss + F.cross_entropy(logits.T[cols], torch.tensor([first[c] for c in cols]))) / 2
                if l2sp:
                    loss = loss + l2sp * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return {"train_views": int(len(rows)), "train_tiles": int(len(pool)),
                "seconds": round(time.perf_counter() - t0, 1), "results": self.score(head)}


def _row(name: str, res: dict[str, dict[str, float]]) -> str:
    cells = [f"{100 * res[s]['z6_top1']:.1f} % / {res[s]['median_km']:,.0f}"
             for s in ("heldout_tiles", "heldout_regions", "heldout", "train")]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", default=[], help="a recipe as JSON (repeatable)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/geoindex-recipes"))
    p.add_argument("--source", type=Path, default=SHARED)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if not a.source.is_dir():
        print(f"skipped: {a.source} (Blue Marble zoom-6 tiles) is absent", file=sys.stderr)
        return 0
    torch.set_num_threads(a.threads)
    a.cache.mkdir(parents=True, exist_ok=True)
    probe = Probe(*_features(a.cache, a.source))
    rows = [("untrained", {"results": probe.untrained()})]
    print(_row("untrained", rows[0][1]["results"]), flush=True)
    for text in a.recipe:
        out = probe.train(**json.loads(text))
        rows.append((text, out))
        print(_row(text, out["results"]), f"({out['seconds']} s)", flush=True)
    if a.no_record:
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"
    record = {"encoder": "efficientnet-lite0", "date": now.strftime("%Y-%m-%d"), "machine": machine,
              "command": "python benchmarks/recipes.py " + " ".join(f"--recipe '{r}'" for r in a.recipe),
              "splits": {k: int(len(v)) for k, v in probe.splits.items()},
              "rows": [{"recipe": name, **out} for name, out in rows]}
    (ROOT / "benchmarks" / "results" / "recipes.json").write_text(json.dumps(record, indent=1))
    lines = [f"\n## recipes probe: projection head, exhaustive z6 retrieval: {now:%Y-%m-%d %H:%M UTC}", "",
             f"- command: `{record['command']}`", f"- machine: {machine}, load avg {os.getloadavg()[0]:.1f}",
             "- encoder: efficientnet-lite0 (pretrained), fp32; imagery ../shared/data/bluemarble zoom 6",
             f"- views per split: {record['splits']}", "",
             "| recipe | tiles never trained on: z6 top-1 / median km | regions never trained on | "
             "other views of trained tiles | training views |", "|---|---:|---:|---:|---:|"]
    lines += [_row(name, out["results"]) for name, out in rows] + [""]
    with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
