"""edl-timm: Elastic Dictionary Learning (EDL) layers and models for timm."""
from .layers import EDL_MODES, EDLConv2d, EDLLinear, is_edl_layer

__version__ = "0.1.0"
__all__ = ["EDL_MODES", "EDLConv2d", "EDLLinear", "is_edl_layer", "__version__"]
