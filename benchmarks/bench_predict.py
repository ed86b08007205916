"""Time ``anomalyncd predict``: start-up, warm single-image latency, batched throughput, per step.

    python -m benchmarks.bench_predict                         # this project's run, 200 MTD images
    python -m benchmarks.bench_predict --run ../mtd-run --n 200 --ref /tmp/main-copy
    python -m benchmarks.bench_predict --run ../mtd-run --n 200 --normal-share 0.9   # a line's mix

``--run``: a finished project (default: this one, the demo run after ``dvc repro``). Images: N
MTD defect images (``--mtd``, default ``../shared/datasets/mtd`` beside the project or ``$ANOMALYNCD_MTD``),
taken evenly over the ``MT_*/Imgs`` folders, when the dataset is there; else the run's own
demo test images (repeated up to N). ``--normal-share F``: that share of the N images
defect-free instead (``MT_Free`` outside its training list, or the demo's ``good`` test
images), as on a line, where
``predict`` spends MEBin and the classifier only on the images its normal gate lets through.

Two parts:

1. The command as a user runs it (a fresh ``python -m stages.predict`` process): wall time and
   peak RSS on 1 image and on N images. Start-up = wall(1) - warm single-image latency; batched
   ms/image = (wall(N) - wall(1)) / (N - 1). With ``--ref DIR`` (a copy of another version's
   ``anomalyncd`` and ``stages``, e.g. ``git archive main anomalyncd stages | tar -x -C DIR``)
   the same commands run with that code, interleaved with this one's, and the ratios are
   printed (the machine's load drifts: compare within one invocation).
2. In this process, with this code: loading the run and its models, the warm single-image
   latency (median over ``--single`` images), and the N images' time per step (reading images,
   detector, MEBin, classifier, merge) from :attr:`anomalyncd.predict.Predictor.timings`.
   (``benchmarks/bench_crop_cnn.py`` times the classifier's CNN in both memory layouts.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("ANOMALYNCD_MTD", ROOT.parent / "shared" / "datasets" / "mtd"))


def pick_images(run: Path, mtd: Path, n: int, normal_share: float = 0.0) -> tuple[str, list[Path]]:
    """N image files, ``round(normal_share * n)`` of them defect-free: MTD images evenly over
    its folders if present, else the run's demo test images (cycled from the first, each under
    its own name)."""
    n_free = round(normal_share * n)
    if (mtd / "MT_Free").is_dir():
        defect = sorted(f for d in mtd.glob("MT_*") if d.name != "MT_Free" for f in (d / "Imgs").glob("*.jpg"))
        listed = mtd / "mtd_train_filenames.txt"  # the detector's normal training images: not new to it
        train = set(listed.read_text().split()) if listed.is_file() else set()
        free = sorted(f for f in (mtd / "MT_Free" / "Imgs").glob("*.jpg") if f.name not in train)
        return f"MTD ({mtd})", _evenly(defect, n - n_free) + _evenly(free, n_free)
    tests = sorted((run / "data" / "demo").rglob("test/*/*.png"))
    defect = [f for f in tests if f.parent.name != "good"]
    free = [f for f in tests if f.parent.name == "good"]
    if not defect:
        sys.exit(f"{run}: no demo test images and no MTD at {mtd}; pass --mtd")
    if n_free and not free:
        sys.exit(f"{run}: no defect-free demo test images (test/good) for --normal-share {normal_share}")
    return f"the demo run's test images ({run})", _cycled(defect, n - n_free) + _cycled(free, n_free)


def _evenly(files: list[Path], k: int) -> list[Path]:
    """``k`` of ``files`` evenly spaced (fewer when there are fewer)."""
    return files[:: max(1, len(files) // k)][:k] if k else []


def _cycled(files: list[Path], k: int) -> list[Path]:
    """The first ``k`` of ``files`` repeated as often as needed."""
    return [files[i % len(files)] for i in range(k)]


def link_images(files: list[Path], dest: Path) -> list[Path]:
    """Symlinks to ``files`` with unique names (predict needs unique ids)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        link = dest / f"{i:04d}_{f.name}"
        link.symlink_to(f.resolve())
        out.append(link)
    return out


def run_cli(code: Path, run: Path, inputs: list[Path], out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``python -m stages.predict`` with the code in ``code``."""
    env = dict(os.environ, PYTHONPATH=str(code))
    args = [sys.executable, "-m", "stages.predict", *map(str, inputs), "--run", str(run), "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.Popen(args, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"predict with {code} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def cli_part(run: Path, images: list[Path], ref: Path | None, repeat: int, tmp: Path) -> dict[str, dict]:
    """Part 1: wall(1), wall(N), peak RSS per code version, best of ``repeat`` runs in alternating order."""
    codes = {"this": ROOT} | ({"ref": ref} if ref else {})
    res: dict[str, dict] = {k: {"wall1": [], "wallN": [], "rss1": [], "rssN": []} for k in codes}
    for i in range(repeat):
        for name, code in list(codes.items())[:: 1 if i % 2 == 0 else -1]:  # A B, B A, ...: load drift evens out
            for key, inputs in (("1", images[:1]), ("N", images)):
                wall, rss = run_cli(code, run, inputs, tmp / f"{name}-{key}.csv")
                res[name][f"wall{key}"].append(wall)
                res[name][f"rss{key}"].append(rss)
    return {k: {m: min(v) for m, v in r.items()} for k, r in res.items()}


def inprocess_part(run_dir: Path, images: list[Path], single: int) -> dict:
    """Part 2: load time, warm single-image latency and per-step times with this code."""
    from anomalyncd.predict import CHUNK, Predictor, load_run

    t = time.perf_counter()
    run = load_run(run_dir)
    t_run = time.perf_counter() - t
    t = time.perf_counter()
    pred = Predictor(run, "cpu")
    t_models = time.perf_counter() - t
    items = [(f"{i:04d}", p) for i, p in enumerate(images)]
    pred.merge([pred.classify(items[:1])])  # warm-up
    lat = []
    for item in items[1 : 1 + single]:
        t = time.perf_counter()
        pred.merge([pred.classify([item])])
        lat.append(time.perf_counter() - t)
    pred.timings.clear()
    t = time.perf_counter()
    parts = [pred.classify(items[s : s + CHUNK]) for s in range(0, len(items), CHUNK)]
    t0 = time.perf_counter()
    rows = pred.merge(parts)
    pred.timings["merge"] += time.perf_counter() - t0
    total = time.perf_counter() - t
    return {"load_run": t_run, "load_models": t_models, "single": statistics.median(lat), "total": total,
            "steps": dict(pred.timings), "n": len(rows), "crops": sum(len(p.areas) for p in parts),
            "normal": sum(r["status"] == "normal" for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT, help="a finished project (default: this one)")
    ap.add_argument("--mtd", type=Path, default=MTD)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--single", type=int, default=10, help="images timed one at a time")
    ap.add_argument("--repeat", type=int, default=1, help="command runs per version (best kept)")
    ap.add_argument("--ref", type=Path, default=None, help="another version's code to compare with")
    ap.add_argument("--normal-share", type=float, default=0.0, help="share of defect-free images among the N")
    ap.add_argument("--no-cli", action="store_true", help="skip part 1")
    args = ap.parse_args()
    run = args.run.resolve()
    if not 0 <= args.normal_share <= 1:
        sys.exit(f"--normal-share must be in [0, 1], got {args.normal_share}")
    source, files = pick_images(run, args.mtd, args.n, args.normal_share)
    print(f"run: {run}; {len(files)} images from {source} ({args.normal_share:.0%} defect-free); torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    with tempfile.TemporaryDirectory() as d:
        images = link_images(files, Path(d) / "images")
        # the commands first: a child's peak RSS counts its parent's at the fork, kept small here
        cli = None if args.no_cli else cli_part(run, images, args.ref, args.repeat, Path(d))
        ip = inprocess_part(run, images, args.single)
        n = len(images)
        print(f"\nin process (this code): load run {ip['load_run']:.2f} s, detector + classifier {ip['load_models']:.2f} s; "
              f"warm single image {ip['single'] * 1000:.0f} ms (median of {args.single})")
        print(f"{n} images ({ip['normal']} called normal, {ip['crops']} crops): {ip['total']:.2f} s = {ip['total'] / n * 1000:.1f} ms/image")
        for step, sec in ip["steps"].items():
            print(f"  {step:<10} {sec:7.2f} s  {sec / n * 1000:6.1f} ms/image")
        if cli is None:
            return
        print(f"\ncommand (python -m stages.predict, best of {args.repeat}):")
        print(f"{'code':<6} {'wall 1 img':>11} {'wall N':>9} {'start-up':>9} {'ms/img':>8} {'RSS MB (1/N)':>14}")
        for name, r in cli.items():
            startup = r["wall1"] - ip["single"]
            per = (r["wallN"] - r["wall1"]) / max(1, n - 1) * 1000
            r.update(startup=startup, per=per)
            print(f"{name:<6} {r['wall1']:>10.2f}s {r['wallN']:>8.2f}s {startup:>8.2f}s {per:>8.1f} "
                  f"{r['rss1']:>6.0f}/{r['rssN']:.0f}")
        if "ref" in cli:
            a, b = cli["ref"], cli["this"]
            print(f"ratios ref/this: start-up {a['startup'] / b['startup']:.2f}x, batched ms/image {a['per'] / b['per']:.2f}x, "
                  f"peak RSS (N) {a['rssN'] / b['rssN']:.2f}x")


if __name__ == "__main__":
    main()
