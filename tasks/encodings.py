"""Compact on-disk encoding of a model's tensors, chosen per tensor from what its values allow.

A tensor with enough exact zeros (unstructured pruning) is stored as a packed bitmask
of its survivors plus their values; a weight with at most 256 distinct survivors
(weight sharing) stores those values as a codebook plus packed b-bit indices, as in
Deep Compression (Han et al. 2016). Masks and indices are then deflated when that
makes them smaller (a 95 %-sparse mask is mostly zero bytes; cluster sizes are uneven),
the entropy-coding stage Deep Compression does with Huffman codes. Everything else
stays dense. The encoding is lossless: decoding gives back the exact tensors, so a
pruned or shared model predicts the same after a save/load round trip, and its file
really is smaller.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

MASK, VALUES, CODEBOOK, INDICES = "::mask", "::values", "::codebook", "::indices"
MAX_CODEBOOK_BITS = 8
DEFLATED = "~z"  # suffix of a mask or indices tensor stored deflated


def deflate_if_smaller(key: str, packed: np.ndarray) -> dict[str, torch.Tensor]:
    deflated = zlib.compress(packed.tobytes(), 9)
    if len(deflated) < len(packed):
        return {key + DEFLATED: torch.frombuffer(bytearray(deflated), dtype=torch.uint8)}
    return {key: torch.from_numpy(packed)}


def packed_bytes(encoded: dict[str, torch.Tensor], key: str) -> np.ndarray:
    if key + DEFLATED in encoded:
        return np.frombuffer(zlib.decompress(encoded[key + DEFLATED].numpy().tobytes()), dtype=np.uint8)
    return encoded[key].numpy()


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits into a uint8 array, `bits` bits each."""
    planes = (indices.astype(np.int64)[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)


def encode_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The smallest of: dense; survivors under a bitmask; survivors as codebook indices."""
    if not tensor.is_floating_point() or tensor.dim() < 2:
        return {name: tensor}  # biases, norms and counters are a rounding error of the size
    flat = tensor.flatten()
    encoded: dict[str, torch.Tensor] = {}
    survivors = flat != 0
    n_survivors = int(survivors.sum())
    if math.ceil(flat.numel() / 8) + n_survivors * flat.element_size() < flat.numel() * flat.element_size():
        encoded.update(deflate_if_smaller(name + MASK, pack_bits(survivors.numpy(), 1)))
        values = flat[survivors]
    else:
        values = flat
    codebook, indices = torch.unique(values, return_inverse=True)
    bits = max(1, math.ceil(math.log2(max(len(codebook), 1))))
    if bits <= MAX_CODEBOOK_BITS and len(codebook) * values.element_size() + math.ceil(
        len(values) * bits / 8
    ) < values.numel() * values.element_size():
        encoded[name + CODEBOOK] = codebook
        encoded.update(deflate_if_smaller(name + INDICES, pack_bits(indices.numpy(), bits)))
    elif encoded:
        encoded[name + VALUES] = values
    else:
        return {name: tensor}
    return encoded


def encode_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoded: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        encoded.update(encode_tensor(name, tensor.detach().contiguous()))
    return encoded


def decode_state(encoded: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Dense tensors again; `shapes` (from the rebuilt architecture) gives each tensor's shape."""
    state = {}
    for name, shape in shapes.items():
        if name in encoded:
            state[name] = encoded[name]
            continue
        count = math.prod(shape)
        mask = None
        if name + MASK in encoded or name + MASK + DEFLATED in encoded:
            mask = torch.from_numpy(unpack_bits(packed_bytes(encoded, name + MASK), 1, count).astype(bool))
        n_values = int(mask.sum()) if mask is not None else count
        if name + CODEBOOK in encoded:
            codebook = encoded[name + CODEBOOK]
            bits = max(1, math.ceil(math.log2(len(codebook))))
            values = codebook[torch.from_numpy(unpack_bits(packed_bytes(encoded, name + INDICES), bits, n_values))]
        else:
            values = encoded[name + VALUES]
        if mask is None:
            state[name] = values.reshape(shape)
        else:
            flat = torch.zeros(count, dtype=values.dtype)
            flat[mask] = values
            state[name] = flat.reshape(shape)
    return state
