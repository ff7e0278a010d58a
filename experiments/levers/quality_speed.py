"""Quality-speed curves of lever cells: teacher NLL of the student's text against tokens per forward, one curve per
(cell, decoding commit order), each point the mean over the cell's seeds (issue 20 asks for these per rule).

    python experiments/levers/quality_speed.py --out figures/commit_order60_quality_speed.png \
        --cell confidence=figures/commit_order60_plain.json,figures/commit_order60_plain_seed1.json,... \
        --cell left_to_right=figures/commit_order60_left_to_right.json,...

A record is an opdlm-eval report (a cell's report.json, or its copy in figures/). The points of a curve are static
decoding (one token a step) and dynamic decoding at each threshold of levers.sh's sweep (levers_table.THRESHOLDS);
every seed's own point is drawn faintly behind the mean. The means are also written as JSON beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from levers_table import THRESHOLDS, decoding_row

ORDERS = ("confidence", "left_to_right")


def curve_points(report: dict, commit_order: str) -> list[tuple[float, float]]:
    """(tokens per forward, teacher NLL) of static decoding and each dynamic threshold, in ``commit_order``."""
    results = report["results"]
    rows = [decoding_row(results, "static", commit_order)]
    rows += [decoding_row(results, "dynamic", commit_order, threshold) for threshold in THRESHOLDS]
    return [(row["tokens_per_forward"], row["teacher_nll_per_token"]) for row in rows]


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The seeds' curves averaged point by point (every curve has the same points: static, then each threshold)."""
    return [
        tuple(statistics.fmean(values) for values in zip(*points, strict=True)) for points in zip(*curves, strict=True)
    ]


def parse_cell(text: str) -> tuple[str, list[Path]]:
    name, sep, records = text.partition("=")
    if not sep or not name or not records:
        raise argparse.ArgumentTypeError(f"--cell expects NAME=RECORD[,RECORD...], got {text!r}.")
    return name, [Path(record) for record in records.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the PNG; the means go to the same name .json")
    parser.add_argument("--cell", type=parse_cell, action="append", required=True, help="NAME=RECORD[,RECORD...]")
    parser.add_argument("--teacher-nll", type=float, default=None, help="drawn as a horizontal reference line")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    means = {}
    for name, records in args.cell:
        reports = [json.loads(record.read_text()) for record in records]
        for order in ORDERS:
            curves = [curve_points(report, order) for report in reports]
            mean = mean_curve(curves)
            means[f"{name} / decoded {order}"] = {"seeds": len(curves), "points": mean}
            (line,) = axis.plot(*zip(*mean, strict=True), "o-" if order == "left_to_right" else "s--",
                                label=f"rollouts {name}, decoded {order}")  # fmt: skip
            for curve in curves:
                axis.plot(*zip(*curve, strict=True), ".", color=line.get_color(), alpha=0.3)
    if args.teacher_nll is not None:
        axis.axhline(args.teacher_nll, color="black", linestyle=":", label="teacher's own greedy text")
    axis.set_xlabel("tokens per forward (static; dynamic at " + ", ".join(f"{t:g}" for t in THRESHOLDS) + ")")
    axis.set_ylabel("teacher NLL / token (lower is better)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps({"thresholds": THRESHOLDS, "curves": means}, indent=1))
    for name, curve in means.items():
        print(f"{name:45s} " + "  ".join(f"{tpf:.2f} / {nll:.3f}" for tpf, nll in curve["points"]))


if __name__ == "__main__":
    main()
