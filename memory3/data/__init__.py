"""Data pipeline: text files -> tokenizer -> token shards -> packed batches."""
from memory3.data.loader import PackedLoader, iter_eval_batches
from memory3.data.shards import TokenShards, load_manifest, prepare_data
from memory3.data.text import (DataError, Document, ReadStats, iter_documents, list_files,
                               require_documents)
from memory3.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["DataError", "Document", "PackedLoader", "ReadStats", "TokenShards", "Tokenizer",
           "iter_documents", "iter_eval_batches", "list_files", "load_manifest", "prepare_data",
           "require_documents", "train_tokenizer"]
