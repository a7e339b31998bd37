"""The DVC pipeline's stages and the library they share.

PyTorch's CPU allocator maps each tensor over 2 MB afresh, and a batch's activations (a 64 x 96 x 112 x 112 float
tensor is 308 MB) faulted in 4 KB at a time kept the 2 cores half in the kernel: EfficientNet-Lite0's forward pass
ran 2.4x faster with THP_MEM_ALLOC_ENABLE=1, PyTorch's switch for transparent huge pages on large allocations
(bench/README.md). Set here, before any stage imports torch; a value set by the user is kept.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
