"""A seeded fictional world: the embedded default corpus (no downloads needed).

Entities (people, cities, rivers, companies, elements, ships) get pronounceable names built
from random syllables, and facts whose values are drawn at random, so no model can guess them:
a fact is known only if it was read, either in training text or (later) from explicit memory.

Views of the same world:
  * corpus_documents()    - pretraining text: prose about the known entities, each fact
                            repeated in several templates, plus everyday filler sentences so the
                            language has breadth beyond the facts.
  * continual_documents() - prose about the `n_fresh` fresh entities (none by default), which the
                            corpus never names: text for continual training whose facts only the
                            bank holds, so reading memory pays while it is learnt. On the corpus it
                            would not: a small model memorises every corpus fact during warmup,
                            and memory has nothing to teach it there (bench/RESULTS.md, quickstart).
  * knowledge_documents() - the knowledge base: terse fact sheets (`sheets_per_entity` each),
                            worded differently from the corpus, so memory is not a copy of the text
                            (or records of `facts_per_record` facts, or `worded_records` in the
                            text's own sentences: variants bench/quickstart_variants.py compares).
  * heldout_documents()   - corpus-style prose about held-out entities, whose names and facts are
                            nowhere in the corpus: perplexity on it measures use of knowledge the
                            model has not memorised (the fact sheets hold it).
Entity-valued facts always point at known entities, so the corpus never names a held-out or fresh
one, while their values are names the model has seen (copyable from memory).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

# Schema: kind -> [(attribute, value type, fact-sheet label, "template|template|...")].
# Value types name another kind (the value is such an entity) or a generator below.
# {s} is the subject entity, {v} the value; several templates per attribute so the model
# learns the fact, not one string.
SCHEMA: dict[str, list[tuple[str, str, str, str]]] = {
    "person": [
        ("born", "year", "Year of birth",
         "{s} was born in {v}.|In {v}, {s} was born.|The records say that {s} was born in the year {v}."),
        ("birthplace", "city", "Birthplace",
         "{s} was born in the city of {v}.|{s} grew up in {v}.|The home town of {s} was {v}."),
        ("profession", "profession", "Occupation",
         "{s} worked as a {v}.|By trade, {s} was a {v}.|Everyone knew {s} as a skilled {v}."),
        ("employer", "company", "Employer",
         "{s} worked for {v} for many years.|{s} was employed by {v}.|For most of a career, {s} served {v}."),
        ("colour", "colour", "Favourite colour",
         "The favourite colour of {s} was {v}.|{s} always wore something {v}.|{s} loved the colour {v}."),
    ],
    "city": [
        ("founder", "person", "Founder",
         "{s} was founded by {v}.|{v} founded the city of {s}.|The founder of {s} was {v}."),
        ("founded", "year", "Year founded",
         "{s} was founded in {v}.|The city of {s} dates from {v}.|In {v}, the first houses of {s} were built."),
        ("population", "population", "Population",
         "{s} has a population of {v}.|About {v} people live in {s}.|The last count found {v} people in {s}."),
        ("river", "river", "River",
         "{s} lies on the river {v}.|The river {v} runs through {s}.|{s} was built on the banks of the {v}."),
        ("colour", "colour", "Flag colour",
         "The flag of {s} is {v}.|{s} flies a {v} flag.|People in {s} paint their doors {v}, like the city flag."),
    ],
    "river": [
        ("length", "length", "Length",
         "The {s} is {v} kilometres long.|The river {s} runs for {v} kilometres.|From source to sea, the {s} measures {v} kilometres."),
        ("source", "city", "Source near",
         "The {s} rises near {v}.|The source of the {s} is close to {v}.|The river {s} begins in the hills above {v}."),
        ("mapper", "person", "First mapped by",
         "The {s} was first mapped by {v}.|{v} drew the first map of the {s}.|The course of the {s} was charted by {v}."),
        ("colour", "colour", "Water colour",
         "The water of the {s} looks {v}.|The {s} is known for its {v} water.|Seen from above, the {s} is {v}."),
        ("fish", "animal", "Known for",
         "The {s} is full of {v}.|Fishermen on the {s} catch mostly {v}.|Many {v} live in the {s}."),
    ],
    "company": [
        ("founder", "person", "Founder",
         "{s} was founded by {v}.|{v} started the company {s}.|The founder of {s} was {v}."),
        ("headquarters", "city", "Headquarters",
         "{s} has its headquarters in {v}.|The main office of {s} is in {v}.|{s} is based in {v}."),
        ("founded", "year", "Year founded",
         "{s} was founded in {v}.|The company {s} opened in {v}.|{s} has been in business since {v}."),
        ("product", "product", "Main product",
         "{s} makes {v}.|The company {s} is known for its {v}.|Most of what {s} sells is {v}."),
        ("employees", "count", "Employees",
         "{s} employs {v} people.|About {v} people work for {s}.|The staff of {s} numbers {v}."),
    ],
    "element": [
        ("discoverer", "person", "Discovered by",
         "{s} was discovered by {v}.|{v} was the first to isolate {s}.|The discovery of {s} is credited to {v}."),
        ("year", "year", "Year of discovery",
         "{s} was discovered in {v}.|The element {s} has been known since {v}.|In {v}, {s} was described for the first time."),
        ("colour", "colour", "Colour",
         "Pure {s} is {v}.|The element {s} has a {v} colour.|A sample of {s} glows faintly {v}."),
        ("number", "atomic", "Atomic number",
         "The atomic number of {s} is {v}.|{s} has atomic number {v}.|{s} sits at number {v} in the table of elements."),
        ("mine", "city", "Mined near",
         "{s} is mined near {v}.|Most {s} comes from the mines of {v}.|The largest deposit of {s} lies under {v}."),
    ],
    "ship": [
        ("captain", "person", "Captain",
         "The captain of the {s} was {v}.|{v} commanded the ship {s}.|The {s} sailed under {v}."),
        ("port", "city", "Home port",
         "The home port of the {s} is {v}.|The ship {s} sails from {v}.|The {s} is registered in {v}."),
        ("launched", "year", "Launched",
         "The {s} was launched in {v}.|The ship {s} first sailed in {v}.|In {v}, the {s} left the shipyard."),
        ("builder", "company", "Built by",
         "The {s} was built by {v}.|{v} built the ship {s}.|The yards of {v} produced the {s}."),
        ("cargo", "product", "Cargo",
         "The {s} carries {v}.|The ship {s} is loaded with {v}.|The hold of the {s} is full of {v}."),
        ("colour", "colour", "Hull colour",
         "The hull of the {s} is painted {v}.|The {s} is a {v} ship.|You can spot the {s} by its {v} hull."),
    ],
}
# More people than anything else: most entity-valued attributes point at people.
KIND_CYCLE = ["person", "city", "person", "company", "river", "person", "element", "city", "ship"]

COLOURS = "red blue green yellow white black grey orange purple brown pink violet teal amber crimson silver golden indigo".split()
PROFESSIONS = ("baker", "sailor", "painter", "merchant", "teacher", "miner", "doctor", "weaver", "poet", "judge",
               "carpenter", "astronomer", "banker", "farmer", "singer", "engineer", "printer", "soldier", "potter")
ANIMALS = "trout salmon eels pike carp crabs otters herons frogs turtles".split()
PRODUCTS = ("lamps", "rope", "glass", "salt", "paper", "clocks", "wool", "copper wire", "soap", "tea",
            "bricks", "cheese", "medicine", "sails", "ink", "timber", "grain", "wine")
VALUES = {
    "year": lambda r: str(r.randint(1100, 1990)),
    "population": lambda r: f"{r.randint(2, 2000) * 1000 + r.randint(0, 9) * 100:,}",
    "length": lambda r: str(r.randint(40, 3200)),
    "count": lambda r: f"{r.randint(12, 90000):,}",
    "atomic": lambda r: str(r.randint(120, 260)),  # beyond real elements: not guessable
    "colour": lambda r: r.choice(COLOURS), "profession": lambda r: r.choice(PROFESSIONS),
    "animal": lambda r: r.choice(ANIMALS), "product": lambda r: r.choice(PRODUCTS),
}

# Connective prose around the facts (per document, not per fact).
INTROS = ["This is a short account of {s}.", "Much has been written about {s}.", "Here is what we know about {s}.",
          "The following notes concern {s}.", "Few travellers forget {s}.", "Let us turn to {s}."]
# Asides that name the entity between its facts: an account runs over several 64-token chunks and
# keeps its subject in each, as real articles do, so the chunk before a fact (the causal retrieval
# query) is about the entity the fact is about.
ASIDES = ["People in the region still talk about {s}.", "There are many stories about {s}.",
          "Not everyone agrees about {s}.", "Every old guidebook has a page on {s}.",
          "Some of this is still remembered about {s}.", "Visitors often ask about {s}.",
          "The archives say more about {s}."]
RECORD_FILLER = "alpha beta gamma delta omega sigma kappa theta lambda zeta".split()
OUTROS = ["Little else is known for certain.", "Historians still argue about the details.",
          "More can be found in the old archives.", "That is the story as it is usually told.", ""]
# Everyday filler: a small fixed vocabulary combined freely, for general English structure.
SUBJECTS = ("the baker", "my neighbour", "a small child", "the old teacher", "the farmer", "her brother", "the doctor",
            "a tired student", "the girl next door", "our grandmother", "the shopkeeper", "a young soldier", "the cook",
            "the fisherman", "my uncle", "the new priest", "an old friend", "the postman", "a clever boy")
ACTIONS = ("bought fresh bread", "read a long letter", "painted the fence", "fixed the broken chair", "cooked a large soup",
           "walked the dog", "wrote a short poem", "washed the windows", "planted some tomatoes", "sang an old song",
           "lost a key", "found a coin", "fed the chickens", "opened the shop", "carried a basket of apples",
           "mended a coat", "counted the sheep", "drank a cup of milk", "swept the floor", "told a funny story",
           "waited for the bus", "climbed the stairs", "sold three goats", "baked a cake", "watched the birds")
PLACES = ("at the market", "near the station", "in the garden", "by the bridge", "behind the school", "in the kitchen",
          "at the harbour", "on the hill", "in the library", "under the old tree", "beside the well",
          "in the town square", "at the inn", "on the porch", "near the river")
TIMES = ("In the morning", "After lunch", "On Sunday", "During the winter", "Late at night", "Before the rain",
         "Every evening", "Last summer", "At dawn", "Once a week", "On a quiet afternoon", "Yesterday",
         "In the spring", "At noon")
FEELINGS = ("happy", "tired", "hungry", "surprised", "quiet", "cheerful", "worried", "proud", "bored", "angry")
WEATHER = ("cold", "warm", "windy", "rainy", "sunny", "foggy", "bright", "grey")
FILLERS = ["{T}, {s} {a} {p}.", "{S} {a} {p}.", "It was {w}, so {s} {a}.", "{S} felt {f} and {a}.",
           "{T}, {s} {a}, and then {s2} {a2}.", "{S} said that {s2} {a2} {p}.", "Because it was {w}, {s} stayed {p}.",
           "Nobody knows why {s} {a} {p}.", "{S} was {f} because {s2} {a2}.", "When {s} {a}, {s2} was {f}.",
           "If the day is {w}, {s} will stay {p}.", "{S} never {a} {p} again."]

_ONSETS = "b d f g h k l m n p r s t v z br dr gr kr st th sk tr".split()
_VOWELS = "a e i o u a e o".split()
_CODAS = ["", "", "", "n", "l", "r", "s", "th", "k", "m", "nd"]
_VOCAB = {w.lower() for group in (COLOURS, PROFESSIONS, ANIMALS, PRODUCTS, SUBJECTS, ACTIONS, PLACES, TIMES)
          for phrase in group for w in phrase.split()}


@dataclass
class Fact:
    entity: str
    attribute: str
    value: str


@dataclass
class Entity:
    name: str
    kind: str
    heldout: bool = False
    fresh: bool = False  # named only by continual_documents() and the knowledge base
    pronoun: str = "it"


@dataclass
class World:
    entities: list[Entity]
    facts: list[Fact]
    seed: int = 0
    # Fact sheets per entity, each listing the facts in another order: several knowledge-base
    # records on one subject, as real knowledge bases have. A chunk retrieves 5 references; with
    # one sheet per entity 4 of them are other entities' sheets, with facts of the same types.
    sheets_per_entity: int = 1
    # Facts per knowledge record: 0 puts every fact of an entity in each sheet; k > 0 writes
    # records of k facts each instead (sheets_per_entity is then unused).
    facts_per_record: int = 0
    documents_per_fresh: int = 2  # continual documents per fresh entity
    # Records worded as the text is: one per fact and template, "<filler words> : <sentence>".
    worded_records: bool = False
    _by_entity: dict[str, list[Fact]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for f in self.facts:
            self._by_entity.setdefault(f.entity, []).append(f)

    def facts_of(self, entity: Entity | str) -> list[Fact]:
        return self._by_entity.get(entity if isinstance(entity, str) else entity.name, [])

    # ---- text generation; each view has its own string-seeded RNG, so call order never matters.
    def corpus_documents(self) -> list[str]:
        r = random.Random(f"{self.seed}/corpus")
        known = [e for e in self.entities if not (e.heldout or e.fresh)]
        docs = []
        for e in known:
            facts = self.facts_of(e)
            for rep in range(10):  # each fact lands in 7-8 of 10 documents, in varying templates
                subset = [f for j, f in enumerate(facts) if (rep + j) % 4 != 0]
                docs.append(self._profile(r, e, subset, n_filler=r.randint(0, 3)))
        for _ in range(4 * sum(not e.fresh for e in self.entities)):  # plain everyday stories
            docs.append(" ".join(_filler(r) for _ in range(r.randint(4, 9))))
        r.shuffle(docs)
        return docs

    def continual_documents(self) -> list[str]:
        r = random.Random(f"{self.seed}/continual")
        fresh = [e for e in self.entities if e.fresh]
        docs = [self._profile(r, e, self.facts_of(e), n_filler=r.randint(0, 1))
                for e in fresh for _ in range(self.documents_per_fresh)]
        docs += [" ".join(_filler(r) for _ in range(r.randint(4, 9)))
                 for _ in range(len(fresh) // 2)]
        r.shuffle(docs)
        return docs

    def knowledge_documents(self) -> list[str]:
        return [r["text"] for r in self.knowledge_records()]

    def knowledge_records(self) -> list[dict]:
        """knowledge.jsonl rows; id is '<kind>-<name>[-<part>]', unique because names are."""
        rows = []
        for e in self.entities:
            if self.worded_records:
                texts = self._worded_records(e)
            elif k := self.facts_per_record:
                facts = self.facts_of(e)
                texts = [self._fact_sheet(e, facts=facts[j:j + k]) for j in range(0, len(facts), k)]
            else:
                texts = [self._fact_sheet(e, i) for i in range(self.sheets_per_entity)]
            base = f"{e.kind}-{e.name.lower().replace(' ', '-')}"
            rows += [{"id": base + (f"-{i}" if len(texts) > 1 else ""), "text": text}
                     for i, text in enumerate(texts)]
        return rows

    def _worded_records(self, e: Entity) -> list[str]:
        # Filler words the text never uses keep a record's overlap with a document that states the
        # same sentence below the evaluation filter's 2/3 (as the fact world's records do).
        r = random.Random(f"{self.seed}/records/{e.name}")
        templates = {a: t.split("|") for a, _, _, t in SCHEMA[e.kind]}
        sentences = [_an(_cap(t.format(s=e.name, v=f.value)))
                     for f in self.facts_of(e) for t in templates[f.attribute]]
        return [f"{' '.join(r.sample(RECORD_FILLER, 6))} : {s}" for s in sentences]

    def heldout_documents(self) -> list[str]:
        r = random.Random(f"{self.seed}/heldout")
        return [self._profile(r, e, self.facts_of(e), n_filler=r.randint(0, 1))
                for e in self.entities if e.heldout for _ in range(2)]

    def _fact_sheet(self, e: Entity, rotate: int = 0, facts: list[Fact] | None = None) -> str:
        # Words only, no punctuation: a reference keeps its 8 most attended tokens per layer and
        # head, and punctuation draws attention (a sheet written "Label: value;" kept mostly
        # ":", ";" and "." and few values; bench/RESULTS.md quickstart).
        labels = {a: lab.lower() for a, _, lab, _ in SCHEMA[e.kind]}
        facts = self.facts_of(e) if facts is None else facts
        facts = facts[rotate % len(facts):] + facts[:rotate % len(facts)]
        items = " ".join(f"{labels[f.attribute]} {f.value}" for f in facts)
        return f"{e.name} {e.kind} {items}"

    def _profile(self, r: random.Random, e: Entity, facts: list[Fact], n_filler: int) -> str:
        templates = {a: t.split("|") for a, _, _, t in SCHEMA[e.kind]}
        facts = list(facts)
        r.shuffle(facts)
        out = [r.choice(INTROS).format(s=e.name)]
        for f in facts:
            t = r.choice(templates[f.attribute])
            # After the name is established, sentences opening with the subject may use a pronoun.
            use_pronoun = t.startswith("{s}") and r.random() < 0.3
            s = e.pronoun if use_pronoun else e.name
            out.append(_an(_cap(t.format(s=s, v=f.value))))
            if r.random() < 0.5:
                out.append(r.choice(ASIDES).format(s=e.name))
        for _ in range(n_filler):
            out.insert(r.randint(1, len(out)), _filler(r))
        out.append(r.choice(OUTROS))
        return " ".join(x for x in out if x)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _an(s: str) -> str:  # "a amber flag" -> "an amber flag"
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s)


def _filler(r: random.Random) -> str:
    s, s2 = r.sample(SUBJECTS, 2)
    t = r.choice(FILLERS)
    return _cap(t.format(T=r.choice(TIMES), s=s, S=_cap(s), s2=s2, a=r.choice(ACTIONS), a2=r.choice(ACTIONS),
                         p=r.choice(PLACES), w=r.choice(WEATHER), f=r.choice(FEELINGS)))


def _word(r: random.Random, used: set[str], syllables: tuple[int, int] = (2, 3)) -> str:
    while True:
        w = "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)
                    for _ in range(r.randint(*syllables))).capitalize()
        # Every name token is unique world-wide and not an English word from the filler vocabulary,
        # so a name in text identifies exactly one entity.
        if len(w) >= 4 and w.lower() not in used and w.lower() not in _VOCAB:
            used.add(w.lower())
            return w


def _entity(r: random.Random, used: set[str], kind: str, fresh: bool = False) -> Entity:
    if kind == "person":
        return Entity(f"{_word(r, used, (2, 2))} {_word(r, used)}", kind,
                      pronoun=r.choice(["he", "she"]), fresh=fresh)
    return Entity(_word(r, used) + ("ium" if kind == "element" else ""), kind, fresh=fresh)


def make_world(seed: int = 0, n_entities: int = 400, heldout_fraction: float = 0.1,
               n_fresh: int = 0, sheets_per_entity: int = 1, facts_per_record: int = 0,
               documents_per_fresh: int = 2, worded_records: bool = False) -> World:
    r = random.Random(seed)
    used: set[str] = set()
    entities = [_entity(r, used, KIND_CYCLE[i % len(KIND_CYCLE)]) for i in range(n_entities)]
    # Hold out the same fraction of every kind, keeping at least one known entity per kind
    # (entity-valued facts must point at known entities).
    for kind in SCHEMA:
        members = [e for e in entities if e.kind == kind]
        k = min(round(heldout_fraction * len(members)), max(len(members) - 1, 0))
        for e in r.sample(members, k):
            e.heldout = True
    known = {k: [e for e in entities if e.kind == k and not e.heldout] for k in SCHEMA}
    # Their own generator, after everything else is drawn: a world with fresh entities has the
    # same known and held-out entities as one without.
    r_fresh = random.Random(f"{seed}/fresh")
    entities += [_entity(r_fresh, used, KIND_CYCLE[i % len(KIND_CYCLE)], fresh=True)
                 for i in range(n_fresh)]
    facts = []
    for e in entities:
        attrs = SCHEMA[e.kind]
        keep = sorted(r.sample(range(len(attrs)), max(4, len(attrs) - r.randint(0, 1))))  # 4-6 attributes
        for a, vtype, _, _ in (attrs[i] for i in keep):
            if vtype in SCHEMA:
                pool = known[vtype] or [x for x in entities if x.kind == vtype and x is not e]
                value = r.choice(pool).name if pool else VALUES["colour"](r)
            else:
                value = VALUES[vtype](r)
            facts.append(Fact(e.name, a, value))
    return World(entities, facts, seed, sheets_per_entity, facts_per_record, documents_per_fresh,
                 worded_records)


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """corpus.txt / heldout.txt (and continual.txt with fresh entities): one document per
    paragraph, blank-line separated; knowledge.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.txt", "knowledge": out / "knowledge.jsonl", "heldout": out / "heldout.txt"}
    paths["corpus"].write_text("\n\n".join(world.corpus_documents()) + "\n", encoding="utf-8")
    paths["heldout"].write_text("\n\n".join(world.heldout_documents()) + "\n", encoding="utf-8")
    if any(e.fresh for e in world.entities):
        paths["continual"] = out / "continual.txt"
        paths["continual"].write_text("\n\n".join(world.continual_documents()) + "\n",
                                      encoding="utf-8")
    paths["knowledge"].write_text("".join(json.dumps(rec) + "\n" for rec in world.knowledge_records()),
                                  encoding="utf-8")
    return paths
