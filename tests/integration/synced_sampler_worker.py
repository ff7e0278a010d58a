"""Two gloo ranks decode rollouts of very different lengths with a model whose every forward is a collective.

Under DeepSpeed ZeRO-3 without gathering the parameters for generation, each forward all-gathers every layer: ranks
must run the same number of forwards. This worker emulates that with a forward pre-hook that all-reduces a 3-element
tensor, so a rank that stops decoding early leaves the other rank's collective unanswered (a gloo size mismatch or
a timeout: on NCCL, a hang). Rank 0's rows stop at their first token (every id is a stop id); rank 1's run to
``--new-tokens``. Rank 1 writes its completion to ``--out``; ``--single`` decodes rank 1's prompt in one process
without any collective (the reference).

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/synced_sampler_worker.py --out OUT [--unsynced]
    python tests/integration/synced_sampler_worker.py --single --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.distributed as dist

from opdlm_trl import to_diffusion
from opdlm_trl.sampling import DiffusionSampler, SamplerConfig
from opdlm_trl.tiny import tiny_model, tiny_tokenizer

PROMPTS = {0: [[5, 6, 7], [8, 9]], 1: [[10, 11, 12, 13], [14, 15, 16]]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--unsynced", action="store_true", help="Decode without synced_ranks (today's behaviour).")
    parser.add_argument("--single", action="store_true", help="One process, rank 1's prompts, no collectives.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rank = 1
    if not args.single:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
        rank = dist.get_rank()
    model, tokenizer = to_diffusion(tiny_model("llama", seed=3), tiny_tokenizer(), block_size=4, shift=True)
    if not args.single:

        def gather_like_zero3(module, inputs):
            dist.all_reduce(torch.ones(3))

        model.register_forward_pre_hook(gather_like_zero3)
    stop_everywhere = list(range(model.config.vocab_size)) if rank == 0 else None
    config = SamplerConfig(
        max_new_tokens=args.new_tokens,
        remasking="static",
        stop_token_ids=stop_everywhere,
        synced_ranks=not args.unsynced,
    )
    rollout = DiffusionSampler(config, pad_token_id=tokenizer.pad_token_id).sample(model, PROMPTS[rank])
    lengths = rollout.completion_mask.sum(1).tolist()
    if not args.single:
        dist.barrier()
    if rank == 1:
        with open(args.out, "w") as handle:
            json.dump({"completion_ids": rollout.completion_ids.tolist(), "lengths": lengths}, handle)
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
