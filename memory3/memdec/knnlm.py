"""kNN-LM (Khandelwal et al. 2020), the baseline: p = lambda * p_kNN + (1 - lambda) * p_LM.

The query of a position is the key of the datastore's own base model there (its last-MLP input),
so a datastore serves any base sharing the tokenizer: for a different base, the datastore's model
runs alongside it to make the queries, which is part of kNN-LM's inference cost. p_kNN is the same
distribution the Memory Decoder is trained on (targets.py): softmax of -distance / temperature
over the k nearest entries, summed per next token.
"""
from __future__ import annotations

import numpy as np
import torch

from memory3.memdec.datastore import Datastore
from memory3.memdec.files import MemDecError
from memory3.memdec.keys import capture_keys
from memory3.memdec.mixture import log_or_minus_inf, target_log_probs
from memory3.memdec.targets import knn_weights
from memory3.model import IGNORE_INDEX, Transformer


class KnnLM:
    def __init__(self, datastore: Datastore, encoder: Transformer, *, k: int = 1024,
                 temperature: float = 1.0, lam: float = 0.25, exact: bool = False):
        if encoder.cfg.d_model != datastore.key_dim:
            raise MemDecError(f"the query model has d_model {encoder.cfg.d_model} but the keys of "
                              f"{datastore.path} have {datastore.key_dim} dimensions: use the "
                              f"datastore's base model ({datastore.base['checkpoint']})")
        if not 0 <= lam <= 1 or k <= 0 or temperature <= 0:
            raise MemDecError(f"kNN-LM needs 0 <= lambda <= 1, k > 0 and temperature > 0; got "
                              f"lambda {lam}, k {k}, temperature {temperature}")
        self.datastore, self.encoder = datastore, encoder.eval()
        self.k, self.temperature, self.lam, self.exact = k, temperature, lam, exact

    def knn_probs(self, queries: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
        """p_kNN(next_token) for queries (n, d) and their true next tokens (n,)."""
        distances, ids = self.datastore.search(queries, self.k, exact=self.exact)
        weights = knn_weights(distances, self.temperature)
        values = np.where(ids >= 0, self.datastore.values[np.maximum(ids, 0)], -1)
        return (weights * (values == next_tokens[:, None])).sum(axis=1)

    @torch.no_grad()
    def target_log_probs(self, inputs: torch.Tensor, targets: torch.Tensor,
                         base: Transformer) -> torch.Tensor:
        """log p(target) (B, T) under the kNN-LM mixture with `base`; 0 where IGNORE_INDEX.

        Only scored positions are searched. When `base` is the datastore's model, one forward
        gives both its logits and the queries.
        """
        with capture_keys(self.encoder) as captured:
            encoder_logits = self.encoder(inputs).logits
        logits = encoder_logits if base is self.encoder else base(inputs).logits
        scored = targets != IGNORE_INDEX
        log_lm = target_log_probs(logits, targets)[scored]
        queries = captured[0][scored].float().cpu().numpy()
        p_knn = self.knn_probs(queries, targets[scored].cpu().numpy())
        with np.errstate(divide="ignore"):  # p_kNN = 0 is common: log 0 = -inf, then mixed
            log_knn = torch.from_numpy(np.log(p_knn)).to(log_lm)
        mixed = torch.logaddexp(log_knn + log_or_minus_inf(self.lam),
                                log_lm + log_or_minus_inf(1 - self.lam))
        out = torch.zeros(targets.shape, dtype=mixed.dtype, device=mixed.device)
        out[scored] = mixed
        return out

