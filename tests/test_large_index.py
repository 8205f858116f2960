"""Row offsets beyond 2^31 elements: index arithmetic must be 64-bit.

The feature tensors here have more than 2^31 elements but only a handful of their rows are ever
touched, so their pages are never materialised (the allocation is virtual) and the tests are
cheap.  The ops read exactly the rows named by a small kernel map near the end of the tensor; an
int32 overflow in ``row * channels`` would read the wrong row (or crash).
"""
import os

import pytest
import torch

from sparseconv import ops
from sparseconv import reference as ref

ROWS = (1 << 24) + 16  # rows * CH > 2^31
CH = 130


@pytest.fixture(scope="module")
def huge_feats():
    try:
        f = torch.empty(ROWS, CH, dtype=torch.float32)
    except RuntimeError as e:  # pragma: no cover - machines without overcommit
        pytest.skip(f"cannot reserve {ROWS * CH * 4 / 2**30:.1f} GiB of virtual memory: {e}")
    rows = torch.arange(ROWS - 8, ROWS)
    f[rows] = torch.randn(8, CH)
    f[:4] = torch.randn(4, CH)
    return f, rows


def test_conv_forward_reads_rows_past_2_31_elements(huge_feats):
    f, rows = huge_feats
    assert f.numel() > 2**31
    nbmap = torch.tensor([[rows[0], rows[3]], [rows[7], -1], [1, rows[5]]], dtype=torch.int32)
    w = torch.randn(2, CH, 3)
    out = ops.conv_forward(f, w, nbmap, 3, False)
    expected = torch.stack(
        [f[rows[0]] @ w[0] + f[rows[3]] @ w[1], f[rows[7]] @ w[0], f[1] @ w[0] + f[rows[5]] @ w[1]]
    )
    torch.testing.assert_close(out, expected)


def test_conv_weight_grad_reads_rows_past_2_31_elements(huge_feats):
    f, rows = huge_feats
    nbmap = torch.tensor([[rows[2], 0], [rows[6], rows[1]]], dtype=torch.int32)
    g = torch.randn(2, 3)
    got = ops.conv_weight_grad(f, g, nbmap, False)
    small = torch.stack([f[0], f[rows[1]], f[rows[2]], f[rows[6]]])
    remap = {0: 0, int(rows[1]): 1, int(rows[2]): 2, int(rows[6]): 3}
    small_map = nbmap.clone().apply_(lambda v: remap.get(v, -1))
    torch.testing.assert_close(got, ref.conv_weight_grad_reference(small, g, small_map, False))


def test_pooling_reads_rows_past_2_31_elements(huge_feats):
    f, rows = huge_feats
    nbmap = torch.tensor([[rows[4], rows[0], -1], [2, rows[7], rows[3]]], dtype=torch.int32)
    out, arg = ops.maxpool_forward(f, nbmap)
    dense = torch.stack([torch.stack([f[rows[4]], f[rows[0]]]).max(0).values,
                         torch.stack([f[2], f[rows[7]], f[rows[3]]]).max(0).values])
    torch.testing.assert_close(out, dense)
    assert int(arg.max()) >= int(rows[0])
    avg = ops.avgpool_forward(f, nbmap, False)
    torch.testing.assert_close(avg[0], (f[rows[4]] + f[rows[0]]) / 2)


@pytest.mark.skipif(not os.environ.get("SPARSECONV_LARGE_TESTS"), reason="writes ~9 GB; set SPARSECONV_LARGE_TESTS=1")
def test_transposed_scatter_writes_rows_past_2_31_elements():
    nbmap = torch.tensor([[ROWS - 1, 3], [ROWS - 7, -1]], dtype=torch.int32)
    x = torch.randn(2, 4)
    w = torch.randn(2, 4, CH)
    out = ops.conv_forward(x, w, nbmap, ROWS, True)
    torch.testing.assert_close(out[ROWS - 1], x[0] @ w[0])
    torch.testing.assert_close(out[ROWS - 7], x[1] @ w[0])
    torch.testing.assert_close(out[3], x[0] @ w[1])
