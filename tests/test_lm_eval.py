"""`memory3 lm-eval`: lm-evaluation-harness tasks scored without memory, with memory, with RAG.

Offline: the tasks are the tiny YAML tasks of tests/lm_eval_tasks over JSON Lines files beside them.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")  # the `eval` extra (in `dev` too)

from lm_eval.api.instance import Instance  # noqa: E402

from memory3.checkpoints import load_model, load_tokenizer  # noqa: E402
from memory3.eval.harness import Memory3LM  # noqa: E402
from memory3.generate import generate  # noqa: E402
from memory3.memory.bank import MemoryBank  # noqa: E402
from memory3.memory.overlap import EVAL_OVERLAP  # noqa: E402
from memory3.memory.reading import retrieve_for_chunks  # noqa: E402

from conftest import SHORT_CHUNK as L  # noqa: E402  (the tasks' short texts span several)
from conftest import run_memory3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"
# Long enough for three chunks of L tokens: chunks 1 and 2 read memories.
CONTEXT = ("The following notes concern Valdros Bramlilhem. There are many stories about Valdros "
           "Bramlilhem. The birthplace of Valdros Bramlilhem was")


@pytest.fixture(scope="module")
def parts(short_chunk_run):
    run, bank_dir = short_chunk_run
    model, _, _ = load_model(run)
    return model.eval(), load_tokenizer(run), MemoryBank.open(bank_dir)


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) for every i: the model alone, one plain forward."""
    logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_none_scores_are_the_models_token_log_probs(parts):
    model, tok, _ = parts
    lm = Memory3LM(model, tok, "none")
    continuation = " Zomtrosfan"
    (logprob, greedy), = lm.loglikelihood(requests("loglikelihood", (CONTEXT, continuation)))
    context_ids = [tok.bos_id, *tok.encode(CONTEXT)]
    ids = [tok.bos_id, *tok.encode(CONTEXT + continuation)]
    assert ids[:len(context_ids)] == context_ids  # the continuation's tokens follow the context's
    expected = direct_logprobs(model, ids)[len(context_ids) - 1:]
    assert len(expected) == len(ids) - len(context_ids) > 0
    assert logprob == pytest.approx(float(expected.sum()), abs=1e-4)
    assert logprob < 0 and not greedy  # an unlikely name after 6 training steps

    # is_greedy: the model's own argmax continuation is greedy by definition
    next_id = int(model(torch.tensor([context_ids])).logits[0, -1].argmax())
    text = tok.decode(context_ids[1:] + [next_id])[len(CONTEXT):]
    assert tok.encode(CONTEXT + text)[len(context_ids) - 1:] == [next_id]  # round trip
    (_, greedy), = lm.loglikelihood(requests("loglikelihood", (CONTEXT, text)))
    assert greedy

    # A context longer than the model reads keeps its end: max_seq_len inputs, scored as such.
    long_context = " ".join([CONTEXT] * 5)
    (logprob, _), = lm.loglikelihood(requests("loglikelihood", (long_context, continuation)))
    ids = [tok.bos_id, *tok.encode(long_context + continuation)]
    n = len(ids) - 1 - len(tok.encode(long_context))
    assert len(ids) > model.cfg.max_seq_len + 1 and n > 0
    kept = ids[-(model.cfg.max_seq_len + 1):]
    # (1e-5: one token more or less of context moves this 6-step model's sum by ~5e-5)
    assert logprob == pytest.approx(float(direct_logprobs(model, kept)[-n:].sum()), abs=1e-5)

    # Rolling: a whole text shorter than the model's context is one window after [BOS].
    text = "The flag of Peskath is grey. The city of Peskath dates from 1746."
    rolling, = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert rolling == pytest.approx(float(direct_logprobs(model, [tok.bos_id, *tok.encode(text)])
                                          .sum()), abs=1e-4)


def test_memory_mode_differs_from_none_only_where_memories_are_read(parts):
    model, tok, bank = parts
    ids = [tok.bos_id, *tok.encode(CONTEXT + " Zomtrosfan")]
    rows = retrieve_for_chunks(bank, tok, torch.tensor([ids[:-1]]), chunk_len=L,
                               k=model.cfg.memories_per_chunk, overlap_threshold=EVAL_OVERLAP)
    assert rows.shape[1] >= 3 and (rows[0, 0] < 0).all() and (rows[0, 1:] >= 0).any()
    # Against the sink alone (what memory mode reads where retrieval finds nothing), so that
    # a difference is the retrieved memories' doing: chunk 0 (targets 0..L-1) reads none.
    none = Memory3LM(model, tok, "none", reads_sink=True).token_logprobs(ids, len(ids) - 1)[0]
    memory = Memory3LM(model, tok, "memory", bank=bank).token_logprobs(ids, len(ids) - 1)[0]
    torch.testing.assert_close(memory[:L], none[:L], atol=1e-5, rtol=0)
    # float noise is ~1e-6; the memories a 6-step model reads move log-probs by ~2e-2
    assert (memory[L:] - none[L:]).abs().max() > 1e-3

    # rag: chunk 0 reads no references, so it is the model alone (no sink); later chunks differ
    plain = Memory3LM(model, tok, "none").token_logprobs(ids, len(ids) - 1)[0]
    rag = Memory3LM(model, tok, "rag", bank=bank).token_logprobs(ids, len(ids) - 1)[0]
    torch.testing.assert_close(rag[:L], plain[:L], atol=1e-4, rtol=0)
    assert (rag[L:] - plain[L:]).abs().max() > 1e-3
    # and scoring only the end reads the same references: the same log-probs
    end = Memory3LM(model, tok, "rag", bank=bank).token_logprobs(ids, 5)[0]
    torch.testing.assert_close(end, rag[-5:], atol=1e-4, rtol=0)


def test_generate_until_cuts_at_stop_strings(parts):
    model, tok, bank = parts
    free = generate(model, tok, CONTEXT, max_new_tokens=12).text
    assert free
    stop = free[len(free) // 2:][:2] or free
    out, = Memory3LM(model, tok, "none").generate_until(
        requests("generate_until", (CONTEXT, {"until": [stop], "max_gen_toks": 12})))
    assert out == free[:free.index(stop)]
    # Mode none of a model trained with memory decodes reading the sink alone: its output is
    # the greedy continuation under the same scoring. (The 6-step model's greedy text is the
    # same with or without the sink, so this checks consistency, not that the sink is read.)
    sink_lm = Memory3LM(model, tok, "none", reads_sink=True)
    with_sink, = sink_lm.generate_until(
        requests("generate_until", (CONTEXT, {"until": [], "max_gen_toks": 12})))
    (_, greedy), = sink_lm.loglikelihood(requests("loglikelihood", (CONTEXT, with_sink)))
    assert with_sink and greedy
    with_memory, = Memory3LM(model, tok, "memory", bank=bank).generate_until(
        requests("generate_until", (CONTEXT, {"until": [], "max_gen_toks": 12})))
    assert with_memory == generate(model, tok, CONTEXT, bank=bank, max_new_tokens=12).text


def test_lm_eval_command_writes_every_tasks_metrics_per_mode(short_chunk_run, tmp_path,
                                                             monkeypatch):
    run, bank = short_chunk_run
    # The tasks' data_files are relative to the repository root; no dataset hub is reachable.
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "lm_eval.json"
    run_memory3("lm-eval", "--checkpoint", str(run), "--bank", str(bank),
                "--modes", "none,memory", "--tasks", "memory3_tiny_facts,memory3_tiny_text",
                "--include-path", str(TASKS), "--limit", "3", "--bootstrap-iters", "10",
                "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"none", "memory"}
    for mode, by_task in report["modes"].items():
        assert set(by_task) == {"memory3_tiny_facts", "memory3_tiny_text"}, mode
        assert 0 <= by_task["memory3_tiny_facts"]["acc,none"] <= 1
        assert math.isfinite(by_task["memory3_tiny_text"]["bits_per_byte,none"])
    assert (report["modes"]["memory"]["memory3_tiny_text"]["bits_per_byte,none"]
            != report["modes"]["none"]["memory3_tiny_text"]["bits_per_byte,none"])

    # A memory mode without a bank is refused before anything loads, naming the option.
    proc = run_memory3("lm-eval", "--checkpoint", str(run), "--modes", "memory",
                       "--tasks", "memory3_tiny_facts", "--json", str(out), check=False)
    assert proc.returncode != 0 and "--bank" in proc.stderr


def test_without_lm_eval_the_package_works_and_the_command_says_what_to_install(tmp_path):
    # lm_eval blocked as if not installed: the CLI still builds; lm-eval names the extra.
    code = ("import sys; sys.modules['lm_eval'] = None; "
            "from memory3.cli import main, build_parser; build_parser(); main(['lm-eval', '--checkpoint', 'missing', '--modes', 'none', "
            "'--tasks', 'x', '--json', 'out.json'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "pip install 'memory3[eval]'" in proc.stderr, proc.stderr
