"""Per-position losses: hand values, identities between variants, reductions, numerical safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opdlm_trl.losses import (
    chunked,
    forward_kl,
    generalized_jsd,
    mdlm_loss,
    reduce_loss,
    reverse_kl,
    student_log_probs,
    token_policy_gradient,
    top1_matches,
)
from opdlm_trl.modeling import suppress_mask_logit

P_S = [0.5, 0.25, 0.125, 0.125]
P_T = [0.6, 0.2, 0.1, 0.1]


def hand_pair():
    student_logits = torch.tensor([P_S]).log().requires_grad_()
    teacher = torch.tensor([P_T]).log()
    return student_logits, teacher


def random_pair(rows: int = 6, vocab: int = 11, seed: int = 0, sharp: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    student_logits = (sharp * torch.randn(rows, vocab, generator=generator)).requires_grad_()
    teacher = torch.log_softmax(sharp * torch.randn(rows, vocab, generator=generator), -1)
    return student_logits, teacher


def top_k(teacher: torch.Tensor, k: int, shuffle: bool = False):
    values, ids = teacher.topk(k, dim=-1)
    if shuffle:  # the teacher's list need not be sorted
        order = torch.randperm(k, generator=torch.Generator().manual_seed(3))
        values, ids = values[:, order], ids[:, order]
    return ids, values


# ---------------------------------------------------------------- forward KL


def test_forward_kl_top_k_hand_example():
    student_logits, teacher = hand_pair()
    ids, values = torch.tensor([[0, 1]]), teacher[:, :2]
    got = forward_kl(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values)
    expected = 0.6 * math.log(0.6 / 0.5) + 0.2 * math.log(0.2 / 0.25)  # docs/method.md §3, no renormalisation
    assert got.item() == pytest.approx(expected, abs=1e-6)
    with_tail = forward_kl(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=True)
    assert with_tail.item() == pytest.approx(expected + 0.2 * math.log(0.2 / 0.25), abs=1e-6)
    # Here the student is proportional to the teacher outside the top-2 (0.1/0.125 each), so the
    # coarsened KL loses nothing: tail bucket == full KL.
    full = forward_kl(student_logits, teacher_full_logprobs=teacher)
    assert with_tail.item() == pytest.approx(full.item(), abs=1e-6)


def test_full_forward_kl_equals_torch_kl_div():
    student_logits, teacher = random_pair()
    expected = F.kl_div(torch.log_softmax(student_logits, -1), teacher, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(student_logits, teacher_full_logprobs=teacher), expected)


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl, lambda *a, **k: generalized_jsd(*a, beta=0.3, **k)])
@pytest.mark.parametrize("tail_bucket", [False, True])
def test_top_k_with_k_equal_vocab_equals_full(divergence, tail_bucket):
    student_logits, teacher = random_pair()
    ids, values = top_k(teacher, teacher.shape[-1], shuffle=True)
    full = divergence(student_logits, teacher_full_logprobs=teacher)
    top = divergence(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=tail_bucket)
    torch.testing.assert_close(top, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", [forward_kl, reverse_kl, lambda *a, **k: generalized_jsd(*a, beta=0.6, **k)])
def test_tail_bucket_is_between_zero_and_full(divergence):
    for seed in range(5):
        student_logits, teacher = random_pair(rows=32, vocab=50, seed=seed)
        full = divergence(student_logits, teacher_full_logprobs=teacher)
        for k in (1, 4, 16):
            ids, values = top_k(teacher, k)
            tail = divergence(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=True)
            assert (tail >= -1e-6).all() and (tail <= full + 1e-5).all()


def test_forward_tail_bucket_chain_rule():
    """KL_full = KL_coarse + q_T * KL(teacher tail conditional || student tail conditional)."""
    student_logits, teacher = random_pair(rows=8, vocab=20, seed=4)
    ids, values = top_k(teacher, 5)
    coarse = forward_kl(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=True)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(1, ids, False)
    student = torch.log_softmax(student_logits, -1).masked_fill(~outside, -math.inf)
    teacher_out = teacher.masked_fill(~outside, -math.inf)
    q_t = teacher_out.logsumexp(-1)
    conditional_t = teacher_out - q_t[:, None]
    conditional_s = student - student.logsumexp(-1)[:, None]
    inner = (conditional_t.exp() * (conditional_t - conditional_s)).nan_to_num().sum(-1)
    full = forward_kl(student_logits, teacher_full_logprobs=teacher)
    torch.testing.assert_close(full, coarse + q_t.exp() * inner, atol=1e-5, rtol=1e-5)


def test_padded_top_k_entries_contribute_nothing():
    student_logits, teacher = random_pair(rows=4, vocab=30, seed=5)
    ids, values = top_k(teacher, 6)
    padded_ids = torch.cat([ids, torch.zeros_like(ids[:, :2])], dim=1)  # id 0 may duplicate a real one
    padded_values = torch.cat([values, torch.full_like(values[:, :2], -math.inf)], dim=1)
    for divergence in (forward_kl, reverse_kl, lambda *a, **k: generalized_jsd(*a, beta=0.5, **k)):
        for tail in (False, True):
            plain = divergence(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=tail)
            padded = divergence(
                student_logits, teacher_top_ids=padded_ids, teacher_top_logprobs=padded_values, tail_bucket=tail
            )
            torch.testing.assert_close(padded, plain)


# ---------------------------------------------------------------- reverse KL and JSD


def test_full_reverse_kl_equals_torch_kl_div():
    student_logits, teacher = random_pair()
    student = torch.log_softmax(student_logits, -1)
    expected = F.kl_div(teacher, student, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(reverse_kl(student_logits, teacher_full_logprobs=teacher), expected)


def test_reverse_kl_top_k_hand_example():
    student_logits, teacher = hand_pair()
    ids, values = torch.tensor([[0, 1]]), teacher[:, :2]
    got = reverse_kl(student_logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=True)
    expected = 0.5 * math.log(0.5 / 0.6) + 0.25 * math.log(0.25 / 0.2) + 0.25 * math.log(0.25 / 0.2)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("top", [False, True])
def test_jsd_endpoints_are_forward_and_reverse_kl(top):
    student_logits, teacher = random_pair(seed=6)
    ids, values = top_k(teacher, 4)
    kwargs = {"teacher_top_ids": ids, "teacher_top_logprobs": values, "tail_bucket": True} if top else {}
    if not top:
        kwargs["teacher_full_logprobs"] = teacher
    torch.testing.assert_close(
        generalized_jsd(student_logits, beta=0.0, **kwargs), forward_kl(student_logits, **kwargs)
    )
    torch.testing.assert_close(
        generalized_jsd(student_logits, beta=1.0, **kwargs), reverse_kl(student_logits, **kwargs)
    )


def test_jsd_matches_trl_convention_values_and_gradients():
    """Same numbers as TRL's DistillationTrainer kernel (identity lm_head: hidden states = logits) and GKD."""
    import warnings

    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning
        from trl.experimental.gkd import GKDTrainer

    student_logits, _ = random_pair(seed=7)
    teacher_logits = 2.0 * torch.randn(6, 11, generator=torch.Generator().manual_seed(17))
    teacher = torch.log_softmax(teacher_logits, -1)
    identity = torch.eye(11)
    for beta in (0.0, 0.25, 0.5, 0.9, 1.0):
        got = generalized_jsd(student_logits, teacher_full_logprobs=teacher, beta=beta)
        (grad,) = torch.autograd.grad(got.sum(), student_logits)
        trl_value, _ = ChunkedDivergenceFunction.apply(
            student_logits, identity, None, teacher_logits, identity, None, beta
        )
        (trl_grad,) = torch.autograd.grad(trl_value.sum(), student_logits)
        torch.testing.assert_close(got, trl_value, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(grad, trl_grad, atol=2e-6, rtol=1e-5)
        gkd = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta, reduction="none").sum(-1)
        torch.testing.assert_close(got, gkd, atol=2e-6, rtol=1e-5)


def test_jsd_bounds_and_symmetry():
    student_logits, teacher = random_pair(rows=16, vocab=40, seed=8, sharp=4.0)
    half = generalized_jsd(student_logits, teacher_full_logprobs=teacher, beta=0.5)
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    # Swapping the roles of student and teacher maps beta to 1 - beta.
    swapped = generalized_jsd(teacher.clone(), teacher_full_logprobs=torch.log_softmax(student_logits, -1), beta=0.7)
    torch.testing.assert_close(generalized_jsd(student_logits, teacher_full_logprobs=teacher, beta=0.3), swapped)


# ---------------------------------------------------------------- token policy gradient and MDLM


def test_token_policy_gradient_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    logits = probs.log().requires_grad_()
    loss = token_policy_gradient(logits, torch.tensor([0]), torch.tensor([math.log(0.8)]))
    reward = math.log(0.8 / 0.5)  # teacher likes token 0 more than the student: positive reward
    assert loss.item() == pytest.approx(-reward * math.log(0.5), abs=1e-6)
    loss.sum().backward()
    # d/dlogits of -r log p_S(0) = -r (onehot(0) - p_S): the step raises logit 0 (negative gradient)
    expected = -reward * (torch.tensor([[1.0, 0.0, 0.0]]) - probs)
    torch.testing.assert_close(logits.grad, expected)
    assert logits.grad[0, 0] < 0


def test_token_policy_gradient_expectation_is_reverse_kl_gradient():
    student_logits, teacher = random_pair(rows=3, vocab=7, seed=9)
    vocab = teacher.shape[-1]
    probs = torch.softmax(student_logits, -1).detach()
    expected_grad = torch.zeros_like(student_logits)
    for token in range(vocab):  # exact expectation over x ~ p_S
        logits = student_logits.detach().clone().requires_grad_()
        ids = torch.full((3,), token)
        token_policy_gradient(logits, ids, teacher[:, token]).sum().backward()
        expected_grad += probs[:, token : token + 1] * logits.grad
    logits = student_logits.detach().clone().requires_grad_()
    reverse_kl(logits, teacher_full_logprobs=teacher).sum().backward()
    torch.testing.assert_close(expected_grad, logits.grad, atol=1e-5, rtol=1e-4)


def test_mdlm_loss_hand_values_with_per_sequence_t():
    logits = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]).log()
    tokens = torch.tensor([0, 1])
    t = torch.tensor([0.5, 0.25])  # rows from two sequences masked at different rates
    weighted = mdlm_loss(logits, tokens, t, "inverse_t")
    torch.testing.assert_close(weighted, torch.tensor([-math.log(0.5) / 0.5, -math.log(0.8) / 0.25]))
    uniform = mdlm_loss(logits, tokens, t, "uniform")
    torch.testing.assert_close(uniform, torch.tensor([-math.log(0.5), -math.log(0.8)]))
    with pytest.raises(ValueError, match="> 0"):
        mdlm_loss(logits, tokens, torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="weighting"):
        mdlm_loss(logits, tokens, t, "linear")


# ---------------------------------------------------------------- reduction


def test_reduce_loss_sequence_vs_token_on_ragged_rows():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0], requires_grad=True)
    rows = torch.tensor([0, 0, 0, 2])  # row 1 has no supervised position
    assert reduce_loss(values, rows, 3, "sequence").item() == pytest.approx((2.0 + 10.0) / 2)
    assert reduce_loss(values, rows, 3, "token").item() == pytest.approx(16.0 / 4)
    assert reduce_loss(values, rows, 3, "token", num_items_in_batch=8).item() == pytest.approx(2.0)
    assert reduce_loss(values, rows, 3, "sequence", num_rows_in_batch=4).item() == pytest.approx(3.0)
    reduce_loss(values, rows, 3, "sequence").backward()
    torch.testing.assert_close(values.grad, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_reduce_loss_is_correct_under_gradient_accumulation(normalization):
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 6.0])
    rows = torch.tensor([0, 0, 1, 1, 0, 1])  # micro-batch A: rows 0-1 of positions 0-3; B: positions 4-5
    whole_rows = torch.tensor([0, 0, 1, 1, 2, 3])
    whole = reduce_loss(values, whole_rows, 4, normalization)
    kwargs = {"num_rows_in_batch": 4} if normalization == "sequence" else {"num_items_in_batch": 6}
    part_a = reduce_loss(values[:4], rows[:4], 2, normalization, **kwargs)
    part_b = reduce_loss(values[4:], torch.tensor([0, 1]), 2, normalization, **kwargs)
    assert (part_a + part_b).item() == pytest.approx(whole.item())


def test_reduce_loss_without_supervision_is_a_connected_zero():
    logits = torch.randn(0, 5, requires_grad=True)
    for normalization in ("sequence", "token"):
        per_position = mdlm_loss(logits, torch.zeros(0, dtype=torch.long), 0.5)
        loss = reduce_loss(per_position, torch.zeros(0, dtype=torch.long), 2, normalization)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


# ---------------------------------------------------------------- mask column and numerical safety

MASK_ID = 6  # student vocab 7 = teacher vocab 6 + the mask row added by to_diffusion


def test_mask_column_never_gets_probability_and_equals_teacher_vocab_normalisation():
    generator = torch.Generator().manual_seed(10)
    raw = 3 * torch.randn(5, 7, generator=generator)
    logits = suppress_mask_logit(raw, MASK_ID).requires_grad_()
    teacher = torch.log_softmax(torch.randn(5, 6, generator=generator), -1)
    assert (student_log_probs(logits).exp()[:, MASK_ID] == 0).all()
    sliced = raw[:, :6].detach().clone()
    for divergence in (forward_kl, reverse_kl, lambda *a, **k: generalized_jsd(*a, beta=0.4, **k)):
        torch.testing.assert_close(
            divergence(logits, teacher_full_logprobs=teacher), divergence(sliced, teacher_full_logprobs=teacher)
        )
    reverse_kl(logits, teacher_full_logprobs=teacher).sum().backward()
    assert (logits.grad[:, MASK_ID] == 0).all()


def all_losses(logits, teacher, ids, values, tokens):
    yield forward_kl(logits, teacher_full_logprobs=teacher)
    yield reverse_kl(logits, teacher_full_logprobs=teacher)
    yield generalized_jsd(logits, teacher_full_logprobs=teacher, beta=0.5)
    for tail in (False, True):
        yield forward_kl(logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=tail)
        yield reverse_kl(logits, teacher_top_ids=ids, teacher_top_logprobs=values, tail_bucket=tail)
        yield generalized_jsd(logits, teacher_top_ids=ids, teacher_top_logprobs=values, beta=0.5, tail_bucket=tail)
    yield token_policy_gradient(logits, tokens, teacher.gather(1, tokens[:, None]).squeeze(1))
    yield mdlm_loss(logits, tokens, torch.full((logits.shape[0],), 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_finite_with_finfo_min_columns_and_impossible_teacher_tokens(dtype):
    generator = torch.Generator().manual_seed(11)
    raw = (4 * torch.randn(6, 7, generator=generator)).to(dtype)
    raw[:, 2] = torch.finfo(dtype).min  # a second dead student column besides the mask ...
    teacher = torch.randn(6, 6, generator=generator)
    teacher[:, 2] = -math.inf  # ... that the teacher rules out too
    teacher[:, 3] = -math.inf  # a token only the teacher rules out (reverse KL is then huge but finite)
    teacher = torch.log_softmax(teacher, -1)
    ids, values = top_k(teacher, 6)  # includes both -inf teacher entries
    tokens = torch.tensor([0, 1, 4, 5, 0, 1])
    for loss in all_losses(suppress_mask_logit(raw, MASK_ID).requires_grad_(), teacher, ids, values, tokens):
        assert torch.isfinite(loss).all()
    logits = suppress_mask_logit(raw, MASK_ID).requires_grad_()
    total = sum(loss.sum() for loss in all_losses(logits, teacher, ids, values, tokens))
    total.backward()
    assert torch.isfinite(logits.grad.float()).all()
    assert (logits.grad[:, MASK_ID] == 0).all() and (logits.grad[:, 2] == 0).all()


def test_top1_matches():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    full = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 9.0]]), -1)
    assert top1_matches(logits, teacher_full_logprobs=full).tolist() == [True, False, True]
    unsorted_ids = torch.tensor([[2, 1], [2, 0], [0, 2]])
    unsorted_values = torch.tensor([[-2.0, -0.1], [-0.5, -0.2], [-3.0, -0.01]])
    assert top1_matches(logits, unsorted_ids, unsorted_values).tolist() == [True, True, True]
    assert top1_matches(logits, unsorted_ids).tolist() == [False, False, False]  # column 0 taken as top-1


# ---------------------------------------------------------------- chunking


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward while ``fn`` builds its graph."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return total, out


def test_chunked_matches_unchunked_and_saves_memory():
    student_logits, teacher = random_pair(rows=64, vocab=512, seed=12)

    def loss_fn(logits, full):
        return generalized_jsd(logits, teacher_full_logprobs=full, beta=0.5)

    plain_bytes, plain = saved_bytes(lambda: loss_fn(student_logits, teacher))
    (plain_grad,) = torch.autograd.grad(plain.sum(), student_logits)
    chunk_bytes, chunked_out = saved_bytes(lambda: chunked(loss_fn, student_logits, full=teacher, chunk_size=16))
    (chunk_grad,) = torch.autograd.grad(chunked_out.sum(), student_logits)
    torch.testing.assert_close(chunked_out, plain)
    torch.testing.assert_close(chunk_grad, plain_grad)
    one_matrix = 64 * 512 * 4
    # Unchunked, several (N, V) float32 tensors are kept for the backward; checkpointed chunks keep
    # only their inputs, slices of logits that exist anyway (one (N, V) in total, no new memory).
    assert plain_bytes >= 5 * one_matrix, plain_bytes
    assert chunk_bytes <= one_matrix, chunk_bytes
    with torch.no_grad():
        torch.testing.assert_close(chunked(loss_fn, student_logits, full=teacher, chunk_size=5), plain)


def test_input_validation():
    student_logits, teacher = random_pair()
    with pytest.raises(ValueError, match="either"):
        forward_kl(student_logits, teacher_full_logprobs=teacher, teacher_top_ids=torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        forward_kl(student_logits, teacher_full_logprobs=teacher[:3])
    with pytest.raises(ValueError, match="exceeds"):
        forward_kl(student_logits[:, :5], teacher_full_logprobs=teacher)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student_logits, teacher_full_logprobs=teacher, beta=1.5)
    with pytest.raises(ValueError, match="normalization"):
        reduce_loss(torch.ones(2), torch.zeros(2, dtype=torch.long), 1, "batch")
