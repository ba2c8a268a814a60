"""The neural long-term memory as plain functions (no nn.Module).

Three paths with one keyword-only signature, each returning ``(output, final_state)``:

- ``naive_memory``: the token-by-token loop of docs/design.md §1 (ground truth, short sequences).
- ``chunk_memory``: the chunk-parallel form (training and prefill).
- ``step_memory``: one token (decoding).
"""

from .chunk import chunk_memory
from .naive import naive_memory
from .state import MemoryState, initial_memory_state, memory_shapes
from .step import step_memory

__all__ = [
    "MemoryState",
    "chunk_memory",
    "initial_memory_state",
    "memory_shapes",
    "naive_memory",
    "step_memory",
]
