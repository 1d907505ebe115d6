"""lm-evaluation-harness on a memory3 checkpoint, with and without its memory bank.

`Memory3LM` is an `lm_eval` language model that scores text the way `memory3 eval` does
(eval/perplexity.py), in one of its modes:
  none    the model alone; a model trained with memory reads its sink alone (reading.sink_only).
  memory  each 64-token chunk (the model's chunk_len) reads the memories retrieved with the
          previous chunk's text (causal retrieval), skipping references that overlap the scored
          sequence by more than 2/3 (EVAL_OVERLAP): a benchmark item in the bank is not read.
  rag     the same references as text in front of each chunk (generate.rag_inputs).

A request's sequence is [BOS] context continuation, cut on the left to the model's max_seq_len
(+1 for the first input), and scored in one forward (rag: one per chunk holding scored tokens).
`generate_until` decodes with memory3/generate.py (retrieval every chunk, KV cache); mode none of
a model trained with memory decodes reading its sink alone (no cache: generate() has no such mode).

lm_eval is an optional dependency (`pip install 'memory3[eval]'`): this module imports it, so
import this module only where the harness is used.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from memory3.eval.perplexity import eval_memories, rag_logits
from memory3.generate import generate
from memory3.memory.encoder import MemoryEncoder
from memory3.memory.reading import sink_only

MODES = ("none", "memory", "rag")


class Memory3LM(TemplateLM):
    """An lm_eval LM over a loaded memory3 model; see the module docstring for the modes.

    reads_sink: the model was trained reading memory (eval.perplexity.trained_with_memory).
    encode_now: encode retrieved references with this model instead of reading the bank's
    memories (a bank filled by other weights)."""

    def __init__(self, model, tokenizer, mode: str = "none", *, bank=None,
                 reads_sink: bool = False, encode_now: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown lm-eval mode {mode!r}; known: {list(MODES)}")
        if mode != "none" and bank is None:
            raise ValueError(f"lm-eval mode {mode!r} needs a memory bank (--bank)")
        self.model, self.tok, self.mode, self.bank = model.eval(), tokenizer, mode, bank
        self.encode_now = encode_now
        self._device = model.embed.weight.device
        self.encoder = MemoryEncoder(model)
        self.sink = self.encoder.sink_kv() if reads_sink else None

    # -- what TemplateLM asks of a tokenizer-backed model ------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Training documents start [BOS]; an empty context is that alone (TemplateLM).
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def token_logprobs(self, tokens: Sequence[int], n_scored: int) -> tuple[torch.Tensor, bool]:
        """(log-probs (n_scored,) of the last n_scored tokens of `tokens`, whether each is the
        greedy choice) in this LM's mode. tokens holds the BOS; it is cut on the left to
        max_seq_len + 1."""
        max_len = self.model.cfg.max_seq_len
        if n_scored > max_len:
            raise ValueError(f"{n_scored} tokens to score; the model reads at most {max_len}")
        tokens = list(tokens)[-(max_len + 1):]
        x = torch.tensor([tokens[:-1]], device=self._device)
        y = torch.tensor(tokens[1:], device=self._device)
        logits = self._logits(x, first=x.shape[1] - n_scored)  # (n_scored, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = y[-n_scored:]
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        return picked, bool((logprobs.argmax(-1) == target).all())

    def _logits(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """Logits (T - first, V) of positions [first, T) of x (1, T)."""
        cfg = self.model.cfg
        if self.mode == "none":
            alone = None if self.sink is None else sink_only(self.sink, x, cfg)
            return self.model(x, memory=alone).logits[0, first:]
        if self.mode == "memory":
            memory = eval_memories(self.model, self.bank, self.tok, x, encode_now=self.encode_now)
            return self.model(x, memory=memory).logits[0, first:]
        return rag_logits(self.model, self.bank, self.tok, x, first)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = []
        for pair, context, continuation in tqdm(requests, disable=disable_tqdm,
                                                desc=f"loglikelihood ({self.mode})"):
            if context[:1] != [self.tok.bos_id]:
                context = [self.tok.bos_id, *context]
            logprobs, greedy = self.token_logprobs(context + continuation, len(continuation))
            results.append((float(logprobs.sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", pair, results[-1])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: windows of max_seq_len tokens, each scored after
        what fits of the text before it (lm_eval's rolling windows, context of 1 token)."""
        results = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm,
                            desc=f"loglikelihood_rolling ({self.mode})"):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.tok.encode(text), prefix_token=self.tok.bos_id,
                max_seq_len=self.model.cfg.max_seq_len, context_len=1))
            total = 0.0
            for context, scored in windows:
                total += float(self.token_logprobs(context + scored, len(scored))[0].sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        max_len = self.model.cfg.max_seq_len
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc=f"generate_until ({self.mode})"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0))
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            # A prompt too long for the model keeps its end, leaving room to answer (at least
            # half the context), as lm_eval's Hugging Face model does.
            new_tokens = min(new_tokens, max_len // 2)
            prompt = self.tok.encode(context)
            if len(prompt) + 1 + new_tokens > max_len:
                context = self.tok.decode(prompt[-(max_len - 1 - new_tokens):])
            out = generate(self.model, self.tok, context,
                           bank=None if self.mode == "none" else self.bank,
                           mode="memory" if self.mode == "none" else self.mode,
                           max_new_tokens=new_tokens, temperature=temperature,
                           encode_now=self.encode_now, reads_sink=self.sink is not None).text
            for stop in until:  # generate stops at EOS only; cut at the first stop string
                if stop and stop in out:
                    out = out[:out.index(stop)]
            results.append(out)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out)
        return results


def run_tasks(model, tokenizer, tasks: Sequence[str], modes: Sequence[str], *, bank=None,
              reads_sink: bool = False, encode_now: bool = False,
              include_path: str | None = None, limit: float | None = None,
              bootstrap_iters: int = 100_000, num_fewshot: int | None = None) -> dict:
    """{mode: {task: {metric: value}}}: lm_eval's metrics of every task, in every mode."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown lm-eval mode(s) {unknown}; known: {list(MODES)}")
    task_manager = TaskManager(include_path=include_path)
    by_mode = {}
    for mode in modes:
        lm = Memory3LM(model, tokenizer, mode, bank=bank, reads_sink=reads_sink,
                       encode_now=encode_now)
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager,
                              limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=bootstrap_iters, log_samples=False)
        by_mode[mode] = {task: {k: _plain(v) for k, v in metrics.items() if k != "alias"}
                         for task, metrics in out["results"].items()}
    return by_mode


def _plain(value):
    """A JSON-ready metric: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
