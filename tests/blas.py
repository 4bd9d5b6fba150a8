"""Whether this CPU's BLAS lets Triton's interpreter show the exact mode's bit invariance.

Issue 16's exact mode makes a row's logits independent of the batch, the query block and the prefill
chunk by running every matmul and attention tile at fixed shapes: on the GPU `tl.dot` of one tile shape
computes a row the same way wherever it sits in the tile. On CPU the kernels run in Triton's interpreter,
whose `tl.dot` is numpy's matmul, i.e. OpenBLAS — and there the property depends on the CPU kernel
OpenBLAS picks: measured on an AMD EPYC (Zen, AVX-512), its Zen and Haswell kernels give a row different
bits at another position of the same 16 × 16 tile, the SkylakeX / Cooperlake / SapphireRapids ones do
not (this workplace's machines set OPENBLAS_CORETYPE=Haswell for every process). conftest.py therefore
asks for the SkylakeX kernel on a CPU with AVX-512 (before numpy loads), and
the bit-invariance tests check the precondition (`row_invariant_matmul`) and skip, with this reason, on
a machine where it does not hold rather than fail on a property of the host's BLAS. The GPU tests
(`-m gpu`) show the same invariance on the device without this caveat.
"""

from __future__ import annotations

import numpy as np


def row_invariant_matmul() -> bool:
    """np.matmul of one tile shape gives every row the same bits wherever the row sits in the tile (rows
    rolled by 3, multiplied, rolled back: equal), for the tile shapes the exact kernels use."""
    g = np.random.default_rng(0)
    for m in (16, 32, 64):
        for k in (16, 32, 64, 128):
            for n in (16, 32, 64):
                a = g.standard_normal((m, k), dtype=np.float32)
                b = g.standard_normal((k, n), dtype=np.float32)
                if not np.array_equal(np.roll(np.roll(a, 3, axis=0) @ b, -3, axis=0), a @ b):
                    return False
    return True


NOT_ROW_INVARIANT = ("this CPU's OpenBLAS kernel gives a matmul row different bits at another position of "
                     "the same tile, so Triton's interpreter cannot show the exact mode's bit invariance here "
                     "(tests/blas.py; the GPU tests show it)")
