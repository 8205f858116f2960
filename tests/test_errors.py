"""Bad input raises a clear error of the right type, never a crash or a hang.

Each test checks the exception type and the key part of its message.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sparseconv import SparseTensor, ops
from sparseconv import nn as snn

SPATIAL = (4, 4, 4)


def coords_of(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


GOOD = coords_of([0, 1, 2, 3], [0, 2, 2, 2], [0, 3, 0, 1])


def sparse(channels: int = 8, coords: torch.Tensor = GOOD) -> SparseTensor:
    gen = torch.Generator().manual_seed(0)
    return SparseTensor(torch.randn((coords.shape[0], channels), generator=gen), coords, SPATIAL)


# --------------------------------------------------------------------------- coordinates
def test_float_coords():
    with pytest.raises(TypeError, match=r"coords must be int32.*float32"):
        SparseTensor(torch.randn(3, 8), GOOD.float(), SPATIAL)


def test_int64_coords():
    with pytest.raises(TypeError, match=r"coords must be int32.*int64.*coords\.int\(\)"):
        SparseTensor(torch.randn(3, 8), GOOD.long(), SPATIAL)


def test_coords_with_three_columns():
    with pytest.raises(ValueError, match=r"coords must be \[N, 4\].*\(3, 3\)"):
        SparseTensor(torch.randn(3, 8), GOOD[:, 1:], SPATIAL)


def test_one_dimensional_coords():
    with pytest.raises(ValueError, match=r"coords must be \[N, 4\].*\(12,\)"):
        SparseTensor(torch.randn(3, 8), GOOD.reshape(-1), SPATIAL)


def test_negative_coordinate():
    coords = coords_of([0, 1, 2, 3], [0, 2, -1, 2])
    with pytest.raises(ValueError, match=r"non-negative.*row 1.*\(0, 2, -1, 2\).*column 2: y"):
        SparseTensor(torch.randn(2, 8), coords, SPATIAL)


def test_coordinate_outside_spatial_shape():
    coords = coords_of([0, 1, 2, 3], [0, 2, 2, 4])
    with pytest.raises(ValueError, match=r"\(0, 2, 2, 4\) at row 1 is outside spatial_shape \(4, 4, 4\): z must be"):
        SparseTensor(torch.randn(2, 8), coords, SPATIAL)


def test_batch_index_not_below_batch_size():
    coords = coords_of([0, 1, 2, 3], [2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"row 1 has batch index 2 but batch_size is 2"):
        SparseTensor(torch.randn(2, 8), coords, SPATIAL, batch_size=2)


def test_duplicate_coordinates_name_both_rows():
    coords = coords_of([0, 1, 2, 3], [0, 2, 2, 2], [1, 0, 0, 0], [0, 2, 2, 2])
    with pytest.raises(ValueError, match=r"duplicate coordinate \(batch=0, x=2, y=2, z=2\) at rows 1 and 3"):
        SparseTensor(torch.randn(4, 8), coords, SPATIAL)


def test_grid_too_large_for_64_bit_keys_in_hash_build():
    with pytest.raises(ValueError, match=r"grid .*\[16, 2097152, 2097152, 2097152\].*2\^62"):
        ops.hash_build(coords_of([0, 0, 0, 0]), [2**4, 2**21, 2**21, 2**21])


def test_grid_too_large_for_64_bit_keys_in_sparse_tensor():
    with pytest.raises(ValueError, match=r"grid .*2\^62"):
        SparseTensor(torch.randn(1, 2), coords_of([0, 0, 0, 0]), (2**21, 2**21, 2**21), batch_size=2**4)


# --------------------------------------------------------------------------- features
def test_feats_coords_length_mismatch():
    with pytest.raises(ValueError, match=r"feats has 2 rows but coords has 3"):
        SparseTensor(torch.randn(2, 8), GOOD, SPATIAL)


@pytest.mark.parametrize("shape", [(3,), (3, 8, 1)], ids=["1d", "3d"])
def test_feats_not_two_dimensional(shape):
    with pytest.raises(ValueError, match=r"feats must be \[N, C\]"):
        SparseTensor(torch.randn(shape), GOOD, SPATIAL)


def test_integer_feats():
    with pytest.raises(TypeError, match=r"feats must be floating point, got torch.int64"):
        SparseTensor(torch.ones(3, 8, dtype=torch.int64), GOOD, SPATIAL)


def test_feats_and_coords_on_different_devices():
    with pytest.raises(ValueError, match=r"feats is on meta but coords is on cpu"):
        SparseTensor(torch.randn(3, 8, device="meta"), GOOD, SPATIAL)


# --------------------------------------------------------------------------- layers
def test_channel_mismatch_with_layer():
    with pytest.raises(ValueError, match=r"SubMConv3d\(16 -> 4\) expects 16 input channels.* 8 channels"):
        snn.SubMConv3d(16, 4)(sparse(8))


def test_weight_and_input_on_different_devices():
    conv = snn.SubMConv3d(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"input is on cpu but the weight is on meta"):
        conv(sparse(8))


def test_weight_and_input_dtype_mismatch():
    conv = snn.SubMConv3d(8, 4).double()
    with pytest.raises(TypeError, match=r"input dtype torch.float32 differs from weight dtype torch.float64"):
        conv(sparse(8))


def test_inverse_conv_with_nothing_to_invert():
    with pytest.raises(ValueError, match=r"SparseInverseConv3d\(8 -> 4\) has nothing to invert"):
        snn.SparseInverseConv3d(8, 4, 3)(sparse(8))


def test_inverse_conv_with_unknown_indice_key():
    y = snn.SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="down1")(sparse(8))
    with pytest.raises(ValueError, match=r"indice_key='down2'.*keys seen for this input: 'down1'"):
        snn.SparseInverseConv3d(8, 4, 3, indice_key="down2")(y)


@pytest.mark.parametrize("indice_key", [None, "down"], ids=["parent", "keyed"])
def test_inverse_conv_kernel_size_differs(indice_key):
    y = snn.SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="down")(sparse(8))
    expected = r"kernel_size \(2, 2, 2\) but the convolution it inverts has kernel_size \(3, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        snn.SparseInverseConv3d(8, 4, 2, indice_key=indice_key)(y)


def test_conv_geometry_with_empty_output_grid():
    with pytest.raises(ValueError, match=r"kernel_size=\(5, 5, 5\).*leaves an empty output grid \(0, 0, 0\)"):
        snn.SparseConv3d(8, 8, 5)(sparse(8))


def test_transposed_conv_geometry_with_empty_output_grid():
    with pytest.raises(ValueError, match=r"transposed convolution.*leaves an empty output grid"):
        snn.SparseConvTranspose3d(8, 8, 3, padding=3)(sparse(8))


def test_pool_geometry_with_empty_output_grid():
    with pytest.raises(ValueError, match=r"leaves an empty output grid"):
        snn.SparseMaxPool3d(5)(sparse(8))


# --------------------------------------------------------------------------- corrupt kernel maps
def _submanifold_map(x: SparseTensor) -> torch.Tensor:
    return x.coordinate_set.submanifold_map((3, 3, 3), (1, 1, 1)).clone()


@pytest.mark.parametrize("bad", [3, 2**31 - 1, -2], ids=["num-rows", "int32-max", "below-minus-one"])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward-map", "transposed"])
def test_conv_forward_with_corrupt_kernel_map(bad, transposed):
    x = sparse(8)
    nbmap = _submanifold_map(x)
    nbmap[1, 4] = bad
    with pytest.raises(ValueError, match=r"conv_forward: kernel map entries must be -1 or row indices below 3"):
        ops.conv_forward(x.features, torch.randn(27, 8, 4), nbmap, 3, transposed)


@pytest.mark.parametrize(
    "op",
    [
        "conv_input_grad",
        "conv_weight_grad",
        "maxpool_forward",
        "avgpool_forward",
        "avgpool_backward",
    ],
)
def test_other_ops_with_corrupt_kernel_map(op):
    x = sparse(8)
    nbmap = _submanifold_map(x)
    nbmap[2, 0] = 7
    call = {
        "conv_input_grad": lambda: ops.conv_input_grad(torch.randn(3, 4), torch.randn(27, 8, 4), nbmap, 3),
        "conv_weight_grad": lambda: ops.conv_weight_grad(x.features, torch.randn(3, 4), nbmap),
        "maxpool_forward": lambda: ops.maxpool_forward(x.features, nbmap),
        "avgpool_forward": lambda: ops.avgpool_forward(x.features, nbmap),
        "avgpool_backward": lambda: ops.avgpool_backward(torch.randn(3, 8), nbmap, 3),
    }[op]
    with pytest.raises(ValueError, match=rf"{op}: kernel map entries must be -1 or row indices below 3"):
        call()


def test_maxpool_backward_with_corrupt_argmax():
    argmax = torch.full((2, 8), 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"maxpool_backward: argmax entries must be -1 or below num_in = 3"):
        ops.maxpool_backward(torch.randn(2, 8), argmax, 3)


def test_conv_forward_with_int64_kernel_map():
    x = sparse(8)
    with pytest.raises(ValueError, match=r"conv_forward: nbmap must be int32"):
        ops.conv_forward(x.features, torch.randn(27, 8, 4), _submanifold_map(x).long(), 3, False)


def test_conv_forward_weight_offsets_differ_from_kernel_map():
    x = sparse(8)
    with pytest.raises(ValueError, match=r"weight has 8 kernel offsets but the kernel map has 27"):
        ops.conv_forward(x.features, torch.randn(8, 8, 4), _submanifold_map(x), 3, False)


def test_kmap_submanifold_with_coords_not_matching_the_table():
    # In a child process, so that a regression (an out-of-bounds write) cannot take the suite down.
    script = textwrap.dedent(
        """
        import torch
        from sparseconv import ops
        coords = torch.ones(1, 64, 64, 64).nonzero().int()  # every cell of the grid
        keys, values = ops.hash_build(coords, [1, 64, 64, 64])
        try:  # a map for the last 10 rows only: their neighbours are rows ~262000 of the table
            ops.kmap_submanifold(keys, values, coords[-10:].contiguous(), [1, 64, 64, 64], [3, 3, 3], [1, 1, 1])
        except ValueError as e:
            print("ValueError:", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ValueError" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


# --------------------------------------------------------------------------- immutability
def test_assigning_a_property_is_rejected():
    x = sparse(8)
    with pytest.raises(AttributeError, match=r"SparseTensor is immutable.*replace_feature"):
        x.features = torch.randn(3, 8)


def test_assigning_a_new_attribute_is_rejected():
    x = sparse(8)
    with pytest.raises(AttributeError, match=r"SparseTensor is immutable"):
        x.spatial_shape = (8, 8, 8)
    with pytest.raises(AttributeError, match=r"SparseTensor is immutable"):
        x.anything = 1


def test_deleting_an_attribute_is_rejected():
    x = sparse(8)
    with pytest.raises(AttributeError, match=r"SparseTensor is immutable"):
        del x._feats
    assert x.num_voxels == 3  # still intact


def test_replace_feature_with_wrong_number_of_rows():
    with pytest.raises(ValueError, match=r"replace_feature got 4 rows for a tensor with 3 voxels"):
        sparse(8).replace_feature(torch.randn(4, 8))


def test_replace_feature_with_integer_features():
    with pytest.raises(TypeError, match=r"replace_feature expects floating-point features, got torch.int64"):
        sparse(8).replace_feature(torch.ones(3, 8, dtype=torch.int64))


def test_conv_input_grad_names_itself_and_its_row_count():
    with pytest.raises(ValueError, match=r"conv_input_grad: the output row count must be >= 0, got -1"):
        ops.conv_input_grad(torch.randn(3, 4), torch.randn(27, 8, 4), torch.full((3, 27), -1, dtype=torch.int32), -1)


def test_half_precision_on_cpu_is_a_clear_type_error():
    x = sparse(8)
    with pytest.raises(TypeError, match=r"CPU kernels support float32 and float64.*Half"):
        ops.conv_forward(x.features.half(), torch.randn(27, 8, 4).half(), _submanifold_map(x), 3, False)
