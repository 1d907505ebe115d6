"""Sharing with Hugging Face: `memory3 export` writes a checkpoint as a folder that
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load, with what Llama cannot express
(memory layers and format, the reference-BOS sink, the recipe) in `memory3.json` beside it, so our
own commands read the folder back; `memory3 import-hf` and `train.init_from=hf:DIR` bring a
Hugging Face Llama (with a sentencepiece tokenizer) into memory3.

    sentencepiece_model.py   read/edit tokenizer.model files (no protobuf needed)
    tokenizer.py             our sentencepiece model -> tokenizer.json that encodes the same
    export.py                checkpoint -> exported folder, written atomically (import-hf too)
    llama_import.py          Hugging Face Llama folder -> our config, weights and tokenizer layout
    cli.py                   `memory3 export`, `memory3 import-hf`

The weight mapping itself is memory3/model/hf.py; reading an exported folder back is
memory3/checkpoints.py (it is one more kind of checkpoint).
"""


class HFError(ValueError):
    """A Hugging Face folder or tokenizer that cannot be converted; the message names the file."""
