"""Where each stage's artifacts live, relative to the project root (the one place for paths;
``dvc.yaml`` names the same files)."""

from pathlib import Path

DEMO = Path("data/demo")
MANIFEST = Path("data/prepared/manifest.csv")
MAPS = Path("data/detect/maps.zarr.zip")
DETECTOR = Path("models/detector.pt")
CROPS = Path("data/mebin/crops.zarr.zip")
MODEL = Path("models/mgvit.pt")
NUM_CLASSES_METRICS = Path("metrics/num_classes.json")
NUM_CLASSES_PLOT = Path("plots/num_classes.json")
PROBS = Path("data/infer/probs.zarr.zip")
MERGED = Path("data/merge/merged.zarr.zip")  # what evaluate and predict read
PREDICTIONS = Path("data/merge/predictions.csv")  # the same, as a table for people
CROP_PREDICTIONS = Path("data/merge/crops.csv")
CALIBRATION = Path("models/calibration.json")  # predict's normal/defect and known/unknown thresholds
METRICS = Path("metrics")
EVALUATE_METRICS = METRICS / "evaluate.json"  # the headline figures: a DVC metric
EVALUATE_DETAIL = METRICS / "evaluate_detail.json"  # per class, cluster and category: not a DVC metric
PLOTS = Path("plots")
REPORT = Path("reports")
LOGS = Path("logs")  # run timings: git-ignored, not DVC-tracked (they differ on every run)
