"""Blocks: MAC, MAG, MAL, LMM (paper section 4) and the two attention baselines, one frame."""

from .baselines import AttentionBlock
from .common import BlockState, NormalizedGate, SwiGLU
from .lmm import LMMBlock
from .mac import MACBlock
from .mag import MAGBlock
from .mal import MALBlock

__all__ = ["AttentionBlock", "BlockState", "LMMBlock", "MACBlock", "MAGBlock", "MALBlock", "NormalizedGate", "SwiGLU"]
