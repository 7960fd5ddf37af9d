"""A KV cache that decodes without copying itself: keys and values live in buffers with room.

transformers' ``DynamicCache`` appends a decode step's key and value by ``torch.cat``, so every
step copies every layer's whole cache (on a 7B sweep batch, 10% of the GPU time). Here each
layer keeps its keys and values in buffers with ``headroom`` free positions after the prefill;
a step writes its token into the room and attention reads a view of the filled part. An answer
that outgrows the room moves the cache once into a larger buffer, the room doubling each time,
so a 1024-token answer costs a handful of moves rather than 1024 copies.

Built on transformers' cache-layer API (``Cache`` holding one ``DynamicLayer`` per decoder
layer), which transformers 5.17 and 5.24 share: ``update(key, value, *args, **kwargs)``,
``get_seq_length()``, ``get_mask_sizes(query_length)`` all read ``keys``/``values``, which stay
the filled part.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

#: Free positions per layer after a prefill: a ScienceQA answer is a letter, then EOS.
DECODE_HEADROOM = 8


class RoomyLayer(DynamicLayer):
    """One decoder layer's keys and values [B, H_kv, length, head_dim] in buffers with room.

    ``keys`` and ``values`` are views of the buffers' filled part, so the inherited methods
    (sequence length, mask sizes, crop) see what a ``DynamicLayer`` would hold.
    """

    def __init__(self, headroom: int = DECODE_HEADROOM, **kwargs) -> None:
        super().__init__(**kwargs)
        self.headroom = self.room = max(1, headroom)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled part; return all keys and values so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self._buffers_hold(key_states, end):
            self._move_to_new_buffers(key_states, value_states, start, end)
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        if start == 0:
            # The prefill attends over exactly the states it made, as without a cache.
            return key_states, value_states
        return self.keys, self.values

    def _buffers_hold(self, key_states: torch.Tensor, end: int) -> bool:
        """The buffers exist, have room up to ``end``, and still back ``keys`` (an inherited
        method that replaces them, e.g. selecting rows of the batch, leaves them stale)."""
        buffer = self.key_buffer
        return (buffer is not None and end <= buffer.shape[-2]
                and buffer.shape[0] == key_states.shape[0]
                and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[0] == buffer.shape[0])

    def _move_to_new_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor,
                             start: int, end: int) -> None:
        """Buffers for ``end`` positions plus the room, holding the filled part; the room
        doubles on every move after the first, so long answers move O(log n) times."""
        if self.key_buffer is not None:
            self.room *= 2
        buffers = []
        for new, old in ((key_states, self.keys), (value_states, self.values)):
            batch, heads, _, width = new.shape
            buffer = new.new_empty((batch, heads, end + self.room, width))
            if start:
                buffer[:, :, :start] = old
            buffers.append(buffer)
        self.key_buffer, self.value_buffer = buffers

    def reset(self) -> None:
        """Empty again, buffers dropped, the room back to ``headroom`` (the same in every
        transformers version)."""
        self.keys = self.values = None
        self.room = self.headroom
        self.key_buffer = self.value_buffer = None
        self.is_initialized = False


class RoomyCache(Cache):
    """A :class:`RoomyLayer` for each of ``num_layers`` decoder layers."""

    def __init__(self, num_layers: int, headroom: int = DECODE_HEADROOM) -> None:
        super().__init__(layers=[RoomyLayer(headroom) for _ in range(num_layers)])
