from memory3.model.attention import KVCache
from memory3.model.transformer import IGNORE_INDEX, ModelOutput, Transformer

__all__ = ["IGNORE_INDEX", "KVCache", "ModelOutput", "Transformer"]
