"""``opdlm-convert`` (opdlm_trl/cli/convert.py) for ``accelerate launch`` on CPU in
tests/integration/test_example_configs.py.

The one difference from ``accelerate launch -m opdlm_trl.cli.convert``: DeepSpeed's shared-memory all-reduce kernel is
not built. DeepSpeed's CPU backend JIT-compiles it on first use (~3.5 min on 2 cores, see docs/multi-gpu.md); it only
speeds up intra-node all-reduce and changes no ZeRO logic, so plain gloo collectives are used instead, as in
tests/integration/distributed_worker.py. Arguments go to the command unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from distributed_worker import skip_deepspeed_shm_kernel

    skip_deepspeed_shm_kernel()

    from opdlm_trl.cli.convert import main

    main()
