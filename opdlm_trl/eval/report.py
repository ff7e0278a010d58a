"""The shape of an :func:`opdlm_trl.eval.evaluate_model` report and its presentation: result-row names, the sweep
rows, the fixed-width tables ``opdlm-eval`` prints and the threshold-sweep plot.

Everything here reads a finished report (a JSON-ready dict), so a report saved by one run can be tabulated or
plotted by another; nothing here loads a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..sampling import SamplerConfig

__all__ = [
    "TEACHER_SYSTEM",
    "format_sweep",
    "format_table",
    "plot_sweep",
    "student_system",
    "sweep_rows",
    "sweep_system",
]

TEACHER_SYSTEM = "teacher_ar"  # the AR teacher's own greedy answers (one forward per token)
# Rows of this commit rule carry no suffix, whatever the sampler's default is: every record written before commit
# rules existed decoded by confidence, named its rows so and stored no ``commit_order``. Fixing the unsuffixed rule
# (rather than tying it to the default) means a change of default never renames rows or misreads old records.
UNSUFFIXED_ORDER = "confidence"


# ------------------------------------------------------------------------------------------ row names


def _order_suffix(commit_order: str) -> str:
    return "" if commit_order == UNSUFFIXED_ORDER else f"_{commit_order}"


def student_system(decoding: str, commit_order: str = SamplerConfig.commit_order) -> str:
    """Result-row name of a student decoding without a sweep (default: in the sampler's default commit rule).

    ``student_static``, ``student_dynamic`` for ``"confidence"``, and with any other commit rule its name as a
    suffix, ``student_static_left_to_right`` etc. (sweep rows: :func:`sweep_system`)."""
    return f"student_{decoding}{_order_suffix(commit_order)}"


def sweep_system(threshold: float, commit_order: str = SamplerConfig.commit_order) -> str:
    """Result-row name of dynamic decoding at ``threshold`` in a sweep (``student_dynamic@0.9`` for
    ``"confidence"``, ``student_dynamic_left_to_right@0.9`` etc. for another commit rule)."""
    return f"student_dynamic{_order_suffix(commit_order)}@{threshold:g}"


# ------------------------------------------------------------------------------------------ tables


def sweep_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per dynamic-decoding (commit order, threshold) of an :func:`opdlm_trl.eval.evaluate_model` report.

    Sorted by commit order, then threshold. Each row: ``threshold``, ``commit_order``, ``system`` and the
    row's ``tokens_per_forward``, ``teacher_nll_per_token``, ``top1_agreement``, ``pass_at_1``,
    ``tokens_per_second``, ``out_of_order_rate``, ``oracle_ceiling`` (None without an AR teacher run) and
    ``own_text_ceiling`` (the chain bound on the row's own text at its threshold; None without a teacher).
    """
    keys = ("tokens_per_forward", "teacher_nll_per_token", "top1_agreement", "pass_at_1", "tokens_per_second")
    rows = []
    for name, metrics in report["results"].items():
        if "threshold" not in metrics:
            continue
        row = {"threshold": metrics["threshold"], "commit_order": metrics.get("commit_order", UNSUFFIXED_ORDER)}
        row["system"] = name
        row.update({key: metrics.get(key) for key in keys})
        row["out_of_order_rate"] = metrics.get("out_of_order_rate")
        row["oracle_ceiling"] = metrics.get("oracle_ceiling")
        row["own_text_ceiling"] = (metrics.get("own_text_oracle_ceiling") or {}).get(f"{metrics['threshold']:g}")
        rows.append(row)
    return sorted(rows, key=lambda row: (row["commit_order"], row["threshold"]))


def _cell(value, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` decimals, None / NaN as ``-`` (not measured), anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return f"{value:.{digits}f}" if is_number else str(value)


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`evaluate_model`'s results (one row per system)."""
    header = ("system", "pass@1", "NLL/tok", "top1-agr", "tok/fwd", "out-of-order", "tokens", "tok/s")
    lines = [header]
    for name, metrics in report["results"].items():
        lines.append(
            (
                name,
                _cell(metrics["pass_at_1"]),
                _cell(metrics["teacher_nll_per_token"]),
                _cell(metrics["top1_agreement"]),
                _cell(metrics["tokens_per_forward"], 2),
                _cell(metrics.get("out_of_order_rate")),
                str(metrics["completion_tokens"]),
                _cell(metrics["tokens_per_second"], 1),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def format_sweep(report: Mapping[str, Any]) -> str:
    """Fixed-width table of the sweep (one line per commit order and threshold) with the AR teacher's row below.

    ``oracle``: the chain bound on the teacher's text; ``own-text``: the same bound on the row's own output;
    ``out-of-order``: the fraction of the row's commits made right of a still-masked position.
    """
    header = ("order", "threshold", "tok/fwd", "oracle", "own-text", "NLL/tok", "top1-agr", "out-of-order", "pass@1")
    header += ("tok/s",)
    lines = [header]
    for row in report.get("sweep", []):
        lines.append(
            (
                row.get("commit_order", UNSUFFIXED_ORDER),
                f"{row['threshold']:g}",
                _cell(row["tokens_per_forward"], 2),
                _cell(row["oracle_ceiling"], 2),
                _cell(row.get("own_text_ceiling"), 2),
                _cell(row["teacher_nll_per_token"]),
                _cell(row["top1_agreement"]),
                _cell(row.get("out_of_order_rate")),
                _cell(row["pass_at_1"]),
                _cell(row["tokens_per_second"], 1),
            )
        )
    teacher = report["results"].get(TEACHER_SYSTEM)
    if teacher is not None:
        lines.append(
            (
                TEACHER_SYSTEM,
                "-",
                _cell(teacher["tokens_per_forward"], 2),
                "-",
                "-",
                _cell(teacher["teacher_nll_per_token"]),
                _cell(teacher["top1_agreement"]),
                "-",
                _cell(teacher["pass_at_1"]),
                _cell(teacher["tokens_per_second"], 1),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


# ------------------------------------------------------------------------------------------ plot


def plot_sweep(report: Mapping[str, Any], path: str) -> str:
    """PNG of quality (teacher NLL, top-1 agreement) vs tokens per forward: student sweep, oracle, AR teacher.

    The oracle points sit at the teacher's own quality (its greedy text: its NLL, agreement 1.0) and
    the chain-bound tokens per forward of each threshold; the AR teacher is the point at 1.0 token per
    forward. Needs matplotlib (the ``eval`` extra); uses the Agg backend (no display).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_sweep needs matplotlib: pip install 'opdlm-trl[eval]'.") from error
    rows = report.get("sweep") or sweep_rows(report)
    if not rows:
        raise ValueError("The report has no dynamic-decoding rows to plot; run with decodings including 'dynamic'.")
    teacher = report["results"].get(TEACHER_SYSTEM)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("teacher_nll_per_token", "teacher NLL / token (lower is better)"),
        ("top1_agreement", "top-1 agreement"),
    )
    for axis, (key, label) in zip(axes, panels, strict=True):
        for order in dict.fromkeys(r.get("commit_order", UNSUFFIXED_ORDER) for r in rows):
            points = [
                (r["tokens_per_forward"], r[key], r["threshold"])
                for r in rows
                if r[key] is not None and r.get("commit_order", UNSUFFIXED_ORDER) == order
            ]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"student (dynamic, {order})")
                for x, y, threshold in points:
                    axis.annotate(f"{threshold:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if teacher is not None and teacher.get(key) is not None:
            axis.plot([1.0], [teacher[key]], "k*", markersize=12, label="AR teacher")
            oracle = {r["threshold"]: r["oracle_ceiling"] for r in rows if r["oracle_ceiling"] is not None}
            oracle = [(value, threshold) for threshold, value in oracle.items()]
            if oracle:
                axis.plot([o[0] for o in oracle], [teacher[key]] * len(oracle), "s--", color="gray",
                          label="oracle ceiling (chain bound)")  # fmt: skip
                for x, threshold in oracle:
                    axis.annotate(f"{threshold:g}", (x, teacher[key]), textcoords="offset points", xytext=(4, -10),
                                  fontsize=8, color="gray")  # fmt: skip
        axis.set_xlabel("tokens per forward")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"threshold sweep, block {report['settings'].get('block_size')}, {report['num_prompts']} prompts")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
