"""Is one evaluation record's teacher NLL really higher than another's, or did other prompts go well? A paired test.

    python experiments/levers/paired_nll.py BASE.json OTHER.json [OTHER.json ...] [--system NAME] [--rescore]

Each record is an opdlm-eval report of the same prompts (a levers.sh cell's report.json or curve/stepN.json). The
records' pooled NLLs differ by their models *and* by which prompts each model happened to answer well; comparing
prompt by prompt removes the second. For each OTHER this prints the pooled teacher NLL per token of both, their
difference, a bootstrap 95% interval of that difference over prompts (the prompts are resampled jointly, so each
prompt is compared with itself), and on how many prompts OTHER is worse.

Per-prompt scores come from the records (``samples[i]["teacher_scores"]``, written by opdlm-eval since session
11). ``--rescore`` computes them for older records: the embedded teacher (the package's LocalTeacher, as in
opdlm-eval) scores each saved text, re-tokenised, after exactly the prompt it answered
(:func:`opdlm_trl.eval.evaluation_prompts`). Re-tokenising may differ from the
ids the student wrote (a stop token, a non-canonical split), so the pooled value it gives is printed beside the
record's own: trust the test where they agree.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from opdlm_trl.eval.report import student_system

BOOTSTRAP_SAMPLES = 10_000


def recorded_scores(report: dict, system: str) -> list[tuple[float, int]]:
    """(NLL sum, tokens) of each prompt's text, as opdlm-eval recorded them."""
    try:
        return [
            (s["teacher_scores"][system]["nll_sum"], s["teacher_scores"][system]["tokens"]) for s in report["samples"]
        ]
    except KeyError:
        raise SystemExit(f"This record has no per-prompt teacher scores of {system}: pass --rescore.") from None


def rescored(report: dict, system: str, scorer) -> list[tuple[float, int]]:
    """(NLL sum, tokens) of each prompt's saved text, scored again by ``scorer`` after the prompt it answered."""
    return [scorer(index, sample["outputs"][system]) for index, sample in enumerate(report["samples"])]


def teacher_scorer(settings: dict):
    """A function (prompt index, text) -> (NLL sum, tokens) under the embedded teacher, on the record's prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdlm_trl.data import default_model_dir
    from opdlm_trl.eval import EvalSettings, evaluation_prompts, score_with_teacher
    from opdlm_trl.teachers import LocalTeacher

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    options = ("dataset", "split", "limit", "chat_template_kwargs")
    _, prompts = evaluation_prompts(EvalSettings(**{key: settings[key] for key in options}), tokenizer)

    teacher = LocalTeacher(model)

    def score(index: int, text: str) -> tuple[float, int]:
        completion = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not completion:
            return 0.0, 0
        prompt, completion = torch.tensor([prompts[index]]), torch.tensor([completion])
        scores = score_with_teacher(teacher, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))
        return scores["nll_sum"], scores["tokens"]

    return score


def pooled(scores: list[tuple[float, int]], indices) -> float:
    return sum(scores[i][0] for i in indices) / sum(scores[i][1] for i in indices)


def paired(base: list[tuple[float, int]], other: list[tuple[float, int]], seed: int = 0) -> dict:
    """Pooled NLLs, their difference and its bootstrap 95% interval over jointly resampled prompts."""
    if len(base) != len(other):
        raise SystemExit(f"The records answer different prompt sets ({len(base)} vs {len(other)} prompts).")
    everything = range(len(base))
    generator = random.Random(seed)
    differences = sorted(
        pooled(other, draw) - pooled(base, draw)
        for draw in ([generator.randrange(len(base)) for _ in everything] for _ in range(BOOTSTRAP_SAMPLES))
    )
    per_prompt = [o[0] / max(o[1], 1) - b[0] / max(b[1], 1) for b, o in zip(base, other, strict=True)]
    return {
        "base_nll": pooled(base, everything),
        "other_nll": pooled(other, everything),
        "difference": pooled(other, everything) - pooled(base, everything),
        "interval95": [differences[int(0.025 * BOOTSTRAP_SAMPLES)], differences[int(0.975 * BOOTSTRAP_SAMPLES) - 1]],
        "prompts_worse": sum(d > 0 for d in per_prompt),
        "prompts": len(per_prompt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--system", default=student_system("static", "left_to_right"), help="the compared row")
    parser.add_argument("--rescore", action="store_true", help="score the saved texts again (older records)")
    parser.add_argument("--json", type=Path, help="also write the comparisons here")
    args = parser.parse_args()
    reports = {path: json.loads(path.read_text()) for path in [args.base, *args.others]}
    scorer = teacher_scorer(reports[args.base]["settings"]) if args.rescore else None
    scores = {}
    for path, report in reports.items():
        if not report.get("samples"):
            raise SystemExit(f"{path} kept no samples: evaluate with samples kept (opdlm-eval's default).")
        scores[path] = rescored(report, args.system, scorer) if scorer else recorded_scores(report, args.system)
        if scorer:
            recorded = report["results"][args.system]["teacher_nll_per_token"]
            print(f"{path}: re-scored {pooled(scores[path], range(len(scores[path]))):.3f}, recorded {recorded:.3f}")
    comparisons = []
    for path in args.others:
        result = {
            "base": str(args.base),
            "other": str(path),
            "system": args.system,
            **paired(scores[args.base], scores[path]),
        }
        comparisons.append(result)
        low, high = result["interval95"]
        print(
            f"{path}: {result['other_nll']:.3f} vs {result['base_nll']:.3f}: {result['difference']:+.3f} "
            f"(95% [{low:+.3f}, {high:+.3f}]), worse on {result['prompts_worse']} of {result['prompts']} prompts"
        )
    if args.json:
        args.json.write_text(json.dumps(comparisons, indent=2))


if __name__ == "__main__":
    main()
