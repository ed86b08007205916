"""`anomalyncd exps`: the experiments readable at 120 columns."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from stages.exps import exp_show_args

from .conftest import ROOT

#: a stage writing the pipeline's metrics files from params.yaml, with as many other metrics
#: as a real run has, so that plain `dvc exp show` is unreadable here too
FAKE_RUN = """
import json, yaml
p = yaml.safe_load(open("params.yaml"))
e, t = p["train"]["epochs"], p["merge"]["temperature"]
json.dump({"image": {"nmi": e / 10, "ari": e / 20, "f1": 0.5}, "crop": {"nmi": 0.1, "ari": 0.2, "f1": 0.3},
           "baseline": {"image": {"nmi": 0.4, "ari": 0.3, "f1": 0.6}}}, open("metrics/evaluate.json", "w"))
json.dump({"num_classes": 4, "estimate": 3, **{f"scores.k{k}": k / t for k in range(2, 11)}}, open("metrics/num_classes.json", "w"))
json.dump({f"agreement_head{h}": h / e for h in range(8)} | {"loss": e * 0.1}, open("metrics/train.json", "w"))
"""


def _run(cmd, cwd, **env):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_dvc_arguments_keep_the_headline_and_drop_what_is_not_a_param():
    args = exp_show_args(["--md"])
    assert args[0] == "--only-changed" and args[-1] == "--md"
    keep, drop = args[args.index("--keep") + 1], args[args.index("--drop") + 1]
    assert all(re.match(keep, c) for c in ("image.nmi", "metrics/evaluate.json:image.f1", "estimate", "num_classes"))
    assert not any(re.match(keep, c) for c in ("baseline.image.nmi", "train.num_classes", "agreement_head0"))
    assert all(re.match(drop, c) for c in ("loss", "aupro", "metrics/train.json:loss", "Created"))
    assert not any(re.match(drop, c) for c in ("train.epochs", "params.yaml:merge.temperature", "detect.method"))


@pytest.mark.timeout(120)
def test_exps_shows_the_changed_params_and_the_headline_metrics_within_120_columns(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "run.py").write_text(FAKE_RUN)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  run:\n    cmd: python run.py\n    deps: [run.py]\n    params: [train, merge]\n    metrics:\n"
        + "".join(f"      - metrics/{m}.json:\n          cache: false\n" for m in ("evaluate", "num_classes", "train"))
    )
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "repro", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
                [*dvc, "exp", "run", "-q", "-n", "longer", "-S", "train.epochs=5", "-S", "merge.temperature=100"]):
        _run(cmd, tmp_path)
    out = _run([sys.executable, "-m", "stages.exps", "--no-pager"], tmp_path, COLUMNS="120", PYTHONPATH=str(ROOT))
    lines = out.strip().splitlines()
    assert max(map(len, lines)) <= 120 and "…" not in out
    header = lines[1].split()
    assert header[0] == "Experiment"
    assert set(header[1:]) == {"num_classes", "estimate", "image.nmi", "image.ari", "image.f1", "train.epochs", "merge.temperature"}
    longer = dict(zip(header[1:], next(line for line in lines if "[longer]" in line).split()[-7:]))
    assert longer == {"num_classes": "4", "estimate": "3", "image.nmi": "0.5", "image.ari": "0.25", "image.f1": "0.5",
                      "train.epochs": "5", "merge.temperature": "100"}
