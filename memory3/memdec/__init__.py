"""Memory Decoder (SPEC section 2) and its kNN-LM baseline.

Flow: base checkpoint + domain token shards -> datastore (datastore.py: keys, next tokens, FAISS
index) -> sparse kNN targets (targets.py) -> `memory3 train --recipe memdec-tiny` (phase.py,
loss.py) -> decoder checkpoint -> MemoryDecoderLM (mixture.py) with any base sharing the tokenizer;
evaluate.py compares base, kNN-LM (knnlm.py) and Memory Decoder perplexity and speed.
"""
from memory3.memdec.datastore import Datastore, build_datastore
from memory3.memdec.evaluate import evaluate
from memory3.memdec.files import MemDecError
from memory3.memdec.knnlm import KnnLM
from memory3.memdec.loss import memdec_loss
from memory3.memdec.mixture import MemoryDecoderLM, mix_log_probs
from memory3.memdec.targets import KnnTargets, build_targets

__all__ = ["Datastore", "KnnLM", "KnnTargets", "MemDecError", "MemoryDecoderLM", "build_datastore",
           "build_targets", "evaluate", "memdec_loss", "mix_log_probs"]
