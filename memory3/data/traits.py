"""A registry of made-up people and their 32 traits: a world whose text is mostly knowledge.

Each person has a name nobody can guess (random syllables) and, for each of 32 traits (fruit,
tree, bird, metal, ...), one of that trait's own 12 words drawn at random, so without memory no
model beats log(12) = 2.5 nats on a value. A person's text states every trait in a fixed order,
four to a sentence:

    Nenobo has fruit peach tree elm bird robin metal bronze. Nenobo has stone slate ...

so ~60% of a held-out person's loss is values only the bank holds (the rest: the name's first
mention, chunk 0). The text runs over ~2 chunks of 64 tokens and names the person in every
sentence, so the chunk before a value (the causal retrieval query) is about the same person.

The knowledge base holds each person's traits in `n_records` records: record j holds traits j,
j + n_records, ... in reverse order and ends with the name ("sea walrus ... fruit peach of
Nenobo"), so a record is not a copy of the text (the evaluation overlap filter reads it). The name
is last: written first, its pieces took half of what top-8 keeps, and the same run read 3-4x less.
`labelled` writes "trait value" pairs instead of bare values: with `model.token_shift` a kept
value's key then holds its trait, and reading is copying (the value after the same word), which a
small model learns; matching a trait to bare values of its kind it did not learn
(bench/RESULTS.md, traits_reading).
`preamble` puts each warmup person's records in front of their text: the warmup then learns to
look values up in its context, the same lookup that reading memory is.

Three disjoint groups of people: `warm` (text only), `train` (text and bank: continual training
learns to read) and `heldout` (bank only: evaluation). Used by `memory3 quickstart` and
bench/traits_reading.py.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TRAITS: dict[str, str] = {
    "fruit": "apple pear plum cherry mango lemon peach grape melon fig lime apricot",
    "tree": "oak pine birch maple willow cedar elm ash beech poplar spruce alder",
    "bird": "heron owl crow swan eagle robin sparrow hawk finch raven stork wren",
    "metal": "tin iron copper silver gold lead zinc nickel bronze brass steel cobalt",
    "stone": ("granite marble slate flint quartz basalt "
              "chalk sandstone limestone shale pumice gravel"),
    "colour": "red blue green yellow white black grey orange purple brown pink violet",
    "animal": "horse sheep goat cow pig dog cat fox wolf bear deer rabbit",
    "fish": "trout salmon pike carp cod eel tuna perch herring sole bass mackerel",
    "flower": "rose tulip lily daisy iris poppy orchid lotus aster peony dahlia crocus",
    "instrument": "piano violin flute drum harp guitar cello trumpet organ oboe banjo lute",
    "sport": "tennis rugby golf rowing fencing boxing hockey cricket skiing sailing archery polo",
    "dish": "soup stew bread pie cake rice pasta salad curry porridge pudding omelette",
    "drink": "tea coffee milk cider wine beer juice cocoa water lemonade brandy rum",
    "spice": "pepper salt ginger cinnamon saffron nutmeg clove mustard cumin vanilla mint thyme",
    "fabric": "wool silk linen cotton velvet leather felt lace denim tweed satin canvas",
    "tool": "hammer saw chisel drill axe spade rake wrench pliers ladder shovel anvil",
    "vehicle": "cart wagon sled barge canoe bicycle carriage tram ferry raft coach yacht",
    "month": ("january february march april may june "
              "july august september october november december"),
    "weather": "rain snow fog wind hail storm frost thunder sunshine drizzle mist sleet",
    "insect": "bee ant moth wasp beetle fly locust termite flea midge gnat mantis",
    "gem": "diamond emerald sapphire pearl topaz ruby opal jade garnet onyx amethyst coral",
    "shape": "circle square triangle star cross arrow spiral crescent oval hexagon ring heart",
    "game": ("cards dice dominoes marbles darts bingo "
             "riddles checkers charades quoits hopscotch skittles"),
    "dance": "waltz tango polka jig reel samba salsa minuet ballet foxtrot mazurka rumba",
    "cheese": ("brie cheddar gouda feta stilton edam "
               "parmesan camembert ricotta mozzarella gruyere halloumi"),
    "herb": ("basil parsley sage rosemary dill chives "
             "oregano tarragon fennel lovage sorrel chervil"),
    "vegetable": "carrot potato onion cabbage leek turnip bean pea radish celery beet spinach",
    "nut": ("almond walnut hazelnut pecan cashew pistachio "
            "chestnut peanut acorn coconut macadamia brazil"),
    "trade": ("baker sailor painter merchant teacher miner "
              "doctor weaver poet judge carpenter farmer"),
    "building": "tower castle mill barn chapel cottage lighthouse palace temple cabin hut inn",
    "furniture": "table chair bed desk sofa stool bench shelf wardrobe cupboard lamp clock",
    "sea": "whale dolphin seal octopus crab lobster shark squid oyster starfish jellyfish walrus",
}
VALUES = {trait: words.split() for trait, words in TRAITS.items()}
SYLLABLES = ("ba be bo da de di do fa fe ga go ka ke ki ko la le li lo ma me mi mo na ne ni no "
             "pa pe ra re ri ro sa se si so ta te ti to va ve vi za zo").split()
PER_SENTENCE = 4
# A person's opening sentences (`intro`, by name): a chunk reads what the chunk before it
# retrieved, so a value is read with its person's records only once the chunk before is mostly
# about that person. Without one, ~60% of the values after chunk 0 sat in chunks that had read
# the previous person's records (a person's text is ~1.5 chunks). "listed" avoids "of Name",
# the way records end.
INTROS = {
    "entry": ("This is the registry entry of {name}. It lists every trait of {name} in the same "
              "order as all the other entries, four traits to a sentence."),
    "listed": ("{name} is in the registry. Like every entry, it lists thirty-two traits in the "
               "same order, four traits to a sentence."),
}


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        if name not in used:
            used.add(name)
            return name


def person_text(name: str, values: dict[str, str]) -> str:
    """The text about one person: every trait in TRAITS order, four to a sentence."""
    items = [f"{t} {values[t]}" for t in TRAITS]
    return " ".join(f"{name} has " + " ".join(items[i:i + PER_SENTENCE]) + "."
                    for i in range(0, len(items), PER_SENTENCE))


def person_records(name: str, values: dict[str, str], n_records: int,
                   labelled: bool = False, named: bool = True) -> list[str]:
    """The person's values in `n_records` records: record j holds traits j, j + n_records, ...
    in reverse order (a registry's own order, so a record is not a copy of the text), then
    " of Name" if `named`."""
    words = [f"{t} {values[t]}" if labelled else values[t] for t in TRAITS]
    return [" ".join(reversed(words[j::n_records])) + (f" of {name}" if named else "")
            for j in range(n_records)]


def write_traits(out: str | Path, n_warm: int = 1500, n_train: int = 4000,
                 n_heldout: int = 200, seed: int = 0, n_records: int = 4,
                 preamble: bool = True, labelled: bool = False, intro: str = "",
                 named: bool = True) -> dict[str, Path]:
    """warm.txt, train.txt, heldout.txt (one person per paragraph) and knowledge.jsonl."""
    rng = random.Random(seed)
    used: set[str] = set()
    groups = {g: [_name(rng, used) for _ in range(n)]
              for g, n in (("warm", n_warm), ("train", n_train), ("heldout", n_heldout))}
    values = {n: {t: rng.choice(v) for t, v in VALUES.items()}
              for g in groups.values() for n in g}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for g, names in groups.items():
        paths[g] = out / f"{g}.txt"
        docs = [person_text(n, values[n]) for n in names]
        if g == "warm" and preamble:
            docs = [" ".join(person_records(n, values[n], n_records, labelled, named)) + ". " + d
                    for n, d in zip(names, docs)]
        if intro:  # before the preamble, which stays next to the values it gives
            docs = [INTROS[intro].format(name=n) + " " + d for n, d in zip(names, docs)]
        paths[g].write_text("\n\n".join(docs) + "\n")
    paths["knowledge"] = out / "knowledge.jsonl"
    with open(paths["knowledge"], "w") as f:
        for g in ("train", "heldout"):  # warm people are nowhere in the bank
            for n in groups[g]:
                for i, text in enumerate(person_records(n, values[n], n_records, labelled,
                                                        named)):
                    f.write(json.dumps({"id": f"{n.lower()}-{i}", "text": text}) + "\n")
    return paths
