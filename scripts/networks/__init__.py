"""ClinicalFMamba network and its building blocks."""

from .blocks import CrossModalChannelAttention, DilatedGatedConvBlock, UpStage
from .clinicalfmamba import ClinicalFMamba, TokenSwapStage
from .mamba import CrossMambaBlock, DirectionalMamba, MemberLayerNorm, ResidualMambaBlock
from .scan_orders import inverse_orders, scan_orders

__all__ = [
    "ClinicalFMamba",
    "CrossMambaBlock",
    "CrossModalChannelAttention",
    "DilatedGatedConvBlock",
    "DirectionalMamba",
    "MemberLayerNorm",
    "ResidualMambaBlock",
    "TokenSwapStage",
    "UpStage",
    "inverse_orders",
    "scan_orders",
]
