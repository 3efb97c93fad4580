from .moe import RoutingStats
from .transformer import DeepseekV3, ForwardOutput, LatentCache

__all__ = ["DeepseekV3", "ForwardOutput", "LatentCache", "RoutingStats"]
