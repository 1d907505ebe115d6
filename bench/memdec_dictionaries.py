"""Memory Decoder vs kNN-LM vs in-context RAG on real text, for two base sizes (SPEC section 2).

General text: GCIDE (dict-gcide: Webster's 1913 and later additions), without the entries that quote
WordNet. Domain: WordNet 3.0 (dict-wn), another dictionary in another style. Both are Debian
packages read offline from /usr/share/dictd:

    apt-get install -y dict-gcide dict-wn
    python bench/memdec_dictionaries.py --out bench_runs/memdec --threads 2

Stages (each skipped when its output exists, so a re-run continues where it stopped):
 1. corpus     GCIDE sample -> general.jsonl; WordNet entries hashed into held-out, tune and domain
               train; domain-train entries sharing a gloss with a held-out or tune entry are
               dropped (WordNet repeats a synset's gloss under each of its words), so no held-out
               gloss is in the datastore, the decoder's data or the RAG passages verbatim.
 2. tokenizer  sentencepiece on the general text only (the bases' tokenizer); shards of all four.
 3. bases      base-S and base-L, `mini`-preset variants of two sizes, pretrained on GCIDE.
 4. datastore  base-S over the domain train split (Flat index: < 2^17 positions).
 5. tuning     on the tune slice (not the held-out one): kNN temperature, then per base the
               kNN-LM lambda and each decoder's lambda, each by grid search.
 6. targets    k = 1024 with the tuned temperature; the decoder (`mini` cut to 1 layer, 0.72M
               parameters) distilled on them (OUT/decoder, beta = 0.5). Its ablation
               (OUT/decoder-ce): the same decoder, same batches, steps and initialisation,
               trained with beta = 0, i.e. on cross-entropy alone (memdec_loss weighs the KL to
               p_kNN by beta and the CE by 1 - beta): plain domain fine-tuning, no kNN imitation.
 7. eval       held-out WordNet, sliding windows of 128 tokens scoring the last 64, timed
               interleaved batch by batch. Modes, per base:
                 base       the base alone
                 knn-lm     kNN-LM over the datastore
                 memdec     Memory Decoder: base mixed with the distilled decoder
                 memdec-ce  the same mixture with the cross-entropy-only decoder: what the
                            domain interpolation alone gives, without imitating kNN
                 rag        BM25 over the domain-train entries, queried with the window's 64
                            context tokens (the text before the scored tokens); the top passages
                            fill 128 tokens prepended to the window
Writes OUT/results.json and prints a table. A folder from an older run gains the memdec-ce row on
a re-run: only its decoder is trained (and, as always, the tuning and eval stages are redone).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import Recipe  # noqa: E402
from memory3.data import TokenShards, Tokenizer, prepare_data, train_tokenizer  # noqa: E402
from memory3.memdec import (Datastore, KnnLM, MemoryDecoderLM, build_datastore,  # noqa: E402
                            build_targets)
from memory3.memdec.evaluate import model_scorer, run_modes  # noqa: E402
from memory3.memdec.keys import capture_keys  # noqa: E402
from memory3.memdec.targets import knn_weights  # noqa: E402
from memory3.memdec.windows import iter_window_batches  # noqa: E402
from memory3.model import IGNORE_INDEX, Transformer  # noqa: E402
from memory3.train.checkpoint import load_model  # noqa: E402
from memory3.train.trainer import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dictionaries import bucket, glosses, quotes_wordnet, read_dictd  # noqa: E402

# `mini` (vocab 2048, max_seq_len 256) variants, with their peak learning rates. The decoder is
# mini cut to 1 layer: per token it costs under a quarter of base-S (the LM head over 2048 tokens
# is a large part of such small models), which the <= 1.3x latency goal needs.
BASES = {"base-S": ({"n_layers": 4, "d_model": 192, "n_heads": 6, "d_mlp": 512}, 4e-3),
         "base-L": ({"n_layers": 6, "d_model": 256, "n_heads": 8, "d_mlp": 768}, 3e-3)}
DECODER = {"n_layers": 1}
# mode -> (run folder, beta): loss = beta * KL(p_kNN || p_dec) + (1 - beta) * CE (loss.py).
DECODERS = {"memdec": ("decoder", 0.5), "memdec-ce": ("decoder-ce", 0.0)}
WINDOW, STRIDE, RAG_TOKENS = 128, 64, 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_runs/memdec")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--general-percent", type=float, default=12.0,
                   help="percent of GCIDE entries in the general corpus")
    p.add_argument("--domain-chars", type=int, default=280_000, help="WordNet train text")
    p.add_argument("--heldout-chars", type=int, default=100_000)
    p.add_argument("--tune-chars", type=int, default=30_000)
    p.add_argument("--base-steps", type=int, default=300, help="x 16 x 256 tokens")
    p.add_argument("--decoder-steps", type=int, default=300, help="x 16 x 128 tokens")
    p.add_argument("--k", type=int, default=1024)
    return p.parse_args(argv)


# -- 1. corpus -----------------------------------------------------------------------------------
def build_corpus(out: Path, args) -> dict[str, Path]:
    files = {n: out / f"{n}.jsonl" for n in ("general", "domain", "tune", "heldout")}
    if all(f.exists() for f in files.values()):
        return files
    general = [t for _, t in read_dictd("gcide")
               if not quotes_wordnet(t) and bucket(t, "general") < args.general_percent / 100]
    wordnet = read_dictd("wn")
    ordered = sorted(wordnet, key=lambda e: bucket(e[1], "order"))
    heldout, tune, rest = [], [], []
    for _, text in ordered:
        u = bucket(text, "split")
        if u < 0.03 and sum(map(len, heldout)) < args.heldout_chars:
            heldout.append(text)
        elif 0.03 <= u < 0.04 and sum(map(len, tune)) < args.tune_chars:
            tune.append(text)
        else:
            rest.append(text)
    unseen = set().union(*map(glosses, heldout + tune))
    domain, chars = [], 0
    for text in rest:
        if chars >= args.domain_chars:
            break
        if not glosses(text) & unseen:
            domain.append(text)
            chars += len(text)
    for name, docs in (("general", general), ("domain", domain), ("tune", tune),
                       ("heldout", heldout)):
        files[name].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return files


# -- 2-3. tokenizer, shards, bases ---------------------------------------------------------------
def prepare(out: Path, files: dict[str, Path]) -> tuple[Tokenizer, dict[str, Path]]:
    tok_dir = out / "tokenizer"
    tok = (Tokenizer(tok_dir) if (tok_dir / "tokenizer.model").exists()
           else train_tokenizer([files["general"]], tok_dir, 2048, progress=False))
    shards = {}
    for name, f in files.items():
        shards[name] = out / f"shards-{name}"
        prepare_data([f], tok.path, shards[name], valid_fraction=0.01 if name == "general" else 0.0,
                     progress=False)
    return tok, shards


def base_recipe(name: str, data: Path, steps: int) -> Recipe:
    model, lr = BASES[name]
    return Recipe.from_name("mini-warmup").override(
        [*(f"model.{k}={v}" for k, v in model.items()), f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
         f"data.path={data}", f"train.max_steps={steps}", "train.eval_every=100000",
         f"train.save_every={steps}", "schedule.warmup_steps=20"])


# -- 5. tuning -----------------------------------------------------------------------------------
@torch.no_grad()
def target_log_probs(model: Transformer, tokens: np.ndarray) -> np.ndarray:
    """log p(next token) of every scored position of the evaluation windows over `tokens`."""
    out = []
    for inputs, targets in iter_window_batches(tokens, WINDOW, STRIDE, 8):
        lp = F.log_softmax(model(inputs).logits.float(), -1)
        out.append(lp.gather(-1, targets.clamp_min(0)[..., None])[..., 0][targets != IGNORE_INDEX])
    return torch.cat(out).double().numpy()


def perplexity(log_probs: np.ndarray) -> float:
    return float(np.exp(-log_probs.mean()))


def mix(log_a: np.ndarray, log_b: np.ndarray, lam: float) -> np.ndarray:
    """log(lam * a + (1 - lam) * b)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(lam) + log_a, np.log1p(-lam) + log_b)


@torch.no_grad()
def tune_knn(store: Datastore, encoder: Transformer, bases: dict[str, Transformer],
             tokens: np.ndarray, k: int) -> dict:
    """Grid search on the tune slice: the kNN temperature (with base-S, whose keys these are),
    then kNN-LM's lambda per base. Neighbours are searched once."""
    distances, matches = [], []
    for inputs, targets in iter_window_batches(tokens, WINDOW, STRIDE, 8):
        scored = targets != IGNORE_INDEX
        with capture_keys(encoder) as captured:
            encoder(inputs)
        d, ids = store.search(captured[0][scored].numpy(), k)
        distances.append(d)
        matches.append(store.values[ids] == targets[scored].numpy()[:, None])
    d, match = np.concatenate(distances), np.concatenate(matches)
    log_base = {name: target_log_probs(model, tokens) for name, model in bases.items()}
    scale = float(np.median(d[:, 0]))
    log_knn = {}
    for c in (0.25, 0.5, 1, 2, 4, 8, 16, 32):
        with np.errstate(divide="ignore"):
            log_knn[scale * c] = np.log((knn_weights(d, scale * c) * match).sum(1))
    lams = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    grid = {(t, lam): perplexity(mix(lk, log_base["base-S"], lam))
            for t, lk in log_knn.items() for lam in lams}
    temperature = min(grid, key=grid.get)[0]
    knn_lambda = {}
    for name, lb in log_base.items():
        scores = {lam: perplexity(mix(log_knn[temperature], lb, lam)) for lam in lams}
        knn_lambda[name] = min(scores, key=scores.get)
    return {"median_nearest_distance": scale, "temperature": temperature,
            "knn_lambda": knn_lambda,
            "tune_base_ppl": {name: perplexity(lb) for name, lb in log_base.items()}}


def tune_decoder(bases: dict[str, Transformer], decoder: Transformer,
                 tokens: np.ndarray) -> tuple[dict[str, float], float]:
    """Per base, the mixture lambda by grid search on the tune slice; and the decoder's own
    perplexity there."""
    log_dec = target_log_probs(decoder, tokens)
    best = {}
    for name, model in bases.items():
        log_base = target_log_probs(model, tokens)
        scores = {lam: perplexity(mix(log_dec, log_base, lam))
                  for lam in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)}
        best[name] = min(scores, key=scores.get)
    return best, perplexity(log_dec)


def decoder_recipe(domain: Path, targets: Path, steps: int, beta: float) -> Recipe:
    """The decoder's training; the decoders of DECODERS differ in beta only."""
    return Recipe.from_dict({
        "name": "memdec-dictionaries", "phase": "memdec",
        "model": {"preset": "mini", **DECODER},
        "data": {"path": str(domain), "seq_len": 128},
        "memdec": {"targets": str(targets), "beta": beta},
        "optim": {"lr": 4e-3, "min_lr": 4e-4},
        "schedule": {"kind": "wsd", "warmup_steps": 20, "decay_fraction": 0.25},
        "train": {"max_steps": steps, "micro_batch_size": 16, "precision": "fp32",
                  "eval_every": 100000, "save_every": steps}})


# -- 7. RAG baseline ----------------------------------------------------------------------------
class BM25:
    """Okapi BM25 over passages (k1 = 1.2, b = 0.75), words = lower-case alphanumeric runs."""

    def __init__(self, passages: list[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.lengths = np.zeros(len(passages))
        postings: dict[str, list[tuple[int, int]]] = {}
        for i, text in enumerate(passages):
            words = Counter(self.words(text))
            self.lengths[i] = sum(words.values())
            for w, tf in words.items():
                postings.setdefault(w, []).append((i, tf))
        self.avg = self.lengths.mean()
        n = len(passages)
        self.postings = {w: (np.array([i for i, _ in p]), np.array([tf for _, tf in p], float),
                             math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)))
                         for w, p in postings.items()}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def ranked(self, query: str) -> np.ndarray:
        scores = np.zeros(len(self.lengths))
        for w in set(self.words(query)):
            if w in self.postings:
                ids, tf, idf = self.postings[w]
                norm = self.k1 * (1 - self.b + self.b * self.lengths[ids] / self.avg)
                scores[ids] += idf * tf * (self.k1 + 1) / (tf + norm)
        return np.argsort(-scores, kind="stable")


class RagScorer:
    """Prepends RAG_TOKENS tokens of the best BM25 passages (queried with the window's context,
    the text before its scored tokens) to every window; same scored tokens as the other modes."""

    def __init__(self, base: Transformer, tok: Tokenizer, passages: list[str]):
        self.base, self.tok = base, tok
        self.bm25 = BM25(passages)
        self.passage_tokens = [[tok.bos_id, *ids, tok.eos_id] for ids in tok.encode_batch(passages)]

    def prefix(self, context: list[int]) -> list[int]:
        out: list[int] = []
        for i in self.bm25.ranked(self.tok.decode(context)):
            out += self.passage_tokens[i]
            if len(out) >= RAG_TOKENS:
                return out[:RAG_TOKENS]
        raise ValueError("passages hold fewer tokens than RAG_TOKENS")

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        first_scored = (targets != IGNORE_INDEX).int().argmax(1).tolist()
        prefixes = torch.tensor([self.prefix(row[:f]) for row, f in
                                 zip(inputs.tolist(), first_scored)])
        logits = self.base(torch.cat([prefixes, inputs], dim=1)).logits[:, RAG_TOKENS:]
        return F.log_softmax(logits.float(), -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]


# -- main ----------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    import faiss
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage_seconds: dict[str, float] = {}

    def stage(name: str, fn):
        start = time.perf_counter()
        value = fn()
        stage_seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {stage_seconds[name]:.0f} s", flush=True)
        return value

    files = stage("corpus", lambda: build_corpus(out, args))
    tok, shards = stage("tokenizer+shards", lambda: prepare(out, files))
    for name in BASES:
        stage(f"train {name}", lambda name=name: train(
            base_recipe(name, shards["general"], args.base_steps), out / name, progress=False))
    store = stage("datastore", lambda: build_datastore(out / "base-S", shards["domain"],
                                                       out / "datastore", progress=False))
    bases = {n: load_model(out / n)[0] for n in BASES}
    tune_tokens = TokenShards(shards["tune"], "train")
    tune_tokens = tune_tokens.read(0, len(tune_tokens))
    tuned = stage("tune kNN", lambda: tune_knn(store, bases["base-S"], bases, tune_tokens, args.k))
    targets = stage("targets", lambda: build_targets(
        store.path, out / "targets", k=args.k, temperature=tuned["temperature"], progress=False))
    decoders, tuned["decoder_lambda"], tuned["tune_decoder_ppl"] = {}, {}, {}
    for mode, (folder, beta) in DECODERS.items():
        recipe = decoder_recipe(shards["domain"], targets.path, args.decoder_steps, beta)
        stage(f"train {folder}", lambda recipe=recipe, folder=folder: train(
            recipe, out / folder, progress=False))
        decoders[mode] = load_model(out / folder)[0]
        tuned["decoder_lambda"][mode], tuned["tune_decoder_ppl"][mode] = stage(
            f"tune {folder}", lambda mode=mode: tune_decoder(bases, decoders[mode], tune_tokens))

    heldout = TokenShards(shards["heldout"], "train")
    batches = list(iter_window_batches(heldout.read(0, len(heldout)), WINDOW, STRIDE, 8))
    passages = [json.loads(line)["text"] for line in files["domain"].read_text().splitlines()]
    results = []
    for name, base in bases.items():
        knn = KnnLM(store, bases["base-S"], k=args.k, temperature=tuned["temperature"],
                    lam=tuned["knn_lambda"][name])
        modes = {"base": model_scorer(base),
                 "knn-lm": lambda x, y, knn=knn, base=base: knn.target_log_probs(x, y, base),
                 **{mode: model_scorer(MemoryDecoderLM(base, decoders[mode],
                                                       tuned["decoder_lambda"][mode][name]))
                    for mode in DECODERS},
                 "rag": RagScorer(base, tok, passages)}
        scores = stage(f"eval {name}", lambda modes=modes: run_modes(
            modes, batches, torch.device("cpu"), desc=name, progress=False))
        for mode, (nll, count, seconds) in scores.items():
            results.append({"base": name, "params": base.cfg.n_params, "mode": mode,
                            "perplexity": math.exp(nll / count), "tokens": int(count),
                            "tokens_per_s": count / seconds,
                            "time_vs_base": seconds / scores["base"][2]})
    report = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "args": vars(args),
              "sizes": {"general_tokens": len(TokenShards(shards["general"], "train")),
                        "datastore_positions": store.positions, "heldout_tokens": len(heldout),
                        "decoder_params": decoders["memdec"].cfg.n_params},
              "decoder_beta": {mode: beta for mode, (_, beta) in DECODERS.items()},
              "tuned": tuned, "targets_mass_kept": targets.manifest["mass_kept_mean"],
              "stage_seconds": stage_seconds, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'base':<7} {'params':>7} {'mode':<9} {'perplexity':>10} {'tokens/s':>9} {'x base':>7}")
    for r in results:
        print(f"{r['base']:<7} {r['params'] / 1e6:>6.2f}M {r['mode']:<9} {r['perplexity']:>10.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['time_vs_base']:>7.2f}")
    print("memdec-ce: the same decoder trained on cross-entropy alone (beta = 0: no kNN "
          "imitation)")


if __name__ == "__main__":
    main()
