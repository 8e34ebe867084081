"""Test-only, on PYTHONPATH of `accelerate launch` runs: lets accelerate shard with FSDP on CPU ranks.

See tests/dist/cpu_fsdp_shim.py; active only when DFT_TEST_CPU_FSDP=1.
"""

import os

if os.environ.get("DFT_TEST_CPU_FSDP") == "1":
    from tests.dist.cpu_fsdp_shim import install

    install()
