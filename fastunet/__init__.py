"""fastunet: a Triton-kernel U-Net forward for PyTorch."""
