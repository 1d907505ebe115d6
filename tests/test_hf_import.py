"""Import of a Hugging Face Llama (`memory3 import-hf`, `train.init_from=hf:DIR`): a small randomly
initialised LlamaForCausalLM saved with a Llama-2-style sentencepiece tokenizer (unk 0, bos 1,
eos 2, no pad, no <ref>, dummy prefix) becomes our model with our special ids, computing the
same logits; warmup and continual training start from it."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import sentencepiece as spm
import torch

from conftest import run_memory3
from memory3.config import ConfigError, ModelConfig, Recipe
from memory3.data import Tokenizer, prepare_data
from memory3.hf import HFError
from memory3.hf.llama_import import import_config, import_weights, our_vocabulary
from memory3.model import Transformer
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

transformers = pytest.importorskip("transformers")

TEXT = "The city of Velmora   was founded in 1234 by Ørjan — café 東京 <ref> 😀\n\tdef f(x): pass"


def llama_tokenizer(corpus) -> bytes:
    """A sentencepiece BPE model with sentencepiece's (and Llama 2's) default special pieces."""
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    return model.getvalue()


def save_llama(path, tokenizer: bytes, seed: int = 0, **overrides):
    # A shape unlike any preset (3 layers, width 48, head_dim 12), vocabulary padded past the
    # tokenizer's 400 pieces as real checkpoints often are.
    kwargs = dict(vocab_size=416, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kwargs, **overrides}))
    model.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(tokenizer)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_import")
    tokenizer = llama_tokenizer(tiny_data.parent / "corpus" / "corpus.txt")
    return root, root / "llama", save_llama(root / "llama", tokenizer), tokenizer


def test_vocabulary_gets_our_special_ids_and_cuts_text_as_before(llama, tmp_path):
    _, _, _, tokenizer = llama
    vocab = our_vocabulary(tokenizer, "tokenizer.model")
    assert vocab.added == 2 and vocab.old_ids[:5] == [None, 0, 1, 2, None]
    old = spm.SentencePieceProcessor(model_proto=tokenizer)
    (tmp_path / "tokenizer.model").write_bytes(vocab.model_bytes)
    Tokenizer(tmp_path)  # our class accepts it: pad 0, unk 1, bos 2, eos 3, <ref> 4 (control)
    new = spm.SentencePieceProcessor(model_proto=vocab.model_bytes)
    assert (new.pad_id(), new.unk_id(), new.bos_id(), new.eos_id()) == (0, 1, 2, 3)
    assert new.piece_to_id("<ref>") == 4 and new.is_control(4)
    ids = new.encode(TEXT)
    assert [vocab.old_ids[i] for i in ids] == old.encode(TEXT)  # same pieces, moved ids
    assert new.decode(ids) == old.decode(old.encode(TEXT))
    assert 4 not in ids  # "<ref>" in text stays text
    # Already in our layout: the bytes come back unchanged (same sha256 as the original file).
    assert our_vocabulary(vocab.model_bytes, "ours").model_bytes == vocab.model_bytes


@pytest.mark.parametrize("tied", [False, True])
def test_imported_model_computes_the_llamas_logits(llama, tied):
    root, _, _, tokenizer = llama
    hf_dir = root / f"llama-tied-{tied}"
    hf = save_llama(hf_dir, tokenizer, seed=1, tie_word_embeddings=tied)
    imported = import_config(hf_dir, ModelConfig())
    cfg = imported.model
    assert (cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.d_mlp, cfg.vocab_size) == (3, 48, 12,
                                                                                     96, 418)
    assert cfg.tie_embeddings is tied and cfg.norm_eps == 1e-6
    ours = Transformer(cfg).eval()
    ours.load_state_dict(import_weights(imported))
    old_ids = spm.SentencePieceProcessor(model_proto=tokenizer).encode(TEXT)
    to_new = {o: n for n, o in enumerate(imported.vocab.old_ids) if o is not None}
    new_ids = [2] + [to_new[i] for i in old_ids]  # <s> is 1 in the Llama's ids, 2 in ours
    with torch.no_grad():
        theirs = hf(torch.tensor([[1] + old_ids])).logits[0]
        mine = ours(torch.tensor([new_ids])).logits[0]
    kept = [n for n, o in enumerate(imported.vocab.old_ids) if o is not None]
    old_of_kept = [imported.vocab.old_ids[n] for n in kept]
    torch.testing.assert_close(mine[:, kept], theirs[:, old_of_kept], atol=1e-5, rtol=1e-5)
    # Rows past the 400 pieces (the padded vocabulary) follow, shifted by the 2 added pieces.
    torch.testing.assert_close(mine[:, 402:], theirs[:, 400:], atol=1e-5, rtol=1e-5)
    # The added <pad> and <ref> rows start at the mean embedding (and mean output row).
    for added in (0, 4):
        torch.testing.assert_close(ours.embed.weight[added], hf.model.embed_tokens.weight.mean(0))
        torch.testing.assert_close(ours.lm_head.weight[added], hf.lm_head.weight.mean(0))
    assert (ours.lm_head.weight is ours.embed.weight) == tied


def test_import_hf_then_warmup_and_continual_from_hf(llama, tiny_data):
    root, hf_dir, _, _ = llama
    out = root / "ours"
    run_memory3("import-hf", str(hf_dir), "--out", str(out))
    info = json.loads((out / "memory3.json").read_text())
    assert info["format"] == "memory3-hf-export"
    assert any("<ref>" in note for note in info["provenance"]["vocabulary"])
    corpus = tiny_data.parent / "corpus"
    prepare_data([corpus / "corpus.txt"], out, root / "shards", valid_fraction=0.05,
                 progress=False)
    expected = import_weights(import_config(hf_dir, ModelConfig()))

    # Warmup at lr 1e-30 (0 is refused by the schedule): a step too small to change any fp32
    # weight, so the checkpoint holds exactly the imported weights, in the Llama's shape.
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={root / 'shards'}", f"train.init_from=hf:{hf_dir}", "train.max_steps=1",
         "train.eval_every=100", "optim.lr=1e-30", "optim.min_lr=1e-30"])
    train(recipe, root / "warmup", progress=False)
    model, trained, _ = load_model(root / "warmup")
    assert (trained.model.n_layers, trained.model.d_model, trained.model.vocab_size) == (3, 48,
                                                                                       418)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    # The imported folder is itself a checkpoint: its own weights are the same.
    same, _, _ = load_model(out)
    for k, v in same.state_dict().items():
        assert torch.equal(v, expected[k]), k

    # Continual: a bank encoded by the imported folder, training read from hf: directly.
    from memory3.memory.build import build_bank
    build_bank(out, [corpus / "knowledge.jsonl"], root / "bank", progress=False)
    continual = Recipe.from_name("tiny-continual").override(
        [f"data.path={root / 'shards'}", f"train.init_from=hf:{hf_dir}", "train.max_steps=1",
         "train.eval_every=100", f"continual.bank={root / 'bank'}"])
    result = train(continual, root / "continual", progress=False)
    assert result["step"] == 1


def test_import_refuses_what_we_cannot_express(llama, tiny_data, tmp_path):
    root, hf_dir, _, tokenizer = llama
    # Data tokenized with another tokenizer.
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", f"train.init_from=hf:{hf_dir}", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="memory3 import-hf"):
        train(recipe, tmp_path / "wrong-data", progress=False)
    # Biases.
    biased = tmp_path / "biased"
    save_llama(biased, tokenizer, attention_bias=True)
    with pytest.raises(HFError, match="attention_bias true"):
        import_config(biased, ModelConfig())
    # Rope scaling.
    scaled = tmp_path / "scaled"
    save_llama(scaled, tokenizer)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="rope scaling 'linear'"):
        import_config(scaled, ModelConfig())
    # No sentencepiece model.
    no_spm = tmp_path / "no-spm"
    shutil.copytree(hf_dir, no_spm)
    (no_spm / "tokenizer.model").unlink()
    with pytest.raises(HFError, match="no sentencepiece tokenizer.model"):
        import_config(no_spm, ModelConfig())
    # Pickled weights only: named, never loaded.
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    proc = run_memory3("import-hf", str(pickled), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "pickled weights are not read" in proc.stderr
