"""Quantizers, quantized layers, complexity (MACs/BOPs) and bit-width policies."""

from asga_jax.quant.budget import (BudgetFit, argmax_bops, bops_range, fit_policy_to_budget,
                                   target_bops, uniform_bops)
from asga_jax.quant.complexity import (LayerCost, LayerReport, argmax_bits, argmax_policy,
                                       collect_layer_costs, complexity_loss, expected_bits,
                                       format_model_summary, format_report, layer_report,
                                       mean_expected_bits,
                                       policy_bops, reference_bops,
                                       searchable_layers, total_bops)
from asga_jax.quant.layers import QuantConv, QuantDense, QuantMatmul, layer_path
from asga_jax.quant.policy import (LayerBits, Policy, PolicyError, load_policy, save_policy,
                                   uniform_policy, validate_policy)
from asga_jax.quant.quantizers import (quantize_lsq, quantize_signed, quantize_unsigned,
                                       quantize_weight, round_ste)
from asga_jax.quant.spec import QuantSpec

__all__ = [
    'argmax_bits',
    'argmax_bops',
    'argmax_policy',
    'bops_range',
    'BudgetFit',
    'collect_layer_costs',
    'complexity_loss',
    'expected_bits',
    'fit_policy_to_budget',
    'format_model_summary',
    'format_report',
    'layer_path',
    'layer_report',
    'LayerBits',
    'LayerCost',
    'LayerReport',
    'load_policy',
    'mean_expected_bits',
    'Policy',
    'policy_bops',
    'PolicyError',
    'QuantConv',
    'QuantDense',
    'quantize_lsq',
    'quantize_signed',
    'quantize_unsigned',
    'quantize_weight',
    'QuantMatmul',
    'QuantSpec',
    'reference_bops',
    'round_ste',
    'save_policy',
    'searchable_layers',
    'target_bops',
    'total_bops',
    'uniform_bops',
    'uniform_policy',
    'validate_policy',
]
