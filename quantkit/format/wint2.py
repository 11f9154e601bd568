"""The 2-bit convolutional code (Baidu CCQ, served by FastDeploy as "WINT2"): tensor names, dtypes, shapes,
nibble packing, config.json keys, and the reference decoder (the oracle every other path is tested against).

One weight ``W`` of a routed expert computes ``y = x @ W`` with ``W`` ``[K, N]`` (K inputs, N outputs; the
transpose of quantkit's ``[N, K]`` in-memory weights). Per expert ``e`` and projection ``P`` on disk
(``P`` in gate_proj, up_proj, down_proj; earlier ``--export fastdeploy`` checkpoints also hold ``up_gate_proj`` =
gate and up fused along N, gate columns first, which quantkit's loader still reads):

    model.layers.L.mlp.experts.{e}.P.quant_weight  uint8 [K/4, N]        byte r of column n holds inputs 4r..4r+3
    model.layers.L.mlp.experts.{e}.P.weight_scale  uint8 [ceil(K/128), N] 4-bit local scales, two per byte: the
                                                                          64-group 2j in the HIGH nibble, 2j+1 in
                                                                          the low one; a trailing odd group leaves
                                                                          the low nibble 0
    model.layers.L.mlp.experts.{e}.P.super_scales  bf16  [N]
    model.layers.L.mlp.experts.{e}.P.code_scale    fp32  [N]
    model.layers.L.mlp.experts.{e}.P.code_zp       fp32  [N]
(FastDeploy's own key map for ``moe_quant_type: w4w2`` uses exactly these leaf names; the rest of its layout,
``ernie.`` names and gate|up fused as ``up_gate_proj``, is ``quantkit.format.fastdeploy``'s.)

Decoding byte ``c`` (as a float) of column ``n``, 64-group ``g`` (= k // 64):
    v   = floor(fp32(c * code_scale[n] + code_zp[n]) + 0.5)        an integer, 0 <= v < 2^15 for our encoder
    q_i = ((v >> (9 - 3i)) & 0x3F) - 32                             input k = 4r + i, i = 0..3, q in [-32, 31]
    w   = q_i * (local[g, n] * super_scales[n])                     local in 0..15, used as is (no offset)

Sources, FastDeploy (PaddlePaddle/FastDeploy):
  * custom_ops/gpu_ops/cutlass_extensions/gemm/threadblock/wint2x_unzip.h (CUDA, kWeightOnlyInt2):
    ``decode_value = floor(zipped * code_scale + code_zp + 0.5)`` in float, shifts {9, 6, 3, 0}, mask 0x3F,
    kBZP = 32; ``scale = float(local_scale) * super_scale`` with the local-scale shift
    ``((row / 64 + 1) & 1) * 4`` (even group -> high nibble); output ``T(scale * value)`` in fp32, one
    rounding to bf16.
  * fastdeploy/model_executor/ops/triton_ops/wint2_fused_moe_kernel.py (Triton): the same affine map
    (``tl.floor(b.to(fp32) * code_bs + code_bzp + 0.5).to(int16)``) and windows, but
    ``bs = ((bs >> (1 - k % 2) * 4) & 0xF) * super_bs`` and ``(q - 32) * bs`` are bf16 products
    (``super_bs`` is bf16): two bf16 roundings.

Exact semantics here:
  * ``decode`` returns fp32 weights. ``q * local * super`` needs at most 6 + 4 + 8 significant bits when
    ``super_scales`` is bf16, so it is exact in fp32 and ``decode(...).to(bfloat16)`` is bit for bit the
    weight FastDeploy's CUDA kernel feeds its MMA.
  * ``decode_triton_bf16`` reproduces FastDeploy's Triton kernel: ``bf16(q * bf16(local * super))``.
  * The affine map is evaluated as one fused multiply-add rounded to fp32 (the product and sum in fp64,
    which holds them exactly for 8-bit codes), then ``+ 0.5`` in fp32, then floor. Both FastDeploy kernels
    are compiled with contraction on (nvcc ``--fmad=true``, Triton ``enable_fp_fusion``), i.e. an FMA.
    quantkit's encoder only writes code_scale / code_zp that are multiples of 2^-8 below 2^7 / 2^15, for
    which every step is exact in fp32, so FMA or not, any kernel decodes our checkpoints identically.
  * Windows read bits 0..14 of v only, so int16 (Triton) and int32 (CUDA, here) agree for |v| < 2^15.
"""

from __future__ import annotations

import re

import torch

from quantkit.format.writer import TensorSpec

SCHEME = "ccq_wint2"  # the name config.json uses for the scheme
FORMAT_VERSION = 1
CONFIG_KEY = "quantkit_wint2"  # inside quantization_config (see ``config_block``)
GROUP = 64  # inputs per local scale
PACK = 4  # weights per code byte
WINDOW_SHIFTS = (9, 6, 3, 0)  # q_i = ((v >> WINDOW_SHIFTS[i]) & 0x3F) - 32
WINDOW_MASK, WINDOW_BIAS = 0x3F, 32
LOCAL_MAX = 15  # 4-bit unsigned local scale

QUANT_WEIGHT, WEIGHT_SCALE, SUPER_SCALES, CODE_SCALE, CODE_ZP = (
    "quant_weight", "weight_scale", "super_scales", "code_scale", "code_zp")
LEAVES = (QUANT_WEIGHT, WEIGHT_SCALE, SUPER_SCALES, CODE_SCALE, CODE_ZP)
SUPER_DTYPE = torch.bfloat16
# a planned 3-D routed-experts module (all E experts of one projection); also used by compressed_tensors
EXPERT_MODULE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


# -- shapes and specs -------------------------------------------------------------------------------

def scale_rows(k: int) -> int:
    """Rows of ``weight_scale`` for K inputs: two 64-groups per byte."""
    return -(-k // (2 * GROUP))


def check_k(k: int, what: str = "weight") -> None:
    if k % GROUP:
        raise ValueError(f"{what}: the 2-bit code needs K (inputs) to be a multiple of {GROUP}, got K={k}")


def tensor_specs(prefix: str, n: int, k: int) -> list[TensorSpec]:
    """The five tensors of one ``[K, N]`` weight named ``prefix`` (e.g. ``...experts.3.up_proj``), in write order."""
    check_k(k, prefix)
    return [TensorSpec(f"{prefix}.{QUANT_WEIGHT}", torch.uint8, (k // PACK, n)),
            TensorSpec(f"{prefix}.{WEIGHT_SCALE}", torch.uint8, (scale_rows(k), n)),
            TensorSpec(f"{prefix}.{SUPER_SCALES}", SUPER_DTYPE, (n,)),
            TensorSpec(f"{prefix}.{CODE_SCALE}", torch.float32, (n,)),
            TensorSpec(f"{prefix}.{CODE_ZP}", torch.float32, (n,))]


def expert_prefixes(module: str, num_experts: int, spec) -> list[str]:
    """Disk prefixes of a planned 3-D experts module (canonical name), one per expert, under the family's
    Hub names (``arch.spec.hub_prefixes``)."""
    from quantkit.model.arch.spec import hub_prefixes

    if not EXPERT_MODULE.match(module):
        raise ValueError(f"{module}: the 2-bit code is for routed experts only")
    return hub_prefixes(spec, module, num_experts)


# -- local-scale nibbles ----------------------------------------------------------------------------

def pack_local_scales(local: torch.Tensor) -> torch.Tensor:
    """uint8 [.., G, N] in 0..15 -> uint8 [.., ceil(G/2), N]: group 2j high nibble, 2j+1 low (0 if absent)."""
    if bool(((local < 0) | (local > LOCAL_MAX)).any()):
        raise ValueError("local scales must be 4-bit (0..15)")
    *lead, g, n = local.shape
    if g % 2:
        local = torch.cat([local, local.new_zeros(*lead, 1, n)], dim=-2)
    pairs = local.to(torch.uint8).reshape(*lead, -1, 2, n)
    return (pairs[..., 0, :] << 4) | pairs[..., 1, :]


def unpack_local_scales(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``pack_local_scales``: uint8 [.., ceil(G/2), N] -> uint8 [.., G, N]."""
    *lead, rows, n = packed.shape
    if rows != -(-groups // 2):
        raise ValueError(f"{rows} local-scale rows cannot hold {groups} groups")
    both = torch.stack([packed >> 4, packed & 0xF], dim=-2)  # [.., rows, 2, N]
    return both.reshape(*lead, 2 * rows, n)[..., :groups, :]


# -- the reference decoder ----------------------------------------------------------------------------

def affine_values(codes: torch.Tensor, code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """v = floor(fma_fp32(c, code_scale, code_zp) + 0.5) as int32; codes [.., R, N], code_scale/zp [.., N]."""
    x = codes.to(torch.float64) * code_scale.to(torch.float64)[..., None, :] + code_zp.to(torch.float64)[..., None, :]
    return torch.floor(x.to(torch.float32) + 0.5).to(torch.int32)


def windows(v: torch.Tensor) -> torch.Tensor:
    """int v [.., R, N] -> q int32 [.., 4R, N], row 4r + i = ((v >> (9 - 3i)) & 0x3F) - 32."""
    shifts = torch.tensor(WINDOW_SHIFTS, dtype=torch.int32, device=v.device)
    q = ((v[..., None, :] >> shifts[:, None]) & WINDOW_MASK) - WINDOW_BIAS  # [.., R, 4, N]
    *lead, r, _, n = q.shape
    return q.reshape(*lead, r * PACK, n)


def _check(quant_weight, weight_scale, super_scales, code_scale, code_zp) -> tuple[int, int]:
    if quant_weight.dtype != torch.uint8 or weight_scale.dtype != torch.uint8:
        raise ValueError(f"quant_weight and weight_scale must be uint8, got {quant_weight.dtype}, {weight_scale.dtype}")
    *lead, r, n = quant_weight.shape
    k = r * PACK
    check_k(k)
    if tuple(weight_scale.shape) != (*lead, scale_rows(k), n):
        raise ValueError(f"weight_scale shape {list(weight_scale.shape)} != {[*lead, scale_rows(k), n]} for K={k}, N={n}")
    for name, t in (("super_scales", super_scales), ("code_scale", code_scale), ("code_zp", code_zp)):
        if tuple(t.shape) != (*lead, n):
            raise ValueError(f"{name} shape {list(t.shape)} != {[*lead, n]}")
    return k, n


def decode_q(quant_weight: torch.Tensor, code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """Integer weights q int32 [.., K, N] in [-32, 31] (before the scales)."""
    return windows(affine_values(quant_weight, code_scale, code_zp))


def column_scales(weight_scale: torch.Tensor, super_scales: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 [.., K/64, N]: local * super (exact in fp32 for bf16 super scales)."""
    local = unpack_local_scales(weight_scale, k // GROUP).to(torch.float32)
    return local * super_scales.to(torch.float32)[..., None, :]


def decode(quant_weight: torch.Tensor, weight_scale: torch.Tensor, super_scales: torch.Tensor,
           code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """The reference decoder: fp32 weights ``[.., K, N]`` (x @ W layout) from 2-D ``[K/4, N]`` or 3-D
    ``[E, K/4, N]`` codes and their scales (shapes in the module doc). See the module doc for the exact
    semantics; ``.to(torch.bfloat16)`` of the result is FastDeploy's CUDA-kernel weight bit for bit."""
    k, n = _check(quant_weight, weight_scale, super_scales, code_scale, code_zp)
    q = decode_q(quant_weight, code_scale, code_zp).to(torch.float32)
    s = column_scales(weight_scale, super_scales, k)
    *lead, _, _ = q.shape
    return (q.reshape(*lead, k // GROUP, GROUP, n) * s[..., :, None, :]).reshape(*lead, k, n)


def decode_triton_bf16(quant_weight: torch.Tensor, weight_scale: torch.Tensor, super_scales: torch.Tensor,
                       code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """bf16 weights ``[.., K, N]`` as FastDeploy's Triton kernel makes them: ``bf16(q * bf16(local * super))``."""
    k, n = _check(quant_weight, weight_scale, super_scales, code_scale, code_zp)
    q = decode_q(quant_weight, code_scale, code_zp).to(torch.float32)
    s = column_scales(weight_scale, super_scales, k).to(torch.bfloat16).to(torch.float32)
    *lead, _, _ = q.shape
    return (q.reshape(*lead, k // GROUP, GROUP, n) * s[..., :, None, :]).to(torch.bfloat16).reshape(*lead, k, n)


# -- whole modules (planned 3-D routed experts) -------------------------------------------------------

def module_specs(module: str, shape: tuple[int, int, int], spec) -> list[TensorSpec]:
    """Specs of a planned experts module ``[E, N, K]``."""
    e, n, k = shape
    return [s for p in expert_prefixes(module, e, spec) for s in tensor_specs(p, n, k)]


def module_tensors(module: str, ct, spec) -> dict[str, torch.Tensor]:
    """On-disk tensors of a planned experts module from its stacked ``Code2Tensor`` ``ct`` ([E, ..])."""
    prefixes = expert_prefixes(module, ct.quant_weight.shape[0], spec)
    return {f"{p}.{leaf}": t[e].contiguous() for e, p in enumerate(prefixes) for leaf, t in ct.tensors().items()}


def config_block(modules: list[str]) -> dict:
    """What config.json's ``quantization_config[CONFIG_KEY]`` says: the scheme, its layout, and which
    modules (in-memory names, all experts of a layer each) and layers use it."""
    layers = sorted({int(m.split(".")[2]) for m in modules})
    return {"scheme": SCHEME, "format_version": FORMAT_VERSION, "group_size": GROUP, "super_scale_dtype": "bfloat16",
            "layout": "per-projection", "layers": layers, "layer_ranges": _ranges(layers), "modules": sorted(modules),
            "decode": "v = floor(c * code_scale + code_zp + 0.5); q_i = ((v >> (9 - 3i)) & 0x3F) - 32; "
                      "w[4r+i, n] = q_i * local_scale[(4r+i) // 64, n] * super_scales[n]"}


def _ranges(layers: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in layers:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out
