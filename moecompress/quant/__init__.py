"""Quantization core: integer grids, RTN, GPTQ with expert-aware Hessians, mixed-precision allocation and the
compressed-tensors ``pack-quantized`` checkpoint format. Pure numerics here know nothing about models; the
``quantize`` pass joins them to the family adapters."""

from moecompress.quant.bits import Allocation, allocate_bits, error_table, importance_scores
from moecompress.quant.format import (
    QuantizedCheckpointInfo,
    is_routed_expert_key,
    quantize_saved_checkpoint,
    save_quantized,
)
from moecompress.quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batch, output_error
from moecompress.quant.rtn import SUPPORTED_BITS, QuantResult, check_scheme, dequantize, quantize_rtn

__all__ = [
    "SUPPORTED_BITS",
    "Allocation",
    "HessianAccumulator",
    "QuantResult",
    "QuantizedCheckpointInfo",
    "allocate_bits",
    "check_scheme",
    "dequantize",
    "error_table",
    "gptq_quantize",
    "gptq_quantize_batch",
    "importance_scores",
    "is_routed_expert_key",
    "output_error",
    "quantize_rtn",
    "quantize_saved_checkpoint",
    "save_quantized",
]
