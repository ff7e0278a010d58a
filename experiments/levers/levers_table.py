"""The lever tables of experiments/levers/README.md from the cells `levers.sh` wrote: one row per cell and seed, and
the mean and standard deviation over the seeds of a cell (CELL, CELL@1, CELL@2, ...).

    python experiments/levers/levers_table.py OUT_DIR [CELL ...]          # markdown rows on stdout (default: every cell)
    python experiments/levers/levers_table.py OUT_DIR --json summary.json  # also the numbers as JSON

Each cell directory holds `report.json` (opdlm-eval: static and dynamic at 0.9 / 0.5) and `opd_report.json` (the
training run: tokens and log history, for the training rollouts' tokens per step over the last logged steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from opdlm_trl.eval.report import student_system, sweep_system

THRESHOLDS = (0.9, 0.5)
AVERAGED = ("static_nll", "tpf@0.9", "nll@0.9", "tpf@0.5", "nll@0.5")


def decoding_row(results: dict, decoding: str, commit_order: str, threshold: float | None = None) -> dict:
    """opdlm-eval's result row of one student decoding in ``commit_order`` (at ``threshold`` in a sweep).

    Row names follow :mod:`opdlm_trl.eval.report` (``student_static``, ``student_dynamic@0.9`` for confidence
    order, a suffix for any other: ``student_static_left_to_right``), the same in every record whatever the
    sampler's default was when it was written."""
    name = student_system(decoding, commit_order) if threshold is None else sweep_system(threshold, commit_order)
    if name not in results:
        raise SystemExit(
            f"No {decoding} row decoded in {commit_order} order ({name}): evaluate with --commit-orders {commit_order}."
        )
    return results[name]


def evaluation_numbers(report: Path, commit_order: str = "confidence") -> dict:
    """Static and dynamic (each of THRESHOLDS) numbers of one opdlm-eval report, decoded in ``commit_order``."""
    results = json.loads(report.read_text())["results"]
    static = decoding_row(results, "static", commit_order)
    row = {"static_nll": static["teacher_nll_per_token"], "static_top1": static["top1_agreement"]}
    for threshold in THRESHOLDS:
        dynamic = decoding_row(results, "dynamic", commit_order, threshold)
        row[f"tpf@{threshold}"] = dynamic["tokens_per_forward"]
        row[f"nll@{threshold}"] = dynamic["teacher_nll_per_token"]
        row[f"top1@{threshold}"] = dynamic["top1_agreement"]
    row["confidence_offsets"] = decoding_row(results, "dynamic", commit_order, THRESHOLDS[0])["confidence_by_offset"][
        "student_mean"
    ]
    return row


def cell_row(directory: Path, tail_steps: int = 6, commit_order: str = "confidence") -> dict:
    """The numbers of one trained and evaluated cell, from the rows evaluated in ``commit_order``."""
    training = json.loads((directory / "opd_report.json").read_text())
    rollout_speed = [e["rollout/tokens_per_step"] for e in training["log_history"] if "rollout/tokens_per_step" in e]
    return {
        "cell": directory.name,
        "training_tokens": training["training_tokens"],
        **evaluation_numbers(directory / "report.json", commit_order),
        "training_tokens_per_step_tail": [min(rollout_speed[-tail_steps:]), max(rollout_speed[-tail_steps:])],
    }


def seed_dirs(out: Path, cell: str) -> list[Path]:
    """The evaluated directories of a cell: seed 0 (`CELL`) first, then `CELL@N` in seed order."""
    seeded = sorted(out.glob(f"{cell}@*"), key=lambda path: int(path.name.rsplit("@", 1)[1]))
    return [path for path in [out / cell, *seeded] if (path / "report.json").exists()]


def summarise(rows: list[dict]) -> dict:
    """Mean and (for two or more seeds) sample standard deviation of each averaged number."""
    summary = {"seeds": len(rows)}
    for key in AVERAGED:
        values = [row[key] for row in rows]
        summary[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}
    return summary


def markdown_row(row: dict) -> str:
    confidence = " / ".join(f"{value:.2f}" for value in row["confidence_offsets"])
    low, high = row["training_tokens_per_step_tail"]
    dynamic = [
        f"{row[f'tpf@{t}']:.2f} / {row[f'nll@{t}']:.3f} / {row[f'top1@{t}']:.3f}" for t in THRESHOLDS
    ]  # fmt: skip
    return (
        f"| {row['cell']} | {row['training_tokens']:,} | {row['static_nll']:.3f} / {row['static_top1']:.3f} | "
        f"{dynamic[0]} | {dynamic[1]} | {confidence} | {low:.2f}-{high:.2f} |"
    )


def markdown_summary(cell: str, summary: dict) -> str:
    def cell_text(key):
        entry = summary[key]
        return f"{entry['mean']:.3f}" + (f" ({entry['sd']:.3f})" if entry["sd"] is not None else "")

    return (
        f"| {cell}: mean (sd) of {summary['seeds']} seeds | | {cell_text('static_nll')} | "
        f"{cell_text('tpf@0.9')} / {cell_text('nll@0.9')} | {cell_text('tpf@0.5')} / {cell_text('nll@0.5')} | | |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="The OUT_DIR of experiments/levers/levers.sh.")
    parser.add_argument("cells", nargs="*", help="Cell names without @seed (default: every evaluated cell).")
    parser.add_argument("--json", type=Path, help="Also write the rows and per-cell summaries here.")
    parser.add_argument(
        "--commit-order",
        default="confidence",
        help="Which evaluation rows to read: those decoded in this commit order (opdlm-eval --commit-orders).",
    )
    args = parser.parse_args()
    cells = args.cells or sorted({path.parent.name.split("@")[0] for path in args.out.glob("*/report.json")})
    if not cells:
        raise SystemExit(f"No evaluated cell (a directory with report.json) under {args.out}.")
    document = {}
    for cell in cells:
        directories = seed_dirs(args.out, cell)
        if not directories:
            raise SystemExit(
                f"Cell {cell!r} has no evaluated directory under {args.out}: run experiments/levers/levers.sh."
            )
        rows = [cell_row(directory, commit_order=args.commit_order) for directory in directories]
        document[cell] = {"rows": rows, "summary": summarise(rows)}
        for row in rows:
            print(markdown_row(row))
        if len(rows) > 1:
            print(markdown_summary(cell, document[cell]["summary"]))
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
