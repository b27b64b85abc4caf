"""FP8 (e4m3) block quantisation shared by callers and the FP8 paths of dispatch.

One float32 scale per 128 channels: ``scale = max(amax, 1e-4) * fl32(1/448)`` over the block
(a float32 multiplication by the float32 nearest 1/448, written so: XLA would rewrite a division
by the constant into exactly this), payload ``= cast_e4m3(x / scale)`` (IEEE division, round to
nearest even; |x / scale| <= 448 up to rounding, saturating at 448). With ``round_scale`` the scale is rounded *up* to a power of two (exactly, on the
bits: a scale with a non-zero mantissa goes to the next exponent). With ``ue8m0`` (which needs
``round_scale``) the power-of-two scales are packed as their 8-bit biased exponents, four per
int32, little-endian: block ``4*i + j`` sits in bits ``8*j .. 8*j+7`` of word ``i``; a partial
last word is padded with exponent 127 (scale 1.0).

A CUDA quantiser must reproduce this bit for bit (the LL kernels of issue 4 will be tested
against this function); today every FP8 path runs this JAX code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 128
FP8_MAX = 448.0
INV_FP8_MAX = np.float32(1.0 / FP8_MAX)  # fl32(1/448), the exact constant the kernels use
AMAX_FLOOR = 1e-4
FP8_DTYPE = jnp.float8_e4m3fn


def _check_hidden(x, what: str) -> int:
    h = x.shape[-1]
    if h % BLOCK:
        raise ValueError(f"{what}: hidden size must be a multiple of {BLOCK} for FP8, got {h}")
    return h // BLOCK


def _round_pow2_up(scale):
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    exp = bits & jnp.uint32(0x7F800000)
    exp = jnp.where(bits & jnp.uint32(0x007FFFFF), exp + jnp.uint32(1 << 23), exp)
    return jax.lax.bitcast_convert_type(exp, jnp.float32)


def _pack_ue8m0(scale):
    """[..., G] power-of-two f32 scales -> [..., ceil(G/4)] int32 of packed exponents."""
    g = scale.shape[-1]
    words = -(-g // 4)
    exps = (jax.lax.bitcast_convert_type(scale, jnp.uint32) >> 23) & jnp.uint32(0xFF)
    pad = [(0, 0)] * (scale.ndim - 1) + [(0, 4 * words - g)]
    exps = jnp.pad(exps, pad, constant_values=127).reshape(*scale.shape[:-1], words, 4)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    packed = jnp.sum(exps << shifts, axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(packed, jnp.int32)


def _unpack_ue8m0(packed, groups: int):
    words = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    exps = (words[..., None] >> shifts) & jnp.uint32(0xFF)
    exps = exps.reshape(*packed.shape[:-1], -1)[..., :groups]
    return jax.lax.bitcast_convert_type(exps << 23, jnp.float32)


def quantize_fp8(x, round_scale: bool = False, ue8m0: bool = False):
    """Quantise ``x [..., H]`` (H a multiple of 128) to e4m3 with per-128-channel scales.

    Returns:
      ``(payload [..., H] float8_e4m3fn, scales)`` with ``scales [..., H/128] float32``, or with
      ``ue8m0=True`` ``[..., ceil(H/512)] int32`` of packed exponents.

    Gradient: the scales are held constant (``stop_gradient``), so the payload's cotangent
    reaches ``x`` divided by its scale: ``dequantize_fp8(*quantize_fp8(x))`` has the identity
    gradient *up to the payload cotangent's precision*. JAX types that cotangent like the
    payload, e4m3, and it holds ``g * scale``, which is small: e4m3's smallest subnormal is
    2**-9, so for |x| ~ 1 (scale ~ 1/150) cotangents below ~0.3 round to zero. Train with bf16 on
    the wire (``fp8=False``) when gradients must flow through the quantisation.
    """
    if ue8m0 and not round_scale:
        raise ValueError("quantize_fp8: ue8m0=True needs round_scale=True (UE8M0 holds only "
                         "powers of two)")
    g = _check_hidden(x, "quantize_fp8")
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(jax.lax.stop_gradient(xf)), axis=-1), AMAX_FLOOR)
    scale = amax * INV_FP8_MAX
    if round_scale:
        scale = _round_pow2_up(scale)
    q = jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX)  # e4m3fn has no inf: saturate
    payload = q.astype(FP8_DTYPE).reshape(x.shape)
    return payload, (_pack_ue8m0(scale) if ue8m0 else scale)


def dequantize_fp8(payload, scales, dtype=jnp.float32):
    """Inverse of :func:`quantize_fp8`: ``payload * scale`` per 128-channel block, as ``dtype``.

    ``scales`` may be float32 ``[..., H/128]`` or packed UE8M0 int32 ``[..., ceil(H/512)]``.
    """
    g = _check_hidden(payload, "dequantize_fp8")
    if scales.dtype == jnp.int32:
        scales = _unpack_ue8m0(scales, g)
    elif scales.dtype != jnp.float32:
        raise TypeError(f"dequantize_fp8: scales must be float32 or packed int32, got {scales.dtype}")
    if scales.shape[-1] != g:
        raise ValueError(f"dequantize_fp8: scales last dim must be H/128={g}, got {scales.shape}")
    xf = payload.astype(jnp.float32).reshape(*payload.shape[:-1], g, BLOCK) * scales[..., None]
    return xf.reshape(payload.shape).astype(dtype)
