"""How detect, mebin, infer and merge scale with the number of images: seconds, images per
second and peak RSS per stage, for N images, in one process or several (torchrun).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py                 # N = 1000 3000 10000
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py 200 1000 --nproc 1 2

For each N it writes a demo-like dataset (``anomalyncd.demo``'s generator: N defect images in
4 types, the demo's 40 normal training and 8 normal test images) under ``--work``, and runs
prepare, then the timed stages, each as its own process (``python -m stages.<stage>``, or
``torchrun --nproc_per_node=P`` for detect, mebin and infer) with the project's params.yaml
(the real-data defaults: PatchCore on EfficientNet-Lite0 at 224 px, a bank of 10,000 patches).
``infer`` needs a trained classifier: one is trained once, for 1 epoch, on the first N and
reused (infer's cost does not depend on how well the model was trained).

Peak RSS is the largest resident set of one process of the stage (``getrusage`` of its
children: torchrun's workers, mebin's pool), in MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's anomalyncd, as the stages' processes use
STAGES = ["detect", "mebin", "infer", "merge"]
DISTRIBUTED = {"detect", "mebin", "infer"}


def measure(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` in a fresh process that reports its children's time and peak RSS."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.call(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,\n"
        "    'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return result


def stage_cmd(stage: str, nproc: int) -> list[str]:
    if nproc > 1 and stage in DISTRIBUTED:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", f"stages.{stage}"]
    return [sys.executable, "-m", f"stages.{stage}"]


def make_project(work: Path, n: int) -> Path:
    """A project folder for N defect images: the demo dataset, params.yaml, the manifest."""
    from anomalyncd.config import DemoParams
    from anomalyncd.demo import generate

    proj = work / f"n{n}"
    if not (proj / "data/prepared/manifest.csv").is_file():
        shutil.rmtree(proj, ignore_errors=True)
        demo = DemoParams(n_per_type=-(-n // 4))
        generate(proj / "demo", demo)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["dataset"].update(layout="mvtec", root="demo")
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        measure([sys.executable, "-m", "stages.prepare"], proj)
    return proj


def train_once(proj: Path, model: Path) -> None:
    """Train the classifier for 1 epoch on ``proj`` (after its detect and mebin), keep it at ``model``."""
    if model.is_file():
        return
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (proj / "params.train.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    measure([sys.executable, "-m", "stages.train", "--params", "params.train.yaml"], proj)
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(proj / "models/mgvit.pt", model)


STORES = ["data/detect/maps.zarr.zip", "data/mebin/crops.zarr.zip", "data/infer/probs.zarr.zip",
          "data/merge/predictions.csv"]


def digests(proj: Path) -> dict[str, str]:
    return {s: hashlib.sha256((proj / s).read_bytes()).hexdigest() for s in STORES}


def run(n: int, nproc: int, work: Path, reference: dict) -> list[dict]:
    """Time the stages on N images with ``nproc`` processes; one row per stage. The outputs'
    digests are compared with those of the first run of this N (``reference``)."""
    proj = make_project(work, n)
    rows = []
    for stage in STAGES:
        if stage == "infer":
            train_once(proj, work / "mgvit.pt")
            (proj / "models").mkdir(exist_ok=True)
            shutil.copy(work / "mgvit.pt", proj / "models/mgvit.pt")
        r = measure(stage_cmd(stage, nproc), proj)
        rows.append({"n": n, "nproc": nproc if stage in DISTRIBUTED else 1, "stage": stage,
                     "seconds": r["seconds"], "images_per_s": n / r["seconds"], "rss_mb": r["rss_mb"]})
        print(f"{n:>6} {rows[-1]['nproc']:>5} {stage:<7} {r['seconds']:9.1f} {n / r['seconds']:10.2f} "
              f"{r['rss_mb']:9.0f}", flush=True)
    got = digests(proj)
    if n in reference:
        same = got == reference[n]
        print(f"{n:>6} {nproc:>5} outputs {'identical to' if same else 'DIFFER from'} the first run's", flush=True)
    else:
        reference[n] = got
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="*", type=int, default=[1000, 3000, 10000], help="numbers of defect images")
    ap.add_argument("--nproc", nargs="+", type=int, default=[1], help="processes for detect, mebin, infer")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomalyncd_bench_scale",
                    help="where the data go (kept: a second call reuses them)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    print(f"{'N':>6} {'procs':>5} {'stage':<7} {'seconds':>9} {'images/s':>10} {'RSS MB':>9}")
    started = time.perf_counter()
    reference: dict = {}
    rows = [row for n in args.n for p in args.nproc for row in run(n, p, args.work, reference)]
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
