"""The demo pipeline on CUDA against the same pipeline on the CPU, with per-stage timings.

    python -m benchmarks.gpu_check                 # the default demo (a few minutes on a GPU machine)
    python -m benchmarks.gpu_check --tiny          # a smaller demo (about a minute)

Copies the project twice (``--workdir``, default a temporary folder), sets ``detect.device``,
``train.device`` and ``infer.device`` to ``cpu`` in one copy and ``cuda`` in the other, runs
every stage (``python -m stages.<name>``, timed) in each, and compares the runs with
:func:`anomalyncd.compare.compare_runs`: the uint8 anomaly maps may differ by ``--tolerance``
grey levels (default 2: a GPU's convolutions and matmuls differ from the CPU's in the last
bits), and the image clusters must be the same partition. With several GPUs a third copy runs
``detect``, ``mebin``, ``train`` and ``infer`` under ``torchrun --standalone
--nproc_per_node=<GPUs>`` and is compared with the CPU run too.

A further copy runs on the second device with ``detect.mixed_precision: true`` (the backbone in
half precision, :func:`anomalyncd.device.autocast`) and must give the CPU run's image clusters,
its maps within ``--mixed-tolerance`` grey levels (default 16: half precision moves a map by
more than a GPU's float32 does; docs/detect.md).

Without CUDA it prints one ``skipped:`` line saying why and exits with 0. Exit status 1 when a
comparison fails. ``--against cpu`` runs the check itself on a machine without a GPU (both
copies on the CPU). The comparison itself is tested on the CPU (``tests/test_compare.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ["anomalyncd", "stages", "dvc.yaml", "params.yaml", ".dvcignore", "pyproject.toml"]
STAGES = ["demo", "prepare", "detect", "mebin", "train", "infer", "merge", "evaluate"]
DISTRIBUTED = {"detect", "mebin", "train", "infer"}  # the stages that spread over torchrun's processes
MIXED_TOLERANCE = 16  # grey levels: the maps of a half-precision backbone against float32's (docs/detect.md)
TINY = {
    "demo": {"image_size": 64, "n_train": 8, "n_test_normal": 2, "n_per_type": 6},
    "detect": {"map_size": 64, "image_size": 64},
    "mebin": {"crop_size": 36},
    "train": {"image_size": 32, "epochs": 2, "batch_size": 16},
}


def skip_reason() -> str | None:
    """Why this machine cannot run the check (None if it can)."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def make_copy(dest: Path, device: str, overrides: dict[str, dict]) -> Path:
    """The project copied to ``dest`` with every ``device`` param set to ``device``."""
    import yaml

    for name in COPY:
        src, dst = ROOT / name, dest / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    for section in ("detect", "train", "infer"):
        params[section]["device"] = device
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def run_stages(project: Path, nproc: int = 1) -> dict[str, float]:
    """Run every stage in ``project`` in order; wall seconds per stage. ``nproc`` > 1: the
    distributed stages under torchrun with that many processes."""
    times = {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", f"stages.{stage}"]
        if nproc > 1 and stage in DISTRIBUTED:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   f"stages.{stage}"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=project, env=dict(os.environ, PYTHONPATH=str(project)), capture_output=True, text=True)
        times[stage] = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"gpu_check: {' '.join(cmd)} failed in {project} ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a smaller demo")
    ap.add_argument("--tolerance", type=int, default=None, help="grey levels the uint8 maps may differ by (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="an empty folder for the copies (kept; default: a temporary one)")
    ap.add_argument("--against", default="cuda", help="the second copy's device (cpu: try the check itself without a GPU)")
    ap.add_argument("--mixed-tolerance", type=int, default=MIXED_TOLERANCE,
                    help="grey levels the maps of the mixed-precision copy may differ by (default %(default)s)")
    args = ap.parse_args()
    reason = skip_reason() if args.against.startswith("cuda") else None
    if reason:
        print(f"gpu_check: skipped: {reason}")
        return
    import torch

    from anomalyncd.compare import MAP_TOLERANCE, compare_runs

    tol = MAP_TOLERANCE if args.tolerance is None else args.tolerance
    gpus = torch.cuda.device_count()
    overrides = TINY if args.tiny else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        other = args.against if args.against != "cpu" else "cpu again"
        mixed = {**overrides, "detect": {**overrides.get("detect", {}), "mixed_precision": True}}
        # name: (project, processes, the map tolerance against the CPU run)
        runs = {"cpu": (make_copy(work / "cpu", "cpu", overrides), 1, tol),
                other: (make_copy(work / "other", args.against, overrides), 1, tol),
                f"{args.against} mixed": (make_copy(work / "mixed", args.against, mixed), 1, args.mixed_tolerance)}
        if gpus > 1 and args.against.startswith("cuda"):
            runs[f"cuda x{gpus}"] = (make_copy(work / "ddp", "cuda", overrides), gpus, tol)
        device = f"{torch.cuda.get_device_name(0)} x{gpus}" if gpus else "no GPU"
        print(f"gpu_check: {device}, torch {torch.__version__}; projects in {work}")
        times = {name: run_stages(proj, n) for name, (proj, n, _) in runs.items()}
        print(f"\n{'stage':<10}" + "".join(f"{name:>12}" for name in times))
        for stage in STAGES:
            print(f"{stage:<10}" + "".join(f"{t[stage]:>11.1f}s" for t in times.values()))
        print(f"{'total':<10}" + "".join(f"{sum(t.values()):>11.1f}s" for t in times.values()))
        failed = False
        for name, (proj, _, tolerance) in list(runs.items())[1:]:
            c = compare_runs(runs["cpu"][0], proj, tolerance)
            print(f"\n{name} vs cpu: {c.summary()}: {'OK' if c.ok else 'FAILED'}")
            failed |= not c.ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
