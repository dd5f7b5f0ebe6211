"""Node selection strategies: pure functions of (candidates, round_index) returning sorted node ids.

Members: :class:`AllNodes`, :class:`ByTags`, :class:`ByIds`, :class:`RandomFraction`; each takes
``base=`` (another selector applied first) to compose.
"""

from __future__ import annotations

from fedcore.strategies._api import NodeInfo, NodeSelector
from fedcore.strategies.filters import AllNodes, ByIds, ByTags
from fedcore.strategies.sampling import RandomFraction

__all__ = ["AllNodes", "ByIds", "ByTags", "NodeInfo", "NodeSelector", "RandomFraction"]
