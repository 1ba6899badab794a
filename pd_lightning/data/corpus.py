"""synthworld: the built-in, offline, deterministic corpus of pd-lightning.

A seeded *world* (people, cities, animal species, with attributes = facts) drives an English-like
text generator. Documents of several kinds are mixed by weight:

- stories from a stochastic grammar: many slots have several plausible fillers with skewed
  weights (real, often multi-modal next-token entropy, which a teacher's soft distribution
  conveys better than one sampled token), and entities introduced early (pet name, found object,
  home city, pronoun) are used again later (long-range copying);
- encyclopedic entries about people, cities and species in several paraphrases (memorising
  ~1-2k facts needs capacity, so bigger models win); people follow a Zipf-like popularity;
- arithmetic with small operands ("17 plus 25 is 42.") and word problems;
- question/answer dialogues and packing lists.

Document ``i`` of a split is a pure function of ``(seed, split, i)``: each document has its own
``random.Random`` seeded from a SHA-256 of that key and only ``Random.random()`` is used, so the
text is identical across machines and Python versions and any document can be regenerated
alone (parallel generation = disjoint id ranges). The train and held-out splits hash different
keys, so they are disjoint streams of documents; the facts are the world's knowledge and are
shared by both. Eval items (multiple choice, lm-eval style) come from a third, never-trained
stream of held-out stories and from the world's facts.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")
EVAL_TASKS: tuple[str, ...] = ("synth_continuation", "synth_facts", "synth_arithmetic")


# ----------------------------------------------------------------------------------------------
# Deterministic randomness


class Rng:
    """A random stream keyed by a tuple; only ``random()`` is used, so it is version-stable."""

    def __init__(self, *key: object):
        digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode()).digest()
        # An int seed goes through init_by_array, which has not changed since Python 3.2;
        # Random.choice/sample/choices have changed across versions, so we never call them.
        self.random = random.Random(int.from_bytes(digest[:8], "little")).random

    def below(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        return int(self.random() * n)

    def pick(self, seq: Sequence):
        """Uniform element of a non-empty sequence."""
        return seq[int(self.random() * len(seq))]

    def chance(self, p: float) -> bool:
        """True with probability p."""
        return self.random() < p

    def wpick(self, opts: Options) -> str:
        """Element of a weighted option list."""
        return opts.items[bisect.bisect_right(opts.cum, self.random() * opts.cum[-1])]

    def shuffled(self, seq: Sequence) -> list:
        """A Fisher-Yates shuffled copy."""
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = int(self.random() * (i + 1))
            out[i], out[j] = out[j], out[i]
        return out

    def sample(self, seq: Sequence, k: int) -> list:
        """k distinct elements (partial Fisher-Yates)."""
        out = list(seq)
        k = min(k, len(out))
        for i in range(k):
            j = i + int(self.random() * (len(out) - i))
            out[i], out[j] = out[j], out[i]
        return out[:k]


class Options:
    """A weighted list of fillers for one grammar slot, written compactly as "word:weight ..."."""

    def __init__(self, spec: str):
        pairs = [tok.partition(":") for tok in spec.split()]
        self._set([w.replace("_", " ") for w, _, _ in pairs], [float(x or 1) for _, _, x in pairs])

    @classmethod
    def from_weights(cls, items: Sequence[str], weights: Sequence[float]) -> Options:
        """Options from parallel lists of fillers and weights."""
        self = cls.__new__(cls)
        self._set(list(items), list(weights))
        return self

    def _set(self, items: list[str], weights: list[float]) -> None:
        self.items = items
        self.cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)


def _an(word: str) -> str:
    """English indefinite article for a word."""
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------
# The world: entities and facts

JOBS = ("baker farmer teacher doctor painter sailor miller potter singer tailor hunter builder "
        "fisher writer cook guard nurse driver weaver smith gardener merchant carpenter shepherd "
        "dancer poet judge pilot barber butcher").split()
FOODS = ("bread soup cheese apples honey rice fish cake plums pears beans eggs pie nuts berries "
         "carrots milk jam noodles porridge").split()
COLOURS = "red blue green yellow white black brown grey pink purple orange silver".split()
OBJECTS = ("ball cup hat box key book lamp coin ring kite shoe bell stone feather map spoon "
           "basket drum candle rope shell flute scarf bottle").split()
SPECIES = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "owl": "hoo",
           "sheep": "baa", "goat": "meh", "horse": "neigh", "frog": "ribbit", "mouse": "squeak",
           "pig": "oink", "hen": "cluck", "crow": "caw", "fox": "yip", "bee": "buzz",
           "lion": "roar", "snake": "hiss", "wolf": "howl"}
HABITATS = "forest farm river hills meadow pond barn cave garden field marsh mountains".split()
DIETS = "seeds grass fish berries nuts mice corn leaves insects honey roots worms".split()
REGIONS = "north south east west centre coast".split()
PLACES = ("market river forest park hill beach farm library garden bridge harbour mill square "
          "meadow lake village").split()

_ONSETS = "b d f g k l m n p r s t v z br tr st kl sh th dr gr".split()
_VOWELS = "a e i o u a e i o ai ea oo".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "k", "nd"]
_CITY_SUFFIX = "ton ford by holm wick dale mere stead".split()
_PET_ENDS = "p x ky ty bo zz sy".split()  # short, toy-like names, unlike people's


@dataclass(frozen=True)
class Person:
    """One person of the world and the facts about them."""

    name: str
    pronoun: str  # "she" or "he"
    city: str
    job: str
    food: str
    colour: str
    age: int
    friend: str


@dataclass(frozen=True)
class City:
    """One city: region, river and what it is known for."""

    name: str
    region: str
    river: str
    known_for: str


@dataclass(frozen=True)
class Species:
    """One animal species: its sound, habitat and diet."""

    name: str
    sound: str
    habitat: str
    diet: str


@dataclass(frozen=True)
class World:
    """The seeded entities and facts shared by every split of the corpus."""

    seed: int
    people: tuple[Person, ...]
    cities: tuple[City, ...]
    species: tuple[Species, ...]
    pet_names: tuple[str, ...]
    max_operand: int
    popularity: Options = field(compare=False)  # person names weighted: few famous, most rare
    _people: dict[str, Person] = field(init=False, repr=False, compare=False)
    _cities: dict[str, City] = field(init=False, repr=False, compare=False)
    _residents: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Name lookups are on the hot path of generation; build them once (frozen, so setattr).
        residents: dict[str, list[str]] = {}
        for p in self.people:
            residents.setdefault(p.city, []).append(p.name)
        object.__setattr__(self, "_people", {p.name: p for p in self.people})
        object.__setattr__(self, "_cities", {c.name: c for c in self.cities})
        object.__setattr__(self, "_residents", residents)

    @classmethod
    def build(cls, seed: int = 0, *, n_people: int = 200, n_cities: int = 24,
              n_pet_names: int = 60, max_operand: int = 30, zipf_offset: float = 10.0) -> World:
        """Build the world of a seed; sizes trade how much there is to memorise for learnability."""
        from pd_lightning.errors import ConfigError

        sizes = dict(n_people=n_people, n_cities=n_cities, n_pet_names=n_pet_names, max_operand=max_operand)
        limits = dict(n_people=(8, 20000), n_cities=(4, 500), n_pet_names=(4, 300), max_operand=(4, 1000))
        for k, v in sizes.items():
            lo, hi = limits[k]
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"synthworld {k}={v!r} is out of range; expected an integer in [{lo}, {hi}]")
        rng = Rng("pdl-synthworld-world", seed)
        taken = {w.lower() for w in (*JOBS, *FOODS, *COLOURS, *OBJECTS, *SPECIES, *HABITATS,
                                     *DIETS, *REGIONS, *PLACES, *_LEXICON)}

        def fresh(make) -> str:
            while True:
                name = make()
                if name.lower() not in taken and len(name) >= 3:
                    taken.add(name.lower())
                    return name

        def syllable() -> str:
            return rng.pick(_ONSETS) + rng.pick(_VOWELS) + rng.pick(_CODAS)

        person_names = [fresh(lambda: (syllable() + syllable()).capitalize()) for _ in range(n_people)]
        city_names = [fresh(lambda: (syllable() + rng.pick(_CITY_SUFFIX)).capitalize())
                      for _ in range(n_cities)]
        rivers = [fresh(lambda: (syllable() + rng.pick(["a", "e", "o"])).capitalize())
                  for _ in range(max(4, n_cities // 3))]
        pet_names = [fresh(lambda: (rng.pick(_ONSETS) + rng.pick(_VOWELS) + rng.pick(_PET_ENDS)).capitalize())
                     for _ in range(n_pet_names)]
        cities = tuple(City(c, rng.pick(REGIONS), rng.pick(rivers), rng.pick(FOODS + OBJECTS))
                       for c in city_names)
        people = []
        for i, name in enumerate(person_names):
            friend = person_names[(i + 1 + rng.below(n_people - 1)) % n_people]
            people.append(Person(name, rng.pick(["she", "he"]), rng.pick(city_names), rng.pick(JOBS),
                                 rng.pick(FOODS), rng.pick(COLOURS), 20 + rng.below(50), friend))
        species = tuple(Species(s, snd, rng.pick(HABITATS), rng.pick(DIETS)) for s, snd in SPECIES.items())
        # Zipf-like popularity: person r has weight 1/(r + offset); the offset keeps the head flat.
        pop = Options.from_weights(person_names, [1.0 / (r + zipf_offset) for r in range(n_people)])
        return cls(seed, tuple(people), cities, species, tuple(pet_names), max_operand, pop)

    def person(self, name: str) -> Person:
        """The person of a name."""
        return self._people[name]

    def city(self, name: str) -> City:
        """The city of a name."""
        return self._cities[name]

    def residents(self, city: str) -> list[str]:
        """Names of the people who live in a city, in world order."""
        return self._residents.get(city, [])

    def famous_person(self, rng: Rng) -> Person:
        """A person drawn by popularity."""
        return self.person(rng.wpick(self.popularity))

    def facts(self) -> Iterator[tuple[str, str, str]]:
        """All (subject, relation, object) facts of the world."""
        for p in self.people:
            for rel in ("city", "job", "food", "colour", "age", "friend"):
                yield p.name, rel, str(getattr(p, rel))
        for c in self.cities:
            yield c.name, "region", c.region
            yield c.name, "river", c.river
            yield c.name, "known_for", c.known_for
        for s in self.species:
            yield s.name, "habitat", s.habitat
            yield s.name, "diet", s.diet


@lru_cache(maxsize=8)
def _world(seed: int) -> World:
    return World.build(seed)


# ----------------------------------------------------------------------------------------------
# Grammar slots: skewed weights so the best next-token distribution is spread over a few words

_LEXICON = ("once upon time there was named lived who called in the had a an one with to went walked "
            "ran found saw bought picked up took and smiled laughed on way met from said asked they "
            "talked about hungry so ate some sky wind end back home gave very happy that night told "
            "all of is are works as favourite food colour years old lives city known for its river "
            "lies animal eats says plus minus more now has what where does how q a it his her").split()

TIME_ADJ = Options("sunny:5 rainy:3 cold:2 warm:2 windy:1 quiet:1 bright:1 grey:1")
TIME = Options("morning:5 day:4 afternoon:2 evening:2 night:1")
GO = Options("went:6 walked:3 ran:2 hurried:1 wandered:1")
FIND = Options("found:5 saw:3 bought:2 noticed:1 picked_up:1")
SMALL_ADJ = Options("little:5 old:3 small:3 happy:2 clever:2 lazy:1 brave:1 fluffy:1")
PERSON_ADJ = Options("kind:4 young:3 old:3 busy:2 quiet:2 cheerful:2 tired:1 clever:1")
REACT = Options("smiled:5 laughed:3 was_glad:2 clapped:1 sang_a_song:1 danced:1")
FEEL = Options("happy:6 glad:3 tired:2 surprised:2 proud:1 sleepy:1")
MOVE = Options("ran:4 jumped:3 played:3 slept:2 rolled_in_the_grass:1 chased_a_leaf:1")
HOW = Options("happily:4 quickly:3 slowly:2 all_day:2 for_a_while:1 again_and_again:1")
SKY = Options("blue:4 grey:3 clear:2 dark:1 pink:1")
WIND = Options("cold:3 soft:3 strong:2 warm:2")
SAY = Options("said:6 asked:2 called:1 shouted:1 whispered:1")
GREET = Options("hello:5 good_morning:3 how_are_you:2 nice_to_see_you:2 look_at_this:1")
TALK = Options("the_weather:4 the_market:2 their_work:3 old_times:2 the_river:1 food:2")
HOME_VERB = Options("went_back_home_to:5 walked_home_to:3 returned_to:2 hurried_home_to:1")
EAT = Options("ate_some:5 had_some:3 shared_some:1 cooked_some:1")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ----------------------------------------------------------------------------------------------
# Stories


@dataclass
class _StoryState:
    """The entities a story has introduced; the ending refers back to them."""

    hero: Person
    pet: str
    species: Species
    obj: str | None = None
    obj_colour: str | None = None
    friend: str | None = None


def _story_body(rng: Rng, world: World) -> tuple[list[str], _StoryState]:
    hero = world.famous_person(rng)
    pr = hero.pronoun
    sp = rng.pick(world.species)
    pet = rng.pick(world.pet_names)
    st = _StoryState(hero, pet, sp)
    out: list[str] = []
    form = rng.below(4)
    if form == 0:
        out.append(f"Once upon a time, there was {_an(hero.job)} {hero.job} named {hero.name}.")
        out.append(f"{_cap(pr)} lived in {hero.city}.")
    elif form == 1:
        out.append(f"{hero.name} was {_an(hero.job)} {hero.job} who lived in {hero.city}.")
    elif form == 2:
        adj = rng.wpick(PERSON_ADJ)
        out.append(f"There once lived {_an(adj)} {adj} {hero.job} called {hero.name} in {hero.city}.")
    else:
        out.append(f"In {hero.city} there lived {_an(hero.job)} {hero.job}. {_cap(pr)} was called {hero.name}.")
    adj = rng.wpick(SMALL_ADJ)
    out.append(f"{_cap(pr)} had {_an(adj)} {adj} {sp.name} named {pet}.")
    kinds = rng.shuffled(["trip", "friend", "food", "weather", "pet"])[: 2 + rng.below(3)]
    if "trip" not in kinds and rng.chance(0.7):
        kinds[0] = "trip"  # most stories find an object, which the ending can refer to
    for kind in kinds:
        name = hero.name if rng.chance(0.6) else _cap(pr)
        if kind == "trip":
            place = rng.pick(PLACES)
            out.append(f"One {rng.wpick(TIME_ADJ)} {rng.wpick(TIME)}, {hero.name} {rng.wpick(GO)} "
                       f"to the {place} with {pet}.")
            if st.obj is None:
                st.obj, st.obj_colour = rng.pick(OBJECTS), rng.pick(COLOURS)
                out.append(f"There {pr} {rng.wpick(FIND)} {_an(st.obj_colour)} {st.obj_colour} {st.obj}.")
                out.append(f"{name} picked up the {st.obj} and {rng.wpick(REACT)}.")
            else:
                out.append(f"{_cap(pr)} showed the {st.obj} to everyone at the {place}.")
        elif kind == "friend":
            # Mostly the hero's friend from the world, sometimes anyone: a skewed, fact-driven slot.
            fr = world.person(hero.friend if rng.chance(0.7) else world.famous_person(rng).name)
            if fr.name == hero.name:
                continue
            st.friend = fr.name
            out.append(f"On the way, {hero.name} met {fr.name}, {_an(fr.job)} {fr.job} from {fr.city}.")
            out.append(f"\"{_cap(rng.wpick(GREET))}, {fr.name}!\" {hero.name} {rng.wpick(SAY)}.")
            out.append(f"They talked about {rng.wpick(TALK)}.")
        elif kind == "food":
            food = hero.food if rng.chance(0.6) else rng.pick(FOODS)
            out.append(f"{name} was hungry, so {pr} {rng.wpick(EAT)} {food}.")
            if food == hero.food and rng.chance(0.5):
                out.append(f"The favourite food of {hero.name} is {food}.")
        elif kind == "weather":
            out.append(f"The sky was {rng.wpick(SKY)} and the wind was {rng.wpick(WIND)}.")
        else:
            out.append(f"{pet} {rng.wpick(MOVE)} {rng.wpick(HOW)}.")
            if rng.chance(0.5):
                out.append(f"\"{_cap(sp.sound)}!\" said {pet}, because {pet} was {_an(sp.name)} {sp.name}.")
    return out, st


def _ending_slots(st: _StoryState) -> list[str]:
    kinds = ["home"]
    if st.obj:
        kinds.append("give")
        if st.friend:
            kinds.append("tell")
    return kinds


def _ending(kind: str, verb: str, feel: str, hero: str, pet: str, city: str, obj: str, friend: str) -> str:
    """The closing sentence of a story; every slot is an entity the story introduced earlier."""
    if kind == "home":
        return f"In the end, {hero} and {pet} {verb} {city}."
    if kind == "give":
        return f"{hero} gave the {obj} to {pet}, and {pet} was very {feel}."
    return f"That night, {hero} told {friend} all about the {obj}."


def _story(rng: Rng, world: World) -> tuple[list[str], str, dict]:
    body, st = _story_body(rng, world)
    slots = dict(kind=rng.pick(_ending_slots(st)), verb=rng.wpick(HOME_VERB), feel=rng.wpick(FEEL),
                 hero=st.hero.name, pet=st.pet, city=st.hero.city, obj=st.obj or "", friend=st.friend or "")
    return body, _ending(**slots), slots


def _doc_story(rng: Rng, world: World) -> str:
    body, end, _ = _story(rng, world)
    return " ".join(body + [end])


# ----------------------------------------------------------------------------------------------
# Encyclopedic entries, arithmetic, dialogue, lists

# Paraphrases of each person fact; the first of each is the cloze form used by synth_facts.
_PERSON_FACT = {
    "city": ["{n} lives in {v}.", "The home of {n} is {v}.", "{n} is from {v}.", "{n} has a house in {v}."],
    "job": ["{n} works as {a} {v}.", "{n} is {a} {v}.", "The job of {n} is {v}.", "By trade, {n} is {a} {v}."],
    "food": ["The favourite food of {n} is {v}.", "{n} likes {v} more than any other food.",
             "{n} loves to eat {v}."],
    "colour": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.",
               "{n} always wears something {v}."],
    "age": ["{n} is {v} years old.", "The age of {n} is {v}.", "{n} is {v}."],
    "friend": ["The best friend of {n} is {v}.", "{n} is good friends with {v}.", "{n} often visits {v}."],
}


def _person_sentence(rng: Rng, p: Person, rel: str, use_pronoun: bool) -> str:
    v = str(getattr(p, rel))
    s = rng.pick(_PERSON_FACT[rel]).format(n=p.name, v=v, a=_an(v))
    if use_pronoun and s.startswith(p.name + " "):
        s = _cap(p.pronoun) + s[len(p.name):]
    return s


def _doc_person(rng: Rng, world: World) -> str:
    out = []
    for _ in range(1 + rng.below(2)):
        p = world.famous_person(rng)
        rels = rng.shuffled(list(_PERSON_FACT))[: 4 + rng.below(3)]
        # Name the subject first; later sentences sometimes use the pronoun (coreference).
        out += [_person_sentence(rng, p, r, use_pronoun=i > 0 and rng.chance(0.4)) for i, r in enumerate(rels)]
    return " ".join(out)


def _doc_almanac(rng: Rng, world: World) -> str:
    """A city entry, some of its residents, and an animal of the region (knowledge in prose)."""
    c = rng.pick(world.cities)
    city = [rng.pick([f"{c.name} lies on the river {c.river}.", f"The river {c.river} runs through {c.name}."]),
            rng.pick([f"{c.name} is known for its {c.known_for}.", f"People come to {c.name} for its {c.known_for}."])]
    out = [f"{c.name} is a city in the {c.region}."] + rng.shuffled(city)
    res = world.residents(c.name)
    if res:
        names = rng.sample(res, min(len(res), 2 + rng.below(3)))
        who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        out.append(f"People who live in {c.name} include {who}.")
        for n in names:
            p = world.person(n)
            out.append(_person_sentence(rng, p, rng.pick(["job", "food", "colour", "age", "friend"]), False))
    s = rng.pick(world.species)
    animal = [f"The {s.name} eats {s.diet}.", f"{_cap(_an(s.name))} {s.name} says \"{s.sound}\"."]
    out += [f"Near {c.name} you can see {_an(s.name)} {s.name}, an animal that lives in the {s.habitat}."]
    out += rng.shuffled(animal)
    return " ".join(out)


def _sum(rng: Rng, world: World) -> tuple[int, str, int, int]:
    m = world.max_operand
    a, b = rng.below(m), rng.below(m)
    if rng.chance(0.5):
        return a, "plus", b, a + b
    a, b = max(a, b), min(a, b)  # no negative results
    return a, "minus", b, a - b


def _doc_arithmetic(rng: Rng, world: World) -> str:
    lines = []
    for _ in range(3 + rng.below(6)):
        a, op, b, c = _sum(rng, world)
        if op == "plus" and rng.chance(0.25):
            p = world.famous_person(rng)
            o = rng.pick(OBJECTS)
            lines.append(f"{p.name} had {a} {o}s and got {b} more, so now {p.pronoun} has {c} {o}s.")
        else:
            lines.append(f"{a} {op} {b} is {c}.")
    return "\n".join(lines)


_QUESTION = {
    "city": "Where does {n} live?", "job": "What does {n} do?", "food": "What is the favourite food of {n}?",
    "colour": "What is the favourite colour of {n}?", "age": "How old is {n}?",
    "friend": "Who is the best friend of {n}?",
}


def _doc_dialogue(rng: Rng, world: World) -> str:
    lines = []
    for _ in range(3 + rng.below(4)):
        if rng.chance(0.2):
            a, op, b, c = _sum(rng, world)
            lines += [f"Q: What is {a} {op} {b}?", f"A: {a} {op} {b} is {c}."]
            continue
        p = world.famous_person(rng)
        rel = rng.pick(list(_QUESTION))
        lines += [f"Q: {_QUESTION[rel].format(n=p.name)}", f"A: {_person_sentence(rng, p, rel, False)}"]
    return "\n".join(lines)


def _doc_list(rng: Rng, world: World) -> str:
    p = world.famous_person(rng)
    items = [f"{c} {o}" for c, o in zip(rng.sample(COLOURS, 4), rng.sample(OBJECTS, 4))][: 2 + rng.below(3)]
    listed = ", ".join(f"{_an(i)} {i}" for i in items[:-1]) + f" and {_an(items[-1])} {items[-1]}"
    back = rng.pick(items)
    return (f"{p.name} packed a bag for the trip to {p.city}: {listed}. Later, {p.pronoun} took out the "
            f"{back}. The {back.split()[1]} was {back.split()[0]}.")


# Document kinds and their mixing weights (stories carry the entropy, entries the knowledge).
DOC_KINDS: dict[str, tuple[float, object]] = {
    "story": (0.40, _doc_story),
    "person": (0.18, _doc_person),
    "almanac": (0.07, _doc_almanac),
    "arithmetic": (0.12, _doc_arithmetic),
    "dialogue": (0.15, _doc_dialogue),
    "list": (0.08, _doc_list),
}
_KIND_OPTS = Options(" ".join(f"{k}:{w}" for k, (w, _) in DOC_KINDS.items()))


# ----------------------------------------------------------------------------------------------
# Public API


def document(split: Split, i: int, *, seed: int = 0) -> str:
    """Document i of a split: a pure function of (seed, split, i)."""
    if split not in SPLITS:
        from pd_lightning.errors import choice_error
        raise choice_error("split", split, SPLITS)
    rng = Rng("pdl-synthworld-doc", seed, split, i)
    return DOC_KINDS[rng.wpick(_KIND_OPTS)][1](rng, _world(seed))


def iter_documents(split: Split, *, seed: int = 0, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Stream documents start, start+1, ... (forever if stop is None) of a split."""
    i = start
    while stop is None or i < stop:
        yield document(split, i, seed=seed)
        i += 1


def heldout_texts(n: int, seed: int = 0) -> list[str]:
    """The first n held-out documents, for held-out perplexity."""
    return list(iter_documents("heldout", seed=seed, stop=n))


def _item_continuation(rng: Rng, world: World) -> dict:
    body, _, s = _story(rng, world)
    mentioned = set(" ".join(body).replace(".", " ").replace(",", " ").replace("!", " ").replace('"', " ").split())
    slots = {"home": ["hero", "pet", "city"], "give": ["hero", "pet", "obj"], "tell": ["hero", "friend", "obj"]}[s["kind"]]
    slot = rng.pick(slots)
    # Distractors swap the same entity slot for one the story never mentioned (fluent, but
    # inconsistent with the story), drawn from the same distribution as the true filler, so a
    # model with only a length or frequency bias (e.g. a random one) stays at chance.
    draw = {"hero": lambda: world.famous_person(rng).name, "friend": lambda: world.famous_person(rng).name,
            "pet": lambda: rng.pick(world.pet_names), "city": lambda: world.famous_person(rng).city,
            "obj": lambda: rng.pick(OBJECTS)}[slot]
    fillers = [s[slot]]
    for _ in range(1000):  # the world's minimum sizes leave enough alternatives
        alt = draw()
        if alt not in mentioned and alt not in fillers:
            fillers.append(alt)
            if len(fillers) == 4:
                break
    return _mc(rng, " ".join(body), [" " + _ending(**{**s, slot: f}) for f in fillers])


# Cloze forms of the first paraphrase of each person fact: (context, answer); the article of a
# job belongs to the answer so the context does not leak whether the job starts with a vowel.
_FACT_CLOZE = {
    "city": ("{n} lives in", " {v}."), "job": ("{n} works as", " {a} {v}."),
    "food": ("The favourite food of {n} is", " {v}."), "colour": ("The favourite colour of {n} is", " {v}."),
    "age": ("{n} is", " {v} years old."), "friend": ("The best friend of {n} is", " {v}."),
}


def _item_fact(rng: Rng, world: World) -> dict:
    p = world.famous_person(rng)
    rel = rng.pick(list(_FACT_CLOZE))
    pools = {"city": [c.name for c in world.cities], "job": JOBS, "food": FOODS, "colour": COLOURS,
             "age": [str(a) for a in range(20, 70)], "friend": [q.name for q in world.people if q.name != p.name]}
    true = str(getattr(p, rel))
    others = [v for v in rng.sample(pools[rel], 4) if v != true][:3]
    context, answer = _FACT_CLOZE[rel]
    return _mc(rng, context.format(n=p.name), [answer.format(v=v, a=_an(v)) for v in [true, *others]])


def _item_arithmetic(rng: Rng, world: World) -> dict:
    a, op, b, c = _sum(rng, world)
    # One near miss, one off by ten, one anywhere in range: plausible numbers, one right answer.
    wrong = [c + rng.pick([-2, -1, 1, 2]) if c >= 2 else c + 1 + rng.below(2), c - 10 if c >= 10 else c + 10]
    while len(wrong) < 3:
        w = rng.below(2 * world.max_operand)
        if w != c and w not in wrong:
            wrong.append(w)
    return _mc(rng, f"{a} {op} {b} is", [f" {v}." for v in [c, *wrong]])


def _mc(rng: Rng, context: str, choices: list[str]) -> dict:
    """Shuffle choices (the first is correct) into a {"context","choices","label"} item."""
    order = rng.shuffled(range(len(choices)))
    return {"context": context, "choices": [choices[j] for j in order], "label": order.index(0)}


_ITEM_MAKERS = {"synth_continuation": _item_continuation, "synth_facts": _item_fact,
                "synth_arithmetic": _item_arithmetic}


def make_eval_items(task: str, n: int, seed: int = 0) -> list[dict]:
    """n multiple-choice items {"context", "choices", "label"} of a task for the corpus of a seed."""
    if task not in _ITEM_MAKERS:
        from pd_lightning.errors import choice_error
        raise choice_error("task", task, EVAL_TASKS)
    world = _world(seed)
    # Items live in their own stream (never in train or heldout_texts); item i depends only on i.
    return [_ITEM_MAKERS[task](Rng("pdl-synthworld-eval", seed, task, i), world) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# In-context copying probe (lm-eval task icl_copy_*): a span that reappears later in the context

COPY_KINDS: tuple[str, ...] = ("random", "natural")
# Words the corpus uses everywhere, so each is a short known token sequence, and none is predictable
# from the others when drawn in random order: only copying the first occurrence predicts them.
_COPY_WORDS = tuple(dict.fromkeys([*JOBS, *FOODS, *COLOURS, *OBJECTS, *PLACES, *SPECIES, *HABITATS]))
COPY_DOC_OFFSET = 1_000_000  # held-out documents this far in: never the held-out shards' or synth_heldout's


def _copy_words(rng: Rng, seed: int, doc: int, n: int) -> list[str]:
    """n consecutive words of a held-out document (from a random start; documents shorter than n are skipped)."""
    while True:
        words = document("heldout", COPY_DOC_OFFSET + doc, seed=seed).split()
        if len(words) >= n:
            start = rng.below(len(words) - n + 1)
            return words[start:start + n]
        doc += 7919  # a prime stride: another document of the same stream


COPY_POOL_DOCS = 3000  # held-out documents whose word runs the natural spans and their distractors come from


@lru_cache(maxsize=4)
def _continuations(seed: int, cue: int, rest: int) -> tuple[list[list[str]], dict[tuple[str, ...], list[tuple[int, int]]]]:
    """The pool's documents as words, and every cue (`cue` words) -> the (document, position) of each occurrence
    followed by at least `rest` words."""
    docs = [document("heldout", 2 * COPY_DOC_OFFSET + j, seed=seed).split() for j in range(COPY_POOL_DOCS)]
    index: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for d, words in enumerate(docs):
        for p in range(len(words) - cue - rest + 1):
            index.setdefault(tuple(words[p:p + cue]), []).append((d, p))
    return docs, index


def _natural_span(rng: Rng, seed: int, cue: int, rest: int, before: int, after: int):
    """A natural span in its own document: (the `before` words before it, cue, 4 continuations, gold index,
    the `after` words after it). The cue (`cue` words) is a run of the pool; the 4 distinct continuations
    (`rest` words each) follow it somewhere in the pool, each drawn like the pool's text (an occurrence
    uniformly, so by frequency); the gold one is drawn uniformly among them, and the span cue + gold
    is taken, with its neighbours, from a document where it occurs."""
    docs, index = _continuations(seed, cue, rest)
    keys = list(index)
    while True:
        places = index[keys[rng.below(len(keys))]]
        found: dict[tuple[str, ...], tuple[int, int]] = {}
        for _ in range(200):  # a cue with at least 4 different continuations is common in this grammar
            d, p = places[rng.below(len(places))]
            run = tuple(docs[d][p + cue:p + cue + rest])
            if run not in found and p >= before and len(docs[d]) >= p + cue + rest + after:
                found[run] = (d, p)
                if len(found) == 4:
                    runs = list(found)
                    gold = rng.below(4)
                    d, p = found[runs[gold]]
                    words = docs[d]
                    return (words[p - before:p], words[p:p + cue], [list(r) for r in runs], gold,
                            words[p + cue + rest:p + cue + rest + after])


def make_copy_items(kind: str, n: int, seed: int = 0, *, span_words: int = 6, cue_words: int = 2,
                    prefix_words: int = 8, gap_words: int = 5) -> list[dict]:
    """n multiple-choice items {"context", "choices", "label"} of the copying probe (4 choices).

    Item i (a pure function of kind, i and seed) has the context `prefix S gap S[:cue]`: S = cue +
    the gold continuation is a span of `span_words` words that reappears, and the choices are 4
    continuations of the cue, `span_words − cue_words` words each, the gold one drawn uniformly
    among them. For kind "random", the cue and the 4 continuations are corpus nouns drawn
    uniformly and independently, and prefix and gap are runs of other held-out documents: only
    copying S's first occurrence beats chance (25%), whatever the model's language model. For
    "natural", S sits in its own held-out document (prefix: the words before it, gap: the words
    after it) and the 4 continuations are different word runs that follow the same cue in a pool of
    held-out documents: equally plausible after the cue alone (a model that ignores the context
    scores 25% in expectation), so a model beats chance by using the context — S's first
    occurrence and the entities its document mentions.
    """
    if kind not in COPY_KINDS:
        from pd_lightning.errors import choice_error
        raise choice_error("kind", kind, COPY_KINDS)
    if not 0 < cue_words < span_words:
        raise ValueError(f"cue_words={cue_words} must be in [1, span_words={span_words})")
    rest = span_words - cue_words
    items = []
    for i in range(n):
        rng = Rng("pdl-synthworld-copy", seed, kind, i)
        if kind == "random":
            prefix = _copy_words(rng, seed, 2 * i, prefix_words) if prefix_words else []
            gap = _copy_words(rng, seed, 2 * i + 1, gap_words)
            cue = [rng.pick(_COPY_WORDS) for _ in range(cue_words)]
            runs = [[rng.pick(_COPY_WORDS) for _ in range(rest)] for _ in range(4)]
            gold = rng.below(4)
        else:
            prefix, cue, runs, gold, gap = _natural_span(rng, seed, cue_words, rest, prefix_words, gap_words)
        context = " ".join(prefix + cue + runs[gold] + gap + cue)
        items.append({"context": context, "choices": [" " + " ".join(r) for r in runs], "label": gold})
    return items
