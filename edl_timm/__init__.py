"""edl-timm: Elastic Dictionary Learning (EDL) layers and robust models for timm.

Importing the package registers the ``edl_*`` architectures in timm's model registry.
"""
from .convert import MODEL_MODES, convert
from .layers import EDL_MODES, EDLConv2d, EDLLinear, eager_solver, is_edl_layer
from .models import EDLPreActResNet, EDLResNet, EDLVisionTransformer, EDLWideResNet

__version__ = "0.1.0"
__all__ = [
    "EDL_MODES", "MODEL_MODES", "EDLConv2d", "EDLLinear", "EDLPreActResNet", "EDLResNet", "EDLVisionTransformer",
    "EDLWideResNet", "convert", "eager_solver", "is_edl_layer", "__version__",
]
