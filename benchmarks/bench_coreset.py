"""PatchCore's greedy coreset, this code's against a git ref's or the definition's: seconds,
their ratio, and whether both picked the same points in the same order.

    python -m benchmarks.bench_coreset --ref 877824a            # MTD's fit candidates when MTD is at hand
    python -m benchmarks.bench_coreset --random 200000 472      # Gaussian candidates

The candidates are those PatchCore's fit hands to its coreset (``detect.*`` of params.yaml,
``--set`` to change one): the sampled patches of MTD's normal training images (all of them, no
hold-out), or ``--random M D`` Gaussian rows. Without ``--ref`` the other side is
``ops.greedy_coreset_full`` (one product over every point per centre, one thread). Each side
runs in its own process, on ``torch.get_num_threads()`` workers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from anomalyncd.detect import ops
d = torch.load(sys.argv[2])
fn = ops.greedy_coreset_full if sys.argv[4] == "full" else ops.greedy_coreset
kw = {} if sys.argv[4] == "full" else {"progress": False, "workers": torch.get_num_threads()}
t = time.perf_counter()
idx = fn(d["x"], int(sys.argv[3]), seed=d["seed"], **kw)
s = time.perf_counter() - t
torch.save(idx, sys.argv[2] + "." + sys.argv[5])
print(json.dumps({"s": s}))
"""


def fit_candidates(overrides: list[str]) -> tuple[torch.Tensor, int, int]:
    """The patches (M, D1) that PatchCore's fit on MTD's normal training images hands to its
    coreset (the first scale's columns), the bank size and the seed."""
    from bench_detect import MTD, detect_params, mtd_manifest

    from anomalyncd.detect import DetectContext, LazyImages, create_detector

    man = mtd_manifest(MTD)
    det = create_detector(detect_params(overrides), DetectContext(str(MTD)))
    seen: dict = {}
    det._fit_bank = lambda patches, bank_size, workers: seen.update(x=patches, n=bank_size)
    det.fit(LazyImages([r.image for r in man.train_normal()]))
    x = seen["x"][:, : det._first_dims(seen["x"])].contiguous()
    return x, min(seen["n"], len(x)), det.params.seed


def run(code: Path, data: Path, n: int, kind: str, tag: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(code), str(data), str(n), kind, tag],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def main() -> None:
    from bench_detect import MTD, extract_code

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", help="git ref of the other code (default: ops.greedy_coreset_full of this code)")
    ap.add_argument("--random", type=int, nargs=2, metavar=("M", "D"), help="Gaussian candidates instead of MTD's")
    ap.add_argument("--n", type=int, default=0, help="points to pick (default: detect.bank_size)")
    ap.add_argument("--set", action="append", default=[], help="detect param override key=value")
    args = ap.parse_args()
    if args.random is None and not MTD.exists():
        ap.error(f"MTD not found at {MTD}; pass --random M D for Gaussian candidates")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "candidates.pt"
        if args.random:
            m, d = args.random
            x, n, seed = torch.from_numpy(np.random.default_rng(0).normal(size=(m, d)).astype(np.float32)), 10000, 0
            what = f"{m} Gaussian candidates of {d} dims"
        else:
            t = time.perf_counter()
            x, n, seed = fit_candidates(args.set)
            what = f"{len(x)} candidates of {x.shape[1]} dims from MTD's fit ({time.perf_counter() - t:.0f} s)"
        n = args.n or n
        torch.save({"x": x, "seed": seed}, data)
        other = Path(tmp) / "ref"
        if args.ref:
            other.mkdir()
            extract_code(args.ref, other)
        print(f"{what}, {n} centres, {torch.get_num_threads()} workers", flush=True)
        t_new = run(ROOT, data, n, "lazy", "new")
        name = args.ref or "greedy_coreset_full"
        t_old = run(other if args.ref else ROOT, data, n, "lazy" if args.ref else "full", "old")
        a, b = torch.load(f"{data}.new"), torch.load(f"{data}.old")
        same_set = len(set(a.tolist()) & set(b.tolist()))
        print(f"this code {t_new:.1f} s, {name} {t_old:.1f} s: {t_old / t_new:.1f}x")
        print(f"same order: {torch.equal(a, b)}; positions that differ: {int((a != b).sum())}; points in both: {same_set} of {n}")


if __name__ == "__main__":
    main()
