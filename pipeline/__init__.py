"""The DVC pipeline's stages (pipeline/stages/), the make targets' helpers (pipeline/tools/) and the library they share.

PyTorch's CPU allocator maps each large tensor afresh, and a batch's activations faulted in 4 KB pages keep the cores
in the kernel: THP_MEM_ALLOC_ENABLE=1, PyTorch's switch for transparent huge pages on large allocations, is set here,
before any stage imports torch (a value set by the user is kept; its effect is measured in bench/README.md).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
