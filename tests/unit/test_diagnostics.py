"""Parallel-decoding diagnostics: the chain-bound oracle, confidence by frontier offset, the threshold sweep."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from opdlm_trl.diagnostics import (
    OffsetConfidence,
    OracleCeiling,
    chain_bound_steps,
    offset_confidence_metrics,
    offset_confidence_sums,
    oracle_ceiling,
    out_of_order_commits,
    top1_probability,
)
from opdlm_trl.eval import evaluate_model
from opdlm_trl.eval.cli import main as eval_main
from opdlm_trl.masks import frontier_offsets
from opdlm_trl.modeling import to_diffusion
from opdlm_trl.sampling import StepRecord
from tests.helpers import eval_loss, fixed_batch, make_trainer, roll_out

# ------------------------------------------------------------------ oracle ceiling (chain bound)

# block 4: [0.95 0.95 0.5 0.99 | 0.99 x4 | 0.3 0.97 <end> <end>]
PROBS = [0.95, 0.95, 0.5, 0.99, 0.99, 0.99, 0.99, 0.99, 0.3, 0.97, 1.0, 1.0]
MASK = [1] * 10 + [0, 0]


def _chain_case():
    return torch.tensor([PROBS]).log(), torch.tensor([MASK])


@pytest.mark.parametrize(
    ("block_size", "threshold", "steps"),
    [
        # 0.9: {0.95, 0.9025} | 0.5 alone (0.5 * 0.99 < 0.9) | 0.99   ;  0.99^4 = 0.961  ;  0.3 | 0.97
        (4, 0.9, [3, 1, 2]),
        # 0.45: 0.95 * 0.95 * 0.5 = 0.451 reaches it, * 0.99 = 0.447 does not
        (4, 0.45, [2, 1, 2]),
        (4, 0.0, [1, 1, 1]),  # everything at once; the padding after the stop costs nothing
        (4, 1.0, [4, 4, 2]),  # nothing below certainty is ever committed beside the frontier
        # one block: {0.95, 0.95} | 0.5 | 0.99 x5 (0.951) | 0.3 | 0.97
        (None, 0.9, [5]),
    ],
)
def test_chain_bound_steps_by_hand(block_size, threshold, steps):
    token_logprobs, mask = _chain_case()
    assert chain_bound_steps(token_logprobs, mask, block_size, threshold)[0].tolist() == steps
    assert oracle_ceiling(token_logprobs, mask, block_size, threshold) == pytest.approx(10 / sum(steps))


def test_oracle_ceiling_pools_batches_and_falls_with_the_threshold():
    token_logprobs, mask = _chain_case()
    tally = OracleCeiling([4, None], [0.9, 0.45, 0.0])
    tally.add(token_logprobs, mask)
    tally.add(token_logprobs[:, :4], mask[:, :4])  # a second batch: the first block again (3 steps at 0.9)
    assert tally.tokens == 14
    assert tally.ceiling(4, 0.9) == pytest.approx(14 / (6 + 3))
    ceilings = [tally.ceiling(4, threshold) for threshold in (0.0, 0.45, 0.9)]
    assert ceilings == sorted(ceilings, reverse=True)  # a lower threshold never needs more steps
    table = tally.as_dict()
    assert table["by_block"]["4"]["0.9"] == pytest.approx(14 / 9) and "conservative" in table["note"]
    with pytest.raises(ValueError, match="threshold"):
        chain_bound_steps(token_logprobs, mask, 4, 1.5)
    with pytest.raises(ValueError, match="block_size"):
        chain_bound_steps(token_logprobs, mask, 0, 0.9)
    with pytest.raises(ValueError, match="same"):
        chain_bound_steps(token_logprobs, mask[:, :3], 4, 0.9)


# ------------------------------------------------------------------ confidence by frontier offset


def test_out_of_order_commits_by_hand():
    # block 4; row 0: [0 1 2 3 | 0 0 1 1] in order; row 1: [1 0 2 3 | 2 0 0 1]: position 1 (step 0, left one masked
    # until step 1), and in block 2 positions 5, 6 and 7 (position 4 still masked until step 2): 4 out of order
    step_map = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 1], [1, 0, 2, 3, 2, 0, 0, 1]])
    everything = torch.ones_like(step_map)
    assert out_of_order_commits(step_map, everything, 4) == (4, 16)
    # a never-committed position (-1, after a stop) is masked forever: a commit right of it is out of order, and
    # only the counted positions count (the real tokens through the stop)
    stopped = torch.tensor([[0, 1, -1, 2, -1, -1, -1, -1]])
    assert out_of_order_commits(stopped, torch.ones_like(stopped), 4) == (1, 3)
    assert out_of_order_commits(stopped, torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]), 4) == (0, 2)
    with pytest.raises(ValueError, match="multiple of block_size"):
        out_of_order_commits(step_map[:, :6], everything[:, :6], 4)


def test_frontier_offsets_count_from_each_blocks_first_masked_position():
    masked = torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]]).bool()
    assert frontier_offsets(masked, 4).tolist() == [[-1, 0, -1, 2, 0, 1, 2, 3, -1, -1, -1, -1, -1, -1, 0]]
    assert frontier_offsets(masked, None)[0, -1].item() == 13  # one block: counted from position 1


MASK_ID = 7


def _logits(probs: list[float]) -> torch.Tensor:
    """Logits over 8 ids whose softmax without id 7 (the mask id, the largest logit) is ``[p, (1-p)/6 x6]``."""
    rows = [[math.log(p)] + [math.log((1 - p) / 6)] * 6 + [5.0] for p in probs]
    return torch.tensor(rows)


def test_offset_confidence_on_a_hand_built_trajectory():
    # one block of 4: position 1 committed at step 0, positions 0 and 3 at step 1, position 2 at step 2
    rollout = SimpleNamespace(
        block_size=4, step_map=torch.tensor([[1, 0, 2, 1]]), completion_mask=torch.tensor([[1, 1, 1, 1]])
    )
    student = {0: [0.91, 0.82, 0.73, 0.64], 1: [0.55, 0.99, 0.45, 0.35], 2: [0.99, 0.99, 0.25, 0.99]}
    records = [StepRecord(0, step, torch.tensor([0]), _logits(p).unsqueeze(0)) for step, p in student.items()]
    teacher = torch.tensor([[0.95, 0.85, 0.75, 0.65]])
    settings = SimpleNamespace(mask_token_id=MASK_ID, teacher_vocab_size=8)
    tally = OffsetConfidence()
    tally.add_records(records, rollout, teacher, settings)
    summary = tally.summary()
    # step 0: offsets 0..3 at positions 0..3; step 1: masked {0, 2, 3} -> offsets 0, 2, 3; step 2: {2} -> 0
    assert summary["count"] == [3, 1, 2, 2]
    assert summary["student_mean"] == pytest.approx(
        [(0.91 + 0.55 + 0.25) / 3, 0.82, (0.73 + 0.45) / 2, (0.64 + 0.35) / 2]
    )
    assert summary["teacher_mean"] == pytest.approx([(0.95 + 0.95 + 0.75) / 3, 0.85, 0.75, 0.65])
    assert summary["student_hist"][0] == [0, 0, 1, 0, 0, 1, 0, 0, 0, 1]  # 0.25, 0.55, 0.91
    assert summary["teacher_hist"][3] == [0] * 6 + [2, 0, 0, 0]
    assert summary["bins"][0] == 0.0 and summary["bins"][-1] == 1.0 and len(summary["bins"]) == 11

    # a position past the stop (completion_mask 0) has no teacher target and is left out
    rollout.completion_mask = torch.tensor([[1, 1, 1, 0]])
    short = OffsetConfidence()
    short.add_records(records, rollout, teacher, settings)
    assert short.summary()["count"] == [3, 1, 2, 0] and short.summary()["student_mean"][3] is None


def test_training_metric_sums_follow_the_loss_mask_order():
    loss_mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 0]]).bool()
    offsets = frontier_offsets(loss_mask, 4)[loss_mask]
    assert offsets.tolist() == [0, 1, 3, 0, 1]
    student = top1_probability(_logits([0.9, 0.6, 0.3, 0.7, 0.8]), mask_token_id=MASK_ID)
    chunked = top1_probability(_logits([0.9, 0.6, 0.3, 0.7, 0.8]), mask_token_id=MASK_ID, chunk_rows=2)
    assert chunked.tolist() == pytest.approx([0.9, 0.6, 0.3, 0.7, 0.8]) and torch.equal(chunked, student)
    sums = offset_confidence_sums(student, torch.tensor([1.0, 0.5, 0.5, 0.8, 0.6]), offsets)
    metrics = offset_confidence_metrics(sums)
    assert metrics["confidence/student_offset0"] == pytest.approx(0.8)
    assert metrics["confidence/student_offset1"] == pytest.approx(0.7)
    assert metrics["confidence/teacher_offset3"] == pytest.approx(0.5)
    assert "confidence/student_offset2" not in metrics  # no position there: no number
    no_teacher = offset_confidence_metrics(offset_confidence_sums(student, None, offsets))
    assert not any(name.startswith("confidence/teacher") for name in no_teacher)


def test_trainer_logs_confidence_by_offset(tmp_path):
    trainer = make_trainer(tmp_path, max_completion_length=8)
    rollout, _ = roll_out(trainer, seed=1)
    batch, _ = fixed_batch(trainer, rollout, top_k=4)
    eval_loss(trainer, batch)
    logged = trainer._metrics["eval"]
    assert {"confidence/student_offset0", "confidence/teacher_offset0"} <= set(logged)
    # the logged student value is the mean top-1 probability at the frontier positions of this batch
    with torch.no_grad():
        logits = trainer.student_logits(batch)
    loss_mask = batch["loss_mask"].bool()
    at_frontier = frontier_offsets(loss_mask, trainer.settings.block_size)[loss_mask] == 0
    expected = logits.softmax(-1).amax(-1)[at_frontier].mean().item()
    assert logged["confidence/student_offset0"][-1] == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < value[-1] <= 1.0 for name, value in logged.items() if name.startswith("confidence/"))


# ------------------------------------------------------------------ threshold sweep through opdlm-eval


def test_threshold_sweep_cli_reports_rows_ceiling_confidence_and_plot(tmp_path, make_model, tokenizer):
    """Both commit orders by default: each row with its out-of-order rate and the chain bound on its own text."""
    teacher = make_model("llama")
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)
    student.save_pretrained(tmp_path / "student")
    student_tokenizer.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "def add(a, b):"}\n{"prompt": "for i in range(10):"}\n')
    output, plot = tmp_path / "results.json", tmp_path / "sweep.png"
    argv = ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--dataset", str(data)]
    argv += ["--max-new-tokens", "8", "--decodings", "dynamic", "--thresholds", "0.9", "0.3"]
    argv += ["--output", str(output), "--plot", str(plot)]
    assert eval_main(argv) == 0

    report = json.loads(output.read_text())
    dynamic = {"student_dynamic@0.3", "student_dynamic@0.9"}
    left_to_right = {"student_dynamic_left_to_right@0.3", "student_dynamic_left_to_right@0.9"}
    assert set(report["results"]) == dynamic | left_to_right | {"teacher_ar"}
    assert report["settings"]["commit_orders"] == ["confidence", "left_to_right"]
    assert [(row["commit_order"], row["threshold"]) for row in report["sweep"]] == [
        ("confidence", 0.3), ("confidence", 0.9), ("left_to_right", 0.3), ("left_to_right", 0.9),
    ]  # fmt: skip
    ceilings = [row["oracle_ceiling"] for row in report["sweep"][:2]]
    assert 1.0 <= ceilings[1] <= ceilings[0] <= 4.0  # between AR and one step per block, falling with the threshold
    assert report["oracle_ceiling"]["by_block"]["4"]["0.3"] == ceilings[0]
    for row in report["sweep"]:
        assert row["tokens_per_forward"] >= 1.0 and row["tokens_per_second"] > 0
        metrics = report["results"][row["system"]]
        offsets = metrics["confidence_by_offset"]
        assert offsets["count"][0] > 0 and [sum(h) for h in offsets["student_hist"]] == offsets["count"]
        assert 0.0 < offsets["student_mean"][0] <= 1.0 and 0.0 < offsets["teacher_mean"][0] <= 1.0
        own = metrics["own_text_oracle_ceiling"]
        assert set(own) == {"0.3", "0.9"} and 1.0 <= own["0.9"] <= own["0.3"] <= 4.0
        assert row["own_text_ceiling"] == own[f"{row['threshold']:g}"]
        assert 0.0 <= row["out_of_order_rate"] <= 1.0
    for name in left_to_right:
        assert report["results"][name]["out_of_order_rate"] == 0.0  # committed tokens are always a block prefix
    assert report["results"]["teacher_ar"]["tokens_per_second"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_own_text_ceiling_is_the_chain_bound_of_the_rows_own_scored_text(make_model, tokenizer):
    """A student row's own-text ceiling equals the chain bound recomputed from the teacher's scores of its texts,
    also without an AR teacher run (then there is no teacher-text ceiling)."""
    from datasets import Dataset

    from opdlm_trl.data import tokenize_prompts
    from opdlm_trl.sampling import DiffusionSampler, SamplerConfig, default_stop_token_ids
    from opdlm_trl.teachers import LocalTeacher

    teacher = make_model("llama")
    student, student_tokenizer = to_diffusion(copy.deepcopy(teacher), tokenizer, block_size=4, shift=True)
    prompts = Dataset.from_list([{"prompt": "def add(a, b):"}, {"prompt": "for i in range(10):"}])
    report = evaluate_model(
        student, teacher=teacher, tokenizer=student_tokenizer, dataset=prompts, max_new_tokens=8,
        decodings=("static",), teacher_generate=False, threshold=0.5, commit_orders=("left_to_right",),
    )  # fmt: skip
    row = report["results"]["student_static_left_to_right"]
    assert row["commit_order"] == "left_to_right" and row["out_of_order_rate"] == 0.0
    assert "oracle_ceiling" not in report

    stops = default_stop_token_ids(student_tokenizer, student)
    config = SamplerConfig(max_new_tokens=8, commit_order="left_to_right", stop_token_ids=stops)
    rollout = DiffusionSampler(config, pad_token_id=student_tokenizer.pad_token_id).sample(
        student, tokenize_prompts(prompts, student_tokenizer, None, "left", {})
    )
    targets = LocalTeacher(teacher).score(
        rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, 1
    )
    assert row["own_text_oracle_ceiling"] == {
        "0.5": pytest.approx(oracle_ceiling(targets.token_logprobs, targets.mask, 4, 0.5))
    }


def test_sweep_input_is_checked_before_any_model_loads():
    with pytest.raises(ValueError, match="commit_orders must be"):
        evaluate_model("no/such/student", commit_orders=("random",))
    with pytest.raises(ValueError, match="include 'dynamic'"):
        evaluate_model("no/such/student", thresholds=[0.9], decodings=("static",))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_model("no/such/student", thresholds=[0.5, 1.5])
