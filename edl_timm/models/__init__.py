"""EDL model families, registered in timm on import."""
from .resnet import EDLResNet
from .vision_transformer import EDLVisionTransformer
from .wide_resnet import EDLWideResNet

__all__ = ["EDLResNet", "EDLVisionTransformer", "EDLWideResNet"]
