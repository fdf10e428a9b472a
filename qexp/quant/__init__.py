"""Grid math shared by every method: quantize/dequantize, STE round, RTN, the deployed layer."""

from .grid import QuantSpec, QuantWeight, dequantize, grouped, quantize_codes, ste_round
from .linear import QuantLinear, act_linear, fp_linear
from .rtn import minmax_range, rtn, search_range

__all__ = [
    "QuantLinear", "QuantSpec", "QuantWeight", "act_linear", "dequantize", "fp_linear", "grouped",
    "minmax_range", "quantize_codes", "rtn", "search_range", "ste_round",
]
