from memory3.model.attention import KVCache
from memory3.model.memory_attention import ChunkMemories, compact_slots
from memory3.model.transformer import IGNORE_INDEX, ModelOutput, Transformer

__all__ = ["ChunkMemories", "IGNORE_INDEX", "KVCache", "compact_slots", "ModelOutput", "Transformer"]
