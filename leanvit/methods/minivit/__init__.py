"""MiniViT (Zhang et al., CVPR 2022): weight multiplexing of a pre-trained DeiT or Swin (``multiplex``), weight
distillation (``weight_distillation``), and the paper's two diagnostics (``diagnostics``)."""
