"""PatchCore on MTD, a git ref's code against the working tree's, side by side (interleaved runs,
each in its own process): fit and map seconds, their ratio, and whether the maps of each
version are byte-identical between thread counts.

    python benchmarks/bench_detect_phases.py --ref e57437c~1 --train 100 --test 100 --set bank_size=2000

The old code is extracted with ``git archive`` into a temporary folder and imported from there;
``--threads 1 2`` runs each version under each torch thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_detect import extract_code  # noqa: E402

CHILD = r"""
import json, sys, time, hashlib
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2])
import torch
torch.set_num_threads(int(sys.argv[3]))
from bench_detect import mtd_manifest, detect_params, MTD
from anomalyncd.detect import create_detector, LazyImages, DetectContext
man = mtd_manifest(MTD)
cfg = json.loads(sys.argv[4])
train = man.train_normal()[: cfg["train"]]
test = [r for r in man.records if r.split == "test"][: cfg["test"]]
det = create_detector(detect_params(cfg["set"]), DetectContext(str(MTD)))
t0 = time.perf_counter(); det.fit(LazyImages([r.image for r in train])); t1 = time.perf_counter()
maps = det.predict(LazyImages([r.image for r in test])); t2 = time.perf_counter()
print(json.dumps({"fit_s": t1 - t0, "map_s": t2 - t1, "maps": hashlib.sha1(maps.tobytes()).hexdigest()[:12],
                  "bank": hashlib.sha1(det.bank.numpy().tobytes()).hexdigest()[:12]}))
"""


def run(code_root: Path, threads: int, cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(code_root), str(ROOT / "benchmarks"), str(threads), json.dumps(cfg)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="git ref of the old code")
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="detect param override key=value")
    args = ap.parse_args()
    cfg = {"train": args.train, "test": args.test, "set": args.set}
    with tempfile.TemporaryDirectory() as tmp:
        extract_code(args.ref, Path(tmp))
        versions = {"old": Path(tmp), "new": ROOT}
        rows: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for t in args.threads:
                for name, root in versions.items():  # interleaved: old, new, old, new...
                    r = run(root, t, cfg)
                    rows.setdefault((name, t), []).append(r)
                    print(f"{name} threads {t}: fit {r['fit_s']:.1f} s, map {r['map_s']:.1f} s, bank {r['bank']}, maps {r['maps']}", flush=True)
    for t in args.threads:
        o, n = rows[("old", t)], rows[("new", t)]
        fo, fn = sum(r["fit_s"] for r in o), sum(r["fit_s"] for r in n)
        mo, mn = sum(r["map_s"] for r in o), sum(r["map_s"] for r in n)
        print(f"threads {t}: old/new fit {fo / fn:.2f}x, map {mo / mn:.2f}x, fit+map {(fo + mo) / (fn + mn):.2f}x")
    for name in versions:
        same = len({r["maps"] for (v, _), rs in rows.items() if v == name for r in rs}) == 1
        print(f"{name}: maps byte-identical across threads {args.threads}: {same}")


if __name__ == "__main__":
    main()
