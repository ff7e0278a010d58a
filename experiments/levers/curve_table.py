"""The quality-and-parallelism curve of one levers.sh cell trained with CURVE_EVERY (issue 20's long runs), and
whether its quality holds: every checkpoint's static teacher NLL within TOLERANCE of the best earlier one.

    python experiments/levers/curve_table.py OUT_DIR/CELL [--commit-order left_to_right] [--json curve.json]
        [--plot curve.png]    # both decoding orders against rollout tokens: quality left, tokens per forward right

Points: CELL/curve/stepN.json (each evaluated checkpoint) and CELL/report.json (the final model, once trained).
Rollout tokens at each step come from the run's log history (opd_report.json once trained, else the newest
checkpoint's trainer_state.json), which a continued run carries over from the run it continued.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from levers_table import THRESHOLDS, evaluation_numbers

from opdlm_trl.eval.report import TEACHER_SYSTEM
from opdlm_trl.sampling import COMMIT_RULES

TOLERANCE = 0.05  # issue 20: "each checkpoint within 0.05 of the best earlier one"


def log_history(cell: Path) -> list[dict]:
    """The run's logged steps: the final report once trained, else the newest checkpoint's trainer state."""
    if (cell / "opd_report.json").exists():
        return json.loads((cell / "opd_report.json").read_text())["log_history"]
    states = sorted(cell.glob("checkpoint-*/trainer_state.json"), key=lambda path: int(path.parent.name.split("-")[1]))
    if not states:
        raise SystemExit(f"{cell} has neither opd_report.json nor a checkpoint's trainer_state.json.")
    return json.loads(states[-1].read_text())["log_history"]


def points(cell: Path) -> list[tuple[int, Path]]:
    """(step, report) of every evaluated checkpoint and of the final model, in step order."""
    found = [(int(path.stem.removeprefix("step")), path) for path in (cell / "curve").glob("step*.json")]
    if (cell / "report.json").exists():
        found.append((max(entry["step"] for entry in log_history(cell) if "step" in entry), cell / "report.json"))
    if not found:
        raise SystemExit(f"{cell} has no evaluated point: run levers.sh with CURVE_EVERY (or EVAL_ONLY=1).")
    return sorted(found)


def curve(cell: Path, commit_order: str = "confidence") -> list[dict]:
    """One row per evaluated step, with the best earlier static NLL and whether this step stays within TOLERANCE."""
    tokens = {entry["step"]: entry["training_tokens"] for entry in log_history(cell) if "training_tokens" in entry}
    rows, best = [], None
    for step, report in points(cell):
        row = {"step": step, "training_tokens": tokens.get(step), **evaluation_numbers(report, commit_order)}
        row["best_earlier_static_nll"] = best
        row["holds"] = best is None or row["static_nll"] <= best + TOLERANCE
        best = row["static_nll"] if best is None else min(best, row["static_nll"])
        rows.append(row)
    return rows


def markdown_row(row: dict) -> str:
    tokens = "?" if row["training_tokens"] is None else f"{row['training_tokens']:,.0f}"
    dynamic = " | ".join(f"{row[f'tpf@{t}']:.2f} / {row[f'nll@{t}']:.3f}" for t in THRESHOLDS)
    best = "-" if row["best_earlier_static_nll"] is None else f"{row['best_earlier_static_nll']:.3f}"
    return (
        f"| {row['step']} | {tokens} | {row['static_nll']:.3f} | {dynamic} | {best} | "
        f"{'yes' if row['holds'] else 'no'} |"
    )


def plot(cell: Path, out: Path, orders: list[str]) -> None:
    """Static NLL and tokens per forward against rollout tokens, decoded in each of ``orders``: whether quality holds
    while parallelism grows is read off one figure (the two panels share the x axis)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (quality, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for order, style in zip(orders, itertools.cycle(("o-", "s--", "^:", "v-.")), strict=False):
        rows = [row for row in curve(cell, order) if row["training_tokens"] is not None]
        tokens = [row["training_tokens"] for row in rows]
        quality.plot(tokens, [row["static_nll"] for row in rows], style, label=f"decoded {order}")
        for threshold in THRESHOLDS:
            speed.plot(tokens, [row[f"tpf@{threshold}"] for row in rows], style, label=f"{order}, {threshold:g}")
    teacher = json.loads(points(cell)[-1][1].read_text())["results"].get(TEACHER_SYSTEM)
    if teacher is not None:
        quality.axhline(teacher["teacher_nll_per_token"], color="black", linestyle=":", label="the teacher's own text")
    quality.set_ylabel("teacher NLL / token of static decoding (lower is better)")
    speed.set_ylabel("tokens per forward (dynamic, at each threshold)")
    for axis in (quality, speed):
        axis.set_xlabel("rollout tokens trained on")
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda tokens, _: f"{tokens / 1000:g}k"))
        axis.legend(fontsize=8)
    figure.suptitle(f"{cell.name}: quality and parallelism as training goes on", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cell", type=Path, help="A cell directory of experiments/levers/levers.sh (OUT_DIR/CELL).")
    parser.add_argument("--commit-order", default="confidence", help="Read the rows decoded in this commit order.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    parser.add_argument("--plot", type=Path, help="Also draw the curve, decoded in each of --plot-orders, as a PNG.")
    parser.add_argument("--plot-orders", nargs="+", default=list(COMMIT_RULES), help="The commit orders drawn.")
    args = parser.parse_args()
    rows = curve(args.cell, args.commit_order)
    thresholds = " | ".join(f"{t:g}: tok/fwd / NLL" for t in THRESHOLDS)
    print(f"| step | rollout tokens | static NLL | {thresholds} | best earlier static | holds (+{TOLERANCE:g}) |")
    print("|" + "---|" * (5 + len(THRESHOLDS)))
    for row in rows:
        print(markdown_row(row))
    drifted = [row for row in rows if not row["holds"]]
    print(
        f"\nquality holds at every step ({args.commit_order})"
        if not drifted
        else f"\nquality drifts ({args.commit_order}): first at step {drifted[0]['step']} "
        f"({drifted[0]['static_nll']:.3f} against {drifted[0]['best_earlier_static_nll']:.3f} earlier)"
    )
    if args.json:
        args.json.write_text(json.dumps({"commit_order": args.commit_order, "rows": rows}, indent=2))
    if args.plot:
        plot(args.cell, args.plot, args.plot_orders)


if __name__ == "__main__":
    main()
