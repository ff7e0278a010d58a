"""Parallelism as a function of training tokens, from a run's own log: the curve a long OPD run is for.

Reads ``trainer_state.json`` (the ``log_history`` every checkpoint and the final save carry) of an ``OPDTrainer`` run
and writes, against cumulative training tokens: the rollouts' tokens per denoising step (the student's parallelism
while it trains: temperature and threshold as configured), the agreement with the teacher at supervised positions,
and the student's vs the teacher's confidence at frontier offsets 0..3 (``confidence/*`` metrics). A moving average
over ``--window`` logged steps smooths the per-step noise of small batches.

    python benchmarks/training_curve.py RUN_DIR_OR_CHECKPOINT --out-dir curve/   # curve.json + curve.png
    python benchmarks/training_curve.py --smoke --out-dir /tmp/curve              # synthetic log (CI)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SERIES = (
    "rollout/tokens_per_step",
    "agreement",
    "confidence/student_offset0",
    "confidence/student_offset1",
    "confidence/student_offset2",
    "confidence/student_offset3",
    "confidence/teacher_offset1",
)


def load_log(path: str | Path) -> list[dict]:
    """The training entries of ``log_history`` (those with a loss), from a run dir, a checkpoint or the file."""
    path = Path(path)
    if path.is_dir():
        states = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
        path = path / "trainer_state.json" if (path / "trainer_state.json").exists() else (states or [None])[-1]
    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"No trainer_state.json under {path}: pass a run directory or a checkpoint.")
    history = json.loads(Path(path).read_text())["log_history"]
    return [entry for entry in history if "loss" in entry and "training_tokens" in entry]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN where none)."""
    out = []
    for index in range(len(values)):
        recent = [v for v in values[max(0, index - window + 1) : index + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def curve(entries: list[dict], window: int) -> dict:
    """Training tokens and each series (raw and smoothed)."""
    tokens = [float(entry["training_tokens"]) for entry in entries]
    series = {}
    for name in SERIES:
        raw = [float(entry.get(name, math.nan)) for entry in entries]
        if any(math.isfinite(v) for v in raw):
            series[name] = {"raw": raw, "smoothed": moving_average(raw, window)}
    return {"training_tokens": tokens, "steps": [int(e.get("step", i + 1)) for i, e in enumerate(entries)],
            "window": window, "series": series}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    tokens = result["training_tokens"]
    speed = result["series"].get("rollout/tokens_per_step")
    if speed:
        top.plot(tokens, speed["raw"], alpha=0.3, color="C0")
        top.plot(tokens, speed["smoothed"], color="C0", label="rollout tokens / step (training rollouts)")
    top.set_ylabel("tokens per denoising step")
    top.legend(loc="upper left")
    for offset in range(4):
        name = f"confidence/student_offset{offset}"
        if name in result["series"]:
            bottom.plot(tokens, result["series"][name]["smoothed"], label=f"student top-1 p, offset {offset}")
    if "confidence/teacher_offset1" in result["series"]:
        bottom.plot(tokens, result["series"]["confidence/teacher_offset1"]["smoothed"], "k--",
                    label="teacher max p, offset 1")  # fmt: skip
    bottom.set_xlabel("training tokens (cumulative rollout tokens)")
    bottom.set_ylabel(f"confidence (mean of {result['window']} logs)")
    bottom.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _smoke_log(directory: Path) -> Path:
    """A synthetic trainer_state.json shaped like an OPD run's (what CI can afford)."""
    history = [
        {"loss": 1.0 / (step + 1), "step": step + 1, "training_tokens": 400 * (step + 1),
         "rollout/tokens_per_step": 1.0 + 0.01 * step, "agreement": 0.4 + 0.01 * step,
         **{f"confidence/student_offset{d}": 0.5 / (d + 1) + 0.01 * step for d in range(4)},
         "confidence/teacher_offset1": 0.8}
        for step in range(12)
    ]  # fmt: skip
    path = directory / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history}))
    return directory


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="run directory, checkpoint directory or trainer_state.json")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--window", type=int, default=10, help="moving-average window in logged steps")
    parser.add_argument("--smoke", action="store_true", help="a synthetic log instead of a run")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.run = _smoke_log(out_dir)
    elif not args.run:
        parser.error("give a run directory (or --smoke).")
    result = curve(load_log(args.run), args.window)
    (out_dir / "curve.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / "curve.png")
    last = {name: values["smoothed"][-1] for name, values in result["series"].items()}
    print(json.dumps({"training_tokens": result["training_tokens"][-1], "last_smoothed": last}, indent=2))
    return result


if __name__ == "__main__":
    main()
