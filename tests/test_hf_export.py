"""`memory3 export`: a checkpoint as a Hugging Face Llama folder (logits and token ids equal ours)
that our own commands read back (load_model, init_from, eval, generate)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_memory3
from memory3.config import Recipe
from memory3.data import Tokenizer
from memory3.generate import generate
from memory3.hf.export import ExportError, export_checkpoint, write_hf_folder
from memory3.train.checkpoint import CheckpointError, load_model, load_tokenizer, read_info
from memory3.train.metrics import read_metrics
from memory3.train.trainer import train

transformers = pytest.importorskip("transformers")

# Unicode (accents, CJK, emoji, a zero-width space, characters our 512-token vocabulary lacks and
# so encodes by byte fallback), code, tabs/CR/whitespace runs, leading spaces, digits, and the
# special tokens' own spellings, which must encode as text as they do in sentencepiece.
MIXED_TEXTS = [
    "The city of Velmora   was founded\n\n\tin 1234 by  Ørjan Ærø: «naïve» café 東京 😀 🤖",
    "def f(x):\n    return x**2  # comment\r\n\tif a <ref> b: <s> </s> <unk> <pad>\n",
    "   leading spaces and trailing   ", " ", "\n\n\n", "x" * 40, "12345678901234567890",
    "\x00\x01\x7f \u200b \u00a0 Ǆ ﬁ ℌ ①",
]


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=3", "train.save_every=3",
         "train.eval_every=100"])
    out = tmp_path_factory.mktemp("hf_export") / "run"
    train(recipe, out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(run_dir):
    out = run_dir.parent / "exported"
    run_memory3("export", "--checkpoint", str(run_dir), "--out", str(out))
    return out


def test_folder_holds_hugging_face_files_and_memory3_json(exported, run_dir):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["config.json", "generation_config.json", "memory3.json",
                     "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer.model", "tokenizer_config.json"]
    assert not list(exported.parent.glob(".exported*"))  # no temporary folder left behind
    info = json.loads((exported / "memory3.json").read_text())
    ckpt = read_info(run_dir)
    assert info["format"] == "memory3-hf-export" and info["step"] == 3
    assert info["recipe"] == ckpt["recipe"]  # ModelConfig with the memory fields, and the recipe
    assert info["provenance"]["checkpoint"].endswith("step-00000003")
    assert info["special_tokens"]["ref_bos"] == 4
    assert set(info["files"]) == set(names) - {"memory3.json"}


def test_hugging_face_logits_equal_ours(exported, run_dir, tiny_data):
    ours, _, _ = load_model(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = (tiny_data.parent / "corpus" / "corpus.txt").read_text()[:600]
    ids = hf_tok(text, return_tensors="pt").input_ids[:, :200]
    assert ids[0, 0].item() == 2  # <s> first, as in our shards
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_hugging_face_tokenizer_encodes_as_ours(exported, run_dir):
    ours = load_tokenizer(run_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    some_byte_fallback = False
    for text in MIXED_TEXTS:
        ids = ours.encode(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids, text
        assert hf_tok(text).input_ids == [2, *ids], text
        assert hf_tok.decode(ids) == text
        some_byte_fallback |= any(ours._sp.is_byte(i) for i in ids)
    assert some_byte_fallback  # the texts do reach characters outside the vocabulary
    assert hf_tok.convert_tokens_to_ids("<ref>") == 4 and "<ref>" in hf_tok.all_special_tokens
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 3, 0)


def test_exported_folder_loads_back_as_the_checkpoint(exported, run_dir):
    a, recipe_a, _ = load_model(run_dir)
    b, recipe_b, info = load_model(exported)
    assert recipe_b == recipe_a and info["step"] == 3
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert load_tokenizer(exported).sha256 == load_tokenizer(run_dir).sha256


def test_init_from_an_exported_folder_starts_from_its_weights(exported, run_dir, tiny_data):
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=1", "train.eval_every=100"])
    first = {}
    for name, source in (("run", run_dir), ("exported", exported)):
        out = run_dir.parent / f"from-{name}"
        train(recipe.override([f"train.init_from={source}"]), out, progress=False)
        first[name] = [r["loss"] for r in read_metrics(out / "metrics.jsonl")
                       if r["kind"] == "train"][0]
    assert first["exported"] == pytest.approx(first["run"], abs=1e-6)
    assert first["run"] < math.log(512) - 0.1  # trained weights, not a fresh init (~ln 512)


def test_eval_and_generate_read_an_exported_folder(exported, run_dir, tiny_data):
    heldout = tiny_data.parent / "corpus" / "heldout.txt"
    results = {}
    for name, source in (("run", run_dir), ("exported", exported)):
        out = run_dir.parent / f"eval-{name}.json"
        run_memory3("eval", "--checkpoint", str(source), "--data", str(heldout), "--modes",
                    "none", "--max-sequences", "4", "--seq-len", "64", "--device", "cpu",
                    "--json", str(out))
        results[name] = json.loads(out.read_text())["none"]["perplexity"]
    assert results["exported"] == pytest.approx(results["run"], rel=1e-6)
    proc = run_memory3("generate", "--checkpoint", str(exported), "--prompt", "The river",
                       "--max-new-tokens", "12", "--device", "cpu")
    model, _, _ = load_model(run_dir)
    expected = generate(model, load_tokenizer(run_dir), "The river", max_new_tokens=12)
    assert proc.stdout.startswith("The river" + expected.text)


def test_export_refuses_to_overwrite_and_token_shift(exported, run_dir, tmp_path):
    proc = run_memory3("export", "--checkpoint", str(run_dir), "--out", str(exported),
                       check=False)
    assert proc.returncode == 2 and "is not empty; pass --force" in proc.stderr
    before = (exported / "memory3.json").read_bytes()
    export_checkpoint(run_dir, exported, force=True)  # what --force does
    assert json.loads((exported / "memory3.json").read_bytes()) == json.loads(before)
    assert not list(exported.parent.glob(".exported*"))  # the replaced export is gone

    recipe = Recipe.from_name("tiny-warmup").override(["model.token_shift=true"])
    from memory3.model import Transformer
    with pytest.raises(ExportError, match="token_shift"):
        write_hf_folder(tmp_path / "shift", Transformer(recipe.model).state_dict(), recipe,
                        load_tokenizer(run_dir).path.read_bytes(), {})
    assert not (tmp_path / "shift").exists()


def test_a_damaged_export_is_refused(exported, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        load_model(copy)


def test_tied_embeddings_export_and_load(run_dir, tmp_path):
    recipe = Recipe.from_name("tiny-warmup").override(["model.tie_embeddings=true"])
    from memory3.model import Transformer
    torch.manual_seed(0)
    ours = Transformer(recipe.model).eval()
    out = write_hf_folder(tmp_path / "tied", ours.state_dict(), recipe,
                          load_tokenizer(run_dir).path.read_bytes(), {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)
    back, _, _ = load_model(out)
    assert back.lm_head.weight is back.embed.weight
    assert torch.equal(back.embed.weight, ours.embed.weight)
    assert isinstance(load_tokenizer(out), Tokenizer)
