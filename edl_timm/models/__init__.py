"""EDL model families, registered in timm on import."""
from .preact_resnet import EDLPreActResNet, EDLWideResNet
from .resnet import EDLResNet
from .vision_transformer import EDLVisionTransformer

__all__ = ["EDLPreActResNet", "EDLResNet", "EDLVisionTransformer", "EDLWideResNet"]
