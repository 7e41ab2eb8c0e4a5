"""EDL layers: the elastic dictionary-learning convolution and linear layer."""
from ._fused import eager as eager_solver
from ._fused import available as fused_available
from ._fused import timed_parts
from .edl import EDL_MODES, EDLConv2d, EDLLinear, edl_layers, fit_step_sizes, is_edl_layer

__all__ = [
    "EDL_MODES", "EDLConv2d", "EDLLinear", "eager_solver", "edl_layers", "fit_step_sizes", "fused_available", "is_edl_layer",
    "timed_parts",
]
