"""Numbers shared across layers, in the bottom layer: this module imports nothing, so everything may
use it, including the Triton kernels (``hptransfer.kernels``), which import nothing else of hptransfer.

ImageNet normalisation: the per-channel mean and standard deviation of RGB in [0, 1] that torchvision's
ImageNet backbones expect (VGG-16 of the perceptual losses, the fused normalisation of the crop-gather
kernel and its reference, Inception-v3 of FID). Images in [-1, 1] map to ``((x + 1) / 2 - mean) / std``.
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
