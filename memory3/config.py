"""Configs: plain dataclasses with named presets.

`ModelConfig` describes the network and travels inside every checkpoint. `Recipe` bundles a model
with everything a run needs (data, optimizer, schedule, DeepSpeed settings) and is what
`memory3 train --recipe NAME` loads. Both round-trip through plain dicts so they can be written
as JSON into checkpoints and read back from TOML/JSON recipe files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# tomllib is in the standard library from 3.11; tomli is the same parser for 3.10 (pyproject pins it there).
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - only on 3.10
    import tomli as tomllib

RECIPES_DIR = Path(__file__).parent / "recipes"
LOGGERS = ("jsonl", "tensorboard", "wandb")

# Training phases, by recipe `phase` name -> "module:Class" (memory3/train/phases.py make_phase
# imports the class on use). Plain strings, so the config validates a recipe without importing
# training code; a new phase registers by adding its entry here.
PHASES = {
    "warmup": "memory3.train.phases:WarmupPhase",
    "continual": "memory3.train.continual:ContinualPhase",
    "memdec": "memory3.memdec.phase:MemDecPhase",
}


RETRIEVAL_QUERIES = ("chunk", "document")


class ConfigError(ValueError):
    """A config, recipe or override that cannot be used; the message names the field."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 512
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_mlp: int = 128
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Previous-token shift: the first block's input at position j is embed(t_j) + g * embed(t_j-1),
    # g a learnt per-channel gate starting at 0. One attention layer can then match "the token
    # after an earlier occurrence of mine" (in-context copying, and copying from memories, whose
    # keys carry it too) without first learning a previous-token head below an induction head
    # (bench/RESULTS.md, token_shift: decisive for one layer; on real code at two layers it lowers
    # the loss but brings copying no sooner). Not expressible as a Hugging Face Llama.
    token_shift: bool = False
    # Which layers read explicit memories: "first_half", "middle_half", "all", "none",
    # or an explicit list of layer indices.
    memory_layers: str | list[int] = "first_half"
    # Explicit-memory format (SPEC section 1): a reference of at most `reference_len` tokens
    # (reference-BOS included) keeps its `memory_top_k` most attended tokens per memory layer and
    # KV head; the context reads `memories_per_chunk` memories per `chunk_len`-token chunk.
    memory_top_k: int = 8
    reference_len: int = 128
    chunk_len: int = 64
    memories_per_chunk: int = 5
    # What a chunk retrieves with (memory/reading.py, chunk_queries): "chunk", the text of the
    # chunk before it (SPEC: the reference's rule), or "document", the head (first chunk_len tokens)
    # of the document under way: the entry's headword, the file's first lines, the article's
    # title, which the last 64 tokens of a long document often no longer name (issue 15,
    # dictionaries).
    retrieval_query: str = "chunk"

    # Fields that shape no weight: how memories are cut and read, the longest sequence (rotary
    # tables are computed), the init scale. A run may continue another's weights with new ones.
    NOT_IN_WEIGHTS = ("name", "init_std", "max_seq_len", "memory_layers", "memory_top_k",
                      "reference_len", "chunk_len", "memories_per_chunk", "retrieval_query")

    def weight_differences(self, other: "ModelConfig") -> list[str]:
        """Fields that differ between self and other and change what the weights mean."""
        return [f.name for f in fields(self) if f.name not in self.NOT_IN_WEIGHTS
                and getattr(self, f.name) != getattr(other, f.name)]

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim",
                     "d_mlp", "max_seq_len", "memory_top_k", "reference_len", "chunk_len",
                     "memories_per_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be a multiple of "
                              f"model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for rotary positions, got {self.head_dim}")
        if not self.memory_top_k < self.reference_len:
            raise ConfigError(f"model.memory_top_k ({self.memory_top_k}) must be smaller than "
                              f"model.reference_len ({self.reference_len})")
        if self.retrieval_query not in RETRIEVAL_QUERIES:
            raise ConfigError(f"model.retrieval_query must be one of {list(RETRIEVAL_QUERIES)}, "
                              f"got {self.retrieval_query!r}")
        self.memory_layer_ids  # raises on a bad spec
        return self

    @property
    def memory_layer_ids(self) -> list[int]:
        n, spec = self.n_layers, self.memory_layers
        named = {"first_half": range(n // 2), "middle_half": range(n // 4, n // 4 + n // 2),
                 "all": range(n), "none": range(0)}
        if isinstance(spec, str):
            if spec not in named:
                raise ConfigError(f"model.memory_layers must be one of {sorted(named)} or a list of "
                                  f"layer indices, got {spec!r}")
            return list(named[spec])
        ids = sorted(set(int(i) for i in spec))
        if ids and not (0 <= ids[0] and ids[-1] < n):
            raise ConfigError(f"model.memory_layers {spec} outside 0..{n - 1}")
        return ids

    @property
    def matmul_params_per_layer(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        return attn + 3 * d * self.d_mlp

    @property
    def n_params_non_embedding(self) -> int:
        d = self.d_model
        shift = d if self.token_shift else 0
        # + two norms a layer, the final norm (+ the shift gate)
        return self.n_layers * (self.matmul_params_per_layer + 2 * d) + d + shift

    @property
    def n_params(self) -> int:
        emb = self.vocab_size * self.d_model
        return self.n_params_non_embedding + emb * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward and backward) of the dense model: 6 per weight of
        every matmul (the output head included, the embedding lookup not) plus attention's
        scores and mixing, 12 x layers x heads x head_dim x seq_len (PaLM, appendix B). Memory
        reads and reference encoding are not counted."""
        matmuls = self.n_layers * self.matmul_params_per_layer + self.vocab_size * self.d_model
        return 6 * matmuls + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}")
        return _apply(copy.deepcopy(MODEL_PRESETS[name]), overrides, "model").validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "model").validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Trains in seconds on a CPU: for tests and CI.
    "tiny": ModelConfig(name="tiny", vocab_size=512, n_layers=2, d_model=64, n_heads=4,
                        n_kv_heads=2, head_dim=16, d_mlp=128, max_seq_len=256),
    # Quickstart size: a few minutes on 2 cores shows real learning.
    "mini": ModelConfig(name="mini", vocab_size=2048, n_layers=4, d_model=128, n_heads=4,
                        n_kv_heads=2, head_dim=32, d_mlp=384, max_seq_len=256),
    # The shape a 2-core CPU trains to copy from its context (issue 15): 3.4M parameters with a
    # 4096 vocabulary; on Python source a plain loop at ~14,700 tokens/s reached a copy-probe
    # ratio of 0.90 at 37M tokens (42 minutes) and ~0.72 by 70M. Wide heads and few layers: per
    # token it is cheap, and copying (an induction circuit) needs two layers, not depth.
    "cpu": ModelConfig(name="cpu", vocab_size=4096, n_layers=2, d_model=256, n_heads=8,
                       n_kv_heads=8, head_dim=32, d_mlp=512, max_seq_len=256),
    # Our CPU benchmark size: ~20M parameters, trains meaningfully in tens of minutes on 2 cores.
    "small": ModelConfig(name="small", vocab_size=8192, n_layers=8, d_model=384, n_heads=6,
                         n_kv_heads=2, head_dim=64, d_mlp=1024, max_seq_len=512),
    # The reference Memory3 shape (SPEC section 1): ~2.43e9 non-embedding parameters.
    "2.4b": ModelConfig(name="2.4b", vocab_size=60416, n_layers=44, d_model=3200, n_heads=40,
                        n_kv_heads=8, head_dim=80, d_mlp=3200, max_seq_len=2048,
                        memory_layers="first_half"),
}


@dataclass
class DataConfig:
    path: str = ""              # a folder written by `memory3 prepare-data`
    train_split: str = "train"
    valid_split: str = "valid"
    seq_len: int = 256
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    kind: str = "wsd"           # "wsd" (warmup-stable-decay), "cosine" or "constant"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr


@dataclass
class ContinualConfig:
    """Continual training with memory (phase "continual", SPEC 1 "Two-phase pretraining")."""
    bank: str = ""              # a memory bank folder (`memory3 build-bank`) of references
    # Each chunk retrieves new_per_chunk references with its own text; a chunk reads those of
    # the previous_chunks chunks before it (causal: never its own), 1 x 5 = 5 memories per chunk.
    new_per_chunk: int = 1
    previous_chunks: int = 5
    overlap_threshold: float = 0.9   # skip references copying the training sequence (LCS ratio)
    extra_candidates: int = 4   # retrieved beyond need, to replace filtered references
    write_back: bool = True     # store memories of references the bank has none for (cold)
    # What the real-time encodings pass gradient to: "none", "kv" (the memory layers' key/value
    # projections: nearly free, and memory reading is learnt in hundreds of steps rather than
    # thousands; bench/RESULTS.md knowledge_reading) or "full" (the whole reference forward).
    encode_grad: str = "kv"
    # Curriculum (issue 15, "memory copying taught directly"): this share of each batch's
    # sequences reads, in every chunk, the references retrieved with that chunk's own text (the
    # overlap filter still applies) instead of those of the chunks before it. Such reads hold what
    # the chunk states, so reading pays at every fact; causal reads often hold what the previous
    # chunk already said, too rarely useful to teach reading on their own. Evaluation and
    # generation stay causal.
    own_chunk_share: float = 0.0
    # The overlap filter of that share (LCS ratio; default: overlap_threshold). 1.0 keeps the
    # references that copy the sequence, the chunk's own text among them: memory then holds the
    # tokens to predict, the strongest signal that reading memory pays (the fact world's).
    own_chunk_overlap: float | None = None


@dataclass
class MemDecConfig:
    """Memory Decoder distillation (phase "memdec", SPEC section 2)."""
    targets: str = ""           # a folder written by `memory3 memdec build-targets`
    beta: float = 0.5           # loss = beta * KL(p_kNN || p_dec) + (1 - beta) * CE


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    # When > 0, grad_accum is derived from the world size so that every optimizer step sees this
    # many tokens whatever the number of ranks (must divide evenly).
    global_batch_tokens: int = 0
    precision: str = "bf16"     # "bf16" or "fp32"
    zero_stage: int = 1
    seed: int = 1234
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    # Start from these weights (a run dir, a checkpoint, a `memory3 export` folder, or
    # "hf:DIR", a Hugging Face Llama folder) instead of a fresh init; the optimizer and schedule
    # start fresh. Ignored once the run has checkpoints of its own (resume wins).
    init_from: str = ""
    # Extra DeepSpeed config entries merged over the generated dict (e.g. offload settings).
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # Where metrics go: metrics.jsonl always (what tools/plot_metrics.py reads), plus
    # "tensorboard" (event files in RUN/tensorboard) and "wandb" (offline unless WANDB_MODE says
    # otherwise; a resumed run continues the same W&B run).
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    # torch.compile of the model, in place through the DeepSpeed engine's compile hook (parameter
    # names, hence checkpoints, stay those of the eager model); needs a C++ compiler on CPU. Warmup
    # steps ran 1.4-1.6x faster on this CPU, continual ones no faster (reference encoding stays
    # eager); it costs a compile (13-36 s) at the first step. Off by default so a machine without
    # a compiler trains as is (bench/RESULTS.md, "Compiled training").
    compile: bool = False
    # Peak FLOP/s of one device (e.g. 989e12 for an H100's dense bf16): train metrics then carry
    # mfu, model FLOPs utilisation. 0: not reported.
    peak_flops: float = 0.0


@dataclass
class Recipe:
    name: str = "custom"
    phase: str = "warmup"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memdec: MemDecConfig = field(default_factory=MemDecConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    # Whether the recipe file or an override wrote model.vocab_size (a preset's value does not
    # count): when not, training sizes the vocabulary to the data's tokenizer
    # (memory3/train/phases.py fit_vocab_to_data). A plain class attribute, not a field, so it
    # stays out of to_dict() and checkpoints; True unless from_dict/override learn otherwise.
    vocab_size_explicit = True

    def validate(self) -> "Recipe":
        self.model.validate()
        if self.phase not in PHASES:
            raise ConfigError(f"phase must be one of {sorted(PHASES)}, got {self.phase!r}")
        if self.phase == "continual":
            c = self.continual
            for name in ("new_per_chunk", "previous_chunks"):
                if getattr(c, name) <= 0:  # two negatives would multiply to a valid product
                    raise ConfigError(f"continual.{name} must be positive, got "
                                      f"{getattr(c, name)}")
            if c.new_per_chunk * c.previous_chunks != self.model.memories_per_chunk:
                raise ConfigError(
                    f"continual.new_per_chunk x continual.previous_chunks ({c.new_per_chunk} x "
                    f"{c.previous_chunks}) must equal model.memories_per_chunk "
                    f"({self.model.memories_per_chunk})")
            if not self.model.memory_layer_ids:
                raise ConfigError("phase 'continual' needs memory layers (model.memory_layers)")
            if c.encode_grad not in ("none", "kv", "full"):
                raise ConfigError(f"continual.encode_grad must be none, kv or full, got "
                                  f"{c.encode_grad!r}")
            if not 0 <= c.own_chunk_share <= 1:
                raise ConfigError(f"continual.own_chunk_share must be within [0, 1], got "
                                  f"{c.own_chunk_share}")
            if c.own_chunk_overlap is not None and (
                    isinstance(c.own_chunk_overlap, bool)
                    or not isinstance(c.own_chunk_overlap, (int, float))
                    or not 0 <= c.own_chunk_overlap <= 1):
                raise ConfigError(f"continual.own_chunk_overlap must be a number within [0, 1] "
                                  f"(an LCS ratio), got {c.own_chunk_overlap!r}")
        if self.data.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be positive, got {self.data.seq_len}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                              f"({self.model.max_seq_len})")
        if self.train.precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision must be 'bf16' or 'fp32' (fp16 is not portable to "
                              f"CPU), got {self.train.precision!r}")
        if self.train.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0..3, got {self.train.zero_stage}")
        if self.schedule.kind not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"schedule.kind must be wsd, cosine or constant, got "
                              f"{self.schedule.kind!r}")
        if not 0 <= self.schedule.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction must be in [0, 1], got "
                              f"{self.schedule.decay_fraction}")
        loggers = self.train.loggers
        if isinstance(loggers, str):  # an override such as train.loggers=tensorboard,wandb
            loggers = [name.strip() for name in loggers.split(",") if name.strip()]
        if not isinstance(loggers, list) or any(name not in LOGGERS for name in loggers):
            raise ConfigError(f"train.loggers must be a list of {list(LOGGERS)}, got "
                              f"{self.train.loggers!r}")
        self.train.loggers = list(dict.fromkeys(["jsonl", *loggers]))
        if self.train.peak_flops < 0:
            raise ConfigError(f"train.peak_flops must be >= 0, got {self.train.peak_flops}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_every", "save_every",
                     "keep_last", "log_every"):
            if getattr(self.train, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self.train, name)}")
        return self

    def grad_accum_for(self, world_size: int) -> int:
        if self.train.global_batch_tokens <= 0:
            return self.train.grad_accum
        per_micro_step = self.data.seq_len * self.train.micro_batch_size * world_size
        if self.train.global_batch_tokens % per_micro_step:
            raise ConfigError(
                f"train.global_batch_tokens ({self.train.global_batch_tokens}) is not a multiple of "
                f"data.seq_len x train.micro_batch_size x world size ({per_micro_step})")
        return self.train.global_batch_tokens // per_micro_step

    def tokens_per_step(self, world_size: int = 1) -> int:
        return (self.data.seq_len * self.train.micro_batch_size * self.grad_accum_for(world_size)
                * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = copy.deepcopy(d)
        model = d.pop("model", {})
        if isinstance(model, str):
            model = {"preset": model}
        preset = model.pop("preset", None)
        recipe = _from_dict(cls, {k: v for k, v in d.items()
                                  if k not in SECTIONS}, "recipe")
        recipe.model = (ModelConfig.from_name(preset, **model) if preset
                        else ModelConfig.from_dict(model))
        recipe.vocab_size_explicit = "vocab_size" in model
        for section, typ in SECTIONS.items():
            setattr(recipe, section, _from_dict(typ, d.get(section, {}), section))
        return recipe.validate()

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from e
        try:
            d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"recipe {path} is not valid {path.suffix[1:].upper()}: {e}") from e
        d.setdefault("name", path.stem)
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"recipe {path}: {e}") from e

    @classmethod
    def from_name(cls, name: str) -> "Recipe":
        """A shipped recipe name (see `list_recipes()`) or a path to a .toml/.json file."""
        if Path(name).is_dir():
            raise ConfigError(f"{name} is a folder; expected a recipe file (.toml/.json) or a "
                              f"shipped recipe name ({list_recipes()})")
        if Path(name).suffix in (".toml", ".json") or "/" in name:
            return cls.from_file(name)
        path = RECIPES_DIR / f"{name}.toml"
        if not path.exists():
            raise ConfigError(f"unknown recipe {name!r}; shipped recipes: {list_recipes()} "
                              f"(or pass a path to a .toml/.json file)")
        return cls.from_file(path)

    def override(self, assignments: list[str]) -> "Recipe":
        """Apply `section.field=value` strings (values parsed as JSON, else kept as strings)."""
        d = self.to_dict()
        vocab_size_explicit = self.vocab_size_explicit  # to_dict() writes every field
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.field=value")
            vocab_size_explicit = vocab_size_explicit or key == "model.vocab_size"
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            *parents, leaf = key.split(".")
            node, free_form = d, False
            for p in parents:
                if free_form:  # inside train.deepspeed: any nesting DeepSpeed understands
                    node = node.setdefault(p, {})
                elif isinstance(node.get(p), dict):
                    node = node[p]
                else:
                    raise ConfigError(f"override {item!r}: no config section {p!r}")
                free_form = free_form or p == "deepspeed"
            if leaf not in node and not free_form:
                raise ConfigError(f"override {item!r}: unknown field {key!r}")
            node[leaf] = value
        recipe = Recipe.from_dict(d)
        recipe.vocab_size_explicit = vocab_size_explicit
        return recipe

    # Fields naming files or folders. A checkpoint carries its recipe, and later jobs (build-bank,
    # eval, a continual run's init_from) find the tokenizer through data.path from wherever they
    # run: a path relative to the launching directory would not resolve there.
    PATH_FIELDS = (("data", "path"), ("continual", "bank"), ("memdec", "targets"),
                   ("train", "init_from"))

    def with_absolute_paths(self, base: str | Path | None = None) -> "Recipe":
        """A copy whose relative PATH_FIELDS are made absolute against base (default: cwd)."""
        base = Path.cwd() if base is None else Path(base)
        d = self.to_dict()
        for section, field_name in self.PATH_FIELDS:
            value = d[section][field_name]
            prefix, rest = ("hf:", value[3:]) if value.startswith("hf:") else ("", value)
            if rest and not Path(rest).is_absolute():
                d[section][field_name] = prefix + str((base / rest).resolve())
        recipe = Recipe.from_dict(d)
        recipe.vocab_size_explicit = self.vocab_size_explicit
        return recipe


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "train": TrainConfig, "memdec": MemDecConfig, "continual": ContinualConfig}


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _from_dict(cls, d: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ConfigError(f"unknown field(s) in {where}: {sorted(unknown)}; known: {sorted(known)}")
    return _apply(cls(), d, where)


def _apply(obj, overrides: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in overrides.items():
        if k not in known:
            raise ConfigError(f"unknown field {where}.{k}; known: {sorted(known)}")
        default = getattr(obj, k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{where}.{k} must be true/false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}.{k} must be a number, got {v!r}")
            if isinstance(default, int) and not isinstance(v, int):
                if float(v).is_integer():
                    v = int(v)
                else:
                    raise ConfigError(f"{where}.{k} must be an integer, got {v!r}")
            v = type(default)(v)
        setattr(obj, k, v)
    return obj
