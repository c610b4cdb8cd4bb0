"""How hard a prompt is to render faithfully, as a score in [0, 1] with the features behind it.

Complex prompts (several subjects, counted objects, colours bound to objects, spatial
relations, text to render, style constraints) need stronger models; simple ones can go
to cheap, fast ones. :func:`score_prompt` is pure, deterministic, stdlib-only and linear
in the prompt's length (tens of microseconds for a typical prompt).

Features (:class:`ComplexityFeatures`), read from the lower-cased prompt with small
built-in lexicons (COCO's 80 classes plus a few hundred common image-prompt nouns, with
plural handling):

- ``subjects``: noun mentions that name something to draw ("three red apples" is one
  subject; "a dog and a cat" two). Multi-word names ("teddy bear", "wine glass") count
  once; in a compound ("apple tree") only the last noun counts. An unknown word that
  ends a noun phrase opened by "a", "the", a count, an attribute or a relation counts
  too ("a photo of a quokka").
- ``counts``: subjects with an explicit count: number words ("one" … "twenty", "thirty"
  …), digits, "a pair of", "a dozen", and vague quantifiers ("several", "many", "a group
  of"). ``count_values`` holds the numbers, 0 for a vague quantifier.
- ``attributes``: colour, material, size, texture, shape and mood words bound to a
  subject: before it in its noun phrase ("a red wooden table": 2) or after "is"/"are"
  ("the car is red"). Unbound ones ("red" alone) do not count.
- ``relations``: spatial relations ("left of", "above", "on top of", "next to",
  "behind", "on", "in", …) followed by a subject, plus layout phrases that need none
  ("in the background", "on the left").
- ``text_to_render``: quoted strings ("...", “...”, '...', «...») and unquoted text
  after "that says", "reads", "with the text", "the words", "labeled", ….
- ``style``: style constraints: media and genres ("oil painting", "watercolor",
  "anime"), "in the style of ...", realism, lens, camera and lighting terms
  ("photorealistic", "35mm", "bokeh", "golden hour", "cinematic lighting"). Adjacent
  style words form one constraint ("cinematic lighting" is 1, "oil painting, 8k" 2).
- ``words``: word count of the whole prompt.

Score: a weighted sum of saturating terms, ``sum(weight * min(1, feature / k))``, rounded
to 3 decimals (see :data:`WEIGHTS`; the weights sum to 1)::

    feature          weight  k (saturates at)
    subjects          0.20   3
    counts            0.15   1
    attributes        0.15   3
    relations         0.15   1
    text_to_render    0.15   1
    style             0.10   2
    words             0.10   40

Tiers: ``low`` below :data:`LOW_MAX` (0.35), ``high`` from :data:`HIGH_MIN` (0.7),
``medium`` between. "a photo of a cat" scores 0.079 (low); "three red apples on a wooden
table, a sign that says SALE, oil painting, in the style of Van Gogh" 0.9 (high). One
count or one relation already earns its full term: they are what image models fail at
most. On GenEval the mean score per tag is single_object 0.080 < colors 0.133 <
two_object 0.155 < counting 0.230 < color_attr 0.259 < position 0.306: the order in which
SDXL's accuracy falls on those tags in the GenEval paper (``benchmarks/complexity.py``
prints the means and the feature accuracy per tag).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "HIGH_MIN",
    "LOW_MAX",
    "WEIGHTS",
    "ComplexityFeatures",
    "PromptComplexity",
    "Tier",
    "extract_features",
    "score_prompt",
    "tier_of",
]

LOW_MAX: Final = 0.35
"""Scores below this are ``low``."""
HIGH_MIN: Final = 0.7
"""Scores from this up are ``high``."""

WEIGHTS: Final[dict[str, tuple[float, float]]] = {
    "subjects": (0.20, 3),
    "counts": (0.15, 1),
    "attributes": (0.15, 3),
    "relations": (0.15, 1),
    "text_to_render": (0.15, 1),
    "style": (0.10, 2),
    "words": (0.10, 40),
}
"""Feature name → (weight, saturation k): the feature contributes ``weight * min(1, value / k)``."""

Tier = Literal["low", "medium", "high"]


@dataclass(frozen=True, slots=True)
class ComplexityFeatures:
    """What the scorer found in a prompt (see the module docstring for each feature)."""

    subjects: int = 0
    counts: int = 0
    attributes: int = 0
    relations: int = 0
    text_to_render: int = 0
    style: int = 0
    words: int = 0
    count_values: tuple[int, ...] = field(default=())

    def terms(self) -> dict[str, float]:
        """Each feature's contribution to the score: ``weight * min(1, value / k)``."""
        return {name: w * min(1.0, getattr(self, name) / k) for name, (w, k) in WEIGHTS.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "subjects": self.subjects,
            "counts": self.counts,
            "attributes": self.attributes,
            "relations": self.relations,
            "text_to_render": self.text_to_render,
            "style": self.style,
            "words": self.words,
            "count_values": list(self.count_values),
        }


@dataclass(frozen=True, slots=True)
class PromptComplexity:
    """A prompt's complexity score in [0, 1], its tier and the features behind it."""

    score: float
    tier: Tier
    features: ComplexityFeatures

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "tier": self.tier,
            "features": self.features.to_dict(),
            "terms": {k: round(v, 4) for k, v in self.features.terms().items()},
        }


def tier_of(score: float) -> Tier:
    """The tier of a score: ``low`` < LOW_MAX <= ``medium`` < HIGH_MIN <= ``high``."""
    return "low" if score < LOW_MAX else "high" if score >= HIGH_MIN else "medium"


@functools.lru_cache(maxsize=4096)
def score_prompt(prompt: str) -> PromptComplexity:
    """Score a prompt's complexity; pure and deterministic (so repeated prompts are answered from a cache)."""
    features = extract_features(prompt)
    score = round(min(1.0, max(0.0, sum(features.terms().values()))), 3)
    return PromptComplexity(score=score, tier=tier_of(score), features=features)


# --- lexicons -----------------------------------------------------------------------------
# Multi-word entries join their words with "_".

_COCO = """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie
suitcase frisbee ski skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard
tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog
pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop computer_mouse mouse tv_remote
remote computer_keyboard keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors
teddy_bear hair_drier hair_dryer toothbrush"""

_NOUNS = """man woman boy girl child kid baby toddler teenager adult lady gentleman guy mother father mom dad
grandmother grandfather family friend student teacher doctor nurse chef cook farmer soldier knight king queen
prince princess wizard witch warrior samurai ninja pirate robot astronaut cowboy officer policeman firefighter
fireman worker businessman scientist artist painter musician guitarist dancer athlete player runner surfer
skier skateboarder cyclist rider driver pilot sailor fisherman monk priest nun bride groom angel demon ghost
zombie vampire alien monster dragon unicorn fairy elf dwarf giant mermaid superhero clown couple character
face hand eye hair beard arm leg foot head mouth nose ear wing tail paw horn
puppy kitten pony bull calf lamb goat pig piglet chicken hen rooster duck duckling goose swan parrot owl
eagle hawk falcon crow raven pigeon dove sparrow penguin flamingo peacock hummingbird seagull gull pelican
panda koala lion tiger leopard cheetah jaguar panther wolf fox deer moose elk reindeer rabbit bunny hare
squirrel rat hamster hedgehog raccoon otter beaver bat monkey gorilla chimpanzee ape rhino rhinoceros hippo
hippopotamus camel llama alpaca kangaroo sloth frog toad turtle tortoise snake lizard crocodile alligator
dinosaur fish goldfish shark whale dolphin octopus squid jellyfish crab lobster shrimp starfish seal walrus
butterfly bee ant spider ladybug dragonfly beetle snail worm moth insect animal pet creature
house building skyscraper tower castle palace church cathedral temple mosque pagoda cottage cabin hut barn
farm farmhouse lighthouse windmill bridge tunnel road street alley highway path sidewalk city town village
skyline market shop store cafe restaurant kitchen bedroom bathroom living_room room library museum school
hospital station airport harbor harbour pier dock stadium park garden playground fountain statue monument
ruin wall fence gate door window roof staircase stair balcony porch chimney tent igloo pyramid arena office
factory warehouse attic ceiling floor
mountain hill valley canyon cliff cave volcano desert dune forest jungle woods tree palm pine oak bush shrub
flower rose tulip sunflower daisy lily orchid grass field meadow lake river stream waterfall pond ocean sea
beach shore coast island wave sky cloud sun moon star planet galaxy nebula rainbow rain storm lightning rock
stone boulder sand ice iceberg glacier swamp marsh savanna prairie horizon sunset sunrise vineyard orchard
reef coral fire flame smoke leaf branch log mushroom cactus vine moss puddle snowman
bike motorbike scooter ship sailboat yacht canoe kayak submarine plane jet helicopter rocket spaceship
spacecraft ufo balloon hot_air_balloon taxi van jeep tractor ambulance limousine carriage wagon cart sled tram
vehicle
lemon lime grape strawberry cherry pear peach pineapple watermelon melon mango kiwi avocado tomato potato
corn pepper onion garlic lettuce salad bread loaf baguette croissant toast burger hamburger pasta spaghetti
noodle sushi rice soup steak egg bacon sausage cheese cupcake cookie doughnut pie muffin pancake waffle
ice_cream chocolate candy coffee tea juice wine beer milk cocktail drink meal fruit vegetable taco burrito
dumpling
table desk stool sofa pillow blanket lamp candle mirror watch pot pan kettle teapot mug glass jar plate dish
chopstick basket box bag purse wallet hat cap helmet crown scarf glove shoe boot sneaker sock shirt dress
skirt jacket coat sweater hoodie suit uniform jeans pants sunglasses necklace ring bracelet earring notebook
newspaper magazine letter envelope map sign poster billboard banner flag label camera phone smartphone
computer tablet monitor screen television radio speaker headphone microphone guitar piano violin drum
trumpet saxophone ball football basketball soccer_ball tennis_ball toy doll sword shield arrow key lock
wheel ladder rope chain bucket shovel hammer axe tool brush paintbrush pen pencil crayon paper card gift
trophy medal coin diamond gem jewel treasure chest barrel crate swing fireplace bathtub shower fridge stove
blender fan heater plant flowerpot bouquet wreath christmas_tree pumpkin lantern torch bell globe telescope
microscope skull bone feather nest cage aquarium trash_can mailbox street_lamp streetlight cone tire engine
machine sculpture logo icon emblem mascot"""

_IRREGULAR = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child",
    "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "cacti": "cactus",
    "fungi": "mushroom", "dice": "die", "glasses": "glass", "scissors": "scissors", "jeans": "jeans",
    "pants": "pants", "woods": "woods", "ruins": "ruin", "chopsticks": "chopstick",
}

_COLOURS = """red blue green yellow orange purple pink brown black white gray grey violet indigo cyan magenta
teal turquoise navy beige tan khaki maroon crimson scarlet burgundy lavender lilac mauve ivory cream golden
gold silver bronze copper emerald amber olive ochre coral salmon peach mint aqua azure cerulean cobalt rainbow
multicolored multicoloured multicolor colorful colourful pastel neon blond blonde brunette ginger auburn"""
_MATERIALS = """wooden wood metal metallic steel iron glass plastic stone marble brick leather wool woolen
woollen knitted knit silk silken cotton linen denim velvet satin lace fur paper cardboard ceramic porcelain
clay terracotta crystal concrete granite rubber bamboo wicker straw chrome aluminum aluminium titanium jade
felt plush"""
_SIZES = """tiny small little big large huge giant gigantic enormous massive colossal miniature mini tall short
long wide narrow thin thick fat skinny slim chubby towering petite oversized"""
_TEXTURES = """fluffy fuzzy furry hairy shiny glossy matte rusty smooth rough wet muddy dusty dirty transparent
translucent glowing sparkling spiky striped spotted dotted checkered plaid patterned floral round square
triangular circular rectangular oval spherical cubic curved flat broken cracked shattered melting frozen
burning old ancient young new antique rotten ripe empty wrinkled torn soft sharp bald curly wavy bearded
happy sad angry scared surprised grumpy sleepy"""

_STYLE_WORDS = """photorealistic photorealism hyperrealistic hyperrealism hyperreal realistic realism cinematic
cinematography anime manga cartoon cartoonish watercolor watercolour watercolors gouache acrylic impasto
charcoal sketch sketched drawing illustration painting painterly lithograph engraving woodcut etching mosaic
graffiti origami claymation isometric minimalist minimalism abstract surreal surrealist surrealism
impressionist impressionism expressionist expressionism cubist cubism baroque renaissance rococo gothic
steampunk cyberpunk solarpunk dieselpunk vaporwave synthwave retro vintage noir monochrome monochromatic sepia
grayscale greyscale polaroid bokeh macro telephoto fisheye panoramic panorama aerial closeup portrait
headshot backlit backlighting chiaroscuro volumetric lighting 3d cgi render rendered rendering
photography dslr hdr uhd lens style styled aesthetic kodachrome ektachrome cinestill portra fujifilm analog
whimsical dreamy moody ethereal atmospheric dramatic detailed intricate artstation pixar ghibli comic
storybook doodle chibi kawaii caricature silhouette vector lowpoly voxel"""
_STYLE_PHRASES = """oil_painting oil_on_canvas pixel_art line_art pop_art street_art concept_art digital_art
fine_art fan_art vector_art clip_art art_deco art_nouveau low_poly ray_tracing ray_traced unreal_engine
octane_render trending_on_artstation depth_of_field film_grain long_exposure tilt_shift wide_angle
golden_hour blue_hour studio_lighting studio_ghibli black_and_white_photo black_and_white_photograph
black_and_white_photography black_and_white_film black_and_white_image black_and_white_picture
black_and_white_style black_and_white_portrait close_up at_night at_dusk at_dawn at_sunset at_sunrise
at_twilight by_moonlight by_candlelight high_contrast high_resolution hyper_realistic hyper_detailed
ukiyo_e"""
_STYLE_SPANS = "in_the_style_of in_the_manner_of style_of inspired_by in_the_spirit_of"

_TEXT_TRIGGERS = """that_says which_says that_say says saying that_reads which_reads that_read with_the_text
with_the_words with_the_word with_text with_the_caption with_the_title with_the_slogan the_text the_words
the_word labeled labelled inscribed_with engraved_with that_spells spelling_out spelling titled captioned"""

_RELATIONS = """left_of right_of to_the_left_of to_the_right_of on_the_left_of on_the_right_of
on_the_left_side_of on_the_right_side_of at_the_left_of at_the_right_of on_top_of at_the_top_of
at_the_bottom_of at_the_foot_of in_front_of in_back_of in_the_middle_of in_the_center_of in_the_centre_of
in_the_corner_of on_the_edge_of at_the_edge_of on_either_side_of on_the_other_side_of next_to close_to
near_to adjacent_to across_from opposite_to inside_of outside_of surrounded_by on_the_side_of away_from
far_from in_between on in above below under underneath beneath behind beside besides near atop over inside
outside between among amongst amid amidst around onto upon into within across along alongside against
opposite beyond through at"""
_LAYOUT = """on_the_left on_the_right to_the_left to_the_right at_the_left at_the_right in_the_background
in_the_foreground in_the_distance in_the_center in_the_centre in_the_middle at_the_top at_the_bottom
in_the_corner on_top"""

_IDIOMS = """on_fire on_display on_sale on_the_way on_the_move in_love in_motion in_action in_flight in_bloom
in_full_bloom in_color in_colour in_focus in_detail in_profile in_silhouette"""
"""Phrases that start like a relation but are none: skipped whole."""

_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "single": 1, "both": 2,
    "dozen": 12, "several": 0, "many": 0, "multiple": 0, "numerous": 0, "countless": 0, "few": 0,
}
_COUNT_PHRASES = {
    "pair_of": 2, "couple_of": 2, "dozen": 12, "dozens_of": 0, "hundreds_of": 0, "thousands_of": 0,
    "few": 0, "lot_of": 0, "lots_of": 0, "bunch_of": 0, "group_of": 0, "herd_of": 0, "flock_of": 0,
    "crowd_of": 0, "pack_of": 0, "school_of": 0, "swarm_of": 0, "stack_of": 0, "pile_of": 0, "row_of": 0,
    "set_of": 0, "handful_of": 0, "team_of": 0, "family_of": 0, "single": 1,
}

_DETERMINERS = "a an the this these those his her its their my our your some any another each every"
_STOPS = """and or but nor with without of for from to by as that which who whom whose where when while if
than then so because featuring including plus versus vs"""
_COPULAS = "is are was were looks look appears appear seems seem"
_NON_SUBJECT = """photo photograph picture pic image shot snapshot view scene scenery frame background
foreground distance middle center centre side top bottom corner edge front back left right detail details
quality resolution color colour colors colours shape kind type sort variety lot bit piece part day night
morning evening afternoon time moment mood atmosphere vibe theme composition perspective angle version design
pattern texture focus effect way thing things something nothing everything someone it they he she them him
we you me us very really highly extremely quite super ultra same other own light dark bright pale deep
beautiful cute pretty lovely adorable majestic stunning gorgeous amazing epic"""

# Token kinds.
_NOUN, _ATTR, _STYLE, _SPAN, _TEXT, _COUNT, _REL, _LAYOUT_REL, _DET, _STOP, _COPULA, _SKIP, _UNKNOWN = range(13)
_PUNCT = frozenset(".,;:!?()[]|/—–\x01")
_QUOTE = "\x01"
_WINDOW = 5
"""Tokens a pending count, attribute or relation waits for its subject."""


def _plurals(word: str) -> set[str]:
    forms = {word, word + "s", word + "es"}
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        forms.add(word[:-1] + "ies")
    if word.endswith("f"):
        forms.add(word[:-1] + "ves")
    elif word.endswith("fe"):
        forms.add(word[:-2] + "ves")
    return forms


def _build() -> tuple[dict[str, tuple[int, int]], dict[str, list[tuple[list[str], int, int]]]]:
    single: dict[str, tuple[int, int]] = {}
    phrases: dict[str, list[tuple[list[str], int, int]]] = {}

    def add(entry: str, kind: int, value: int = 0) -> None:
        words = entry.split("_")
        if len(words) == 1:
            single.setdefault(entry, (kind, value))
        else:
            phrases.setdefault(words[0], []).append((words[1:], kind, value))

    # Earlier additions win for single words: nouns before attributes ("orange", "glass").
    for entry in (_COCO + " " + _NOUNS).split():
        *head, last = entry.split("_")
        for form in _plurals(last):
            add("_".join([*head, form]), _NOUN)
    for form in _IRREGULAR:
        add(form, _NOUN)
    for kind, text in ((_TEXT, _TEXT_TRIGGERS), (_SPAN, _STYLE_SPANS), (_STYLE, _STYLE_PHRASES),
                       (_LAYOUT_REL, _LAYOUT), (_SKIP, _IDIOMS), (_REL, _RELATIONS)):
        for entry in text.split():
            add(entry, kind)
    for entry, value in _COUNT_PHRASES.items():
        add("a_" + entry, _COUNT, value)
        add(entry, _COUNT, value)
    for word, value in _NUMBERS.items():
        add(word, _COUNT, value)
    for kind, text in ((_ATTR, " ".join((_COLOURS, _MATERIALS, _SIZES, _TEXTURES))), (_STYLE, _STYLE_WORDS),
                       (_DET, _DETERMINERS), (_STOP, _STOPS), (_COPULA, _COPULAS)):
        for entry in text.split():
            add(entry, kind)
    for entry in _NON_SUBJECT.split():
        for form in _plurals(entry):
            add(form, _SKIP)
    for options in phrases.values():
        options.sort(key=lambda o: -len(o[0]))
    return single, phrases


_SINGLE, _PHRASES = _build()
_ATTR_WORDS: Final = frozenset(" ".join((_COLOURS, _MATERIALS, _SIZES, _TEXTURES)).split())

_QUOTED = re.compile(
    r'["“„«「][^"“”„«»「」\n]{1,300}["”“»」]'
    r"|(?<!\w)['‘][^'‘’\n]{1,300}['’](?!\w)"
)
_TOKEN = re.compile(r"\x01|[.,;:!?()\[\]|/—–]|\w+")
_WORD = re.compile(r"\w+(?:['’]\w+)*")


# --- extraction ---------------------------------------------------------------------------


def _classify(toks: list[str], i: int) -> tuple[int, int, int]:
    """(kind, length in tokens, count value) of the longest lexicon entry starting at ``toks[i]``."""
    t = toks[i]
    for rest, kind, value in _PHRASES.get(t, ()):
        end = i + 1 + len(rest)
        if toks[i + 1:end] == rest:
            return kind, len(rest) + 1, value
    hit = _SINGLE.get(t)
    if hit is not None:
        return hit[0], 1, hit[1]
    if t[0].isdecimal():
        if t.isdecimal():
            return (_COUNT, 1, int(t)) if len(t) <= 5 else (_SKIP, 1, 0)
        if t.endswith(("mm", "k", "fps")) and t.rstrip("mkfps").isdecimal():
            return _STYLE, 1, 0  # 35mm, 8k, 60fps
    return _UNKNOWN, 1, 0


class _Scan:
    """Left-to-right scan state: feature tallies, and what waits for the next subject."""

    __slots__ = ("attributes", "clause_subject", "copula", "counts", "np_cand", "np_open", "pend_attrs",
                 "pend_count", "pend_rel", "relations", "style", "subjects", "text", "ttl")

    def __init__(self) -> None:
        self.subjects = self.attributes = self.relations = self.text = self.style = 0
        self.counts: list[int] = []
        self.pend_attrs = self.ttl = 0
        self.pend_count: int | None = None
        self.pend_rel = self.np_open = self.clause_subject = self.copula = False
        self.np_cand: str | None = None

    def subject(self) -> None:
        """A subject: it takes the pending count, attributes and relation."""
        self.subjects += 1
        if self.pend_count is not None:
            self.counts.append(self.pend_count)
            self.pend_count = None
        self.attributes += self.pend_attrs
        self.pend_attrs = 0
        if self.pend_rel:
            self.relations += 1
            self.pend_rel = False
        self.np_open = self.copula = False
        self.np_cand = None
        self.clause_subject = True
        self.ttl = 0

    def end_np(self) -> None:
        """Close the open noun phrase; an unknown last word becomes its subject."""
        if self.np_open and self.np_cand is not None:
            self.subject()
        self.np_open = False
        self.np_cand = None

    def boundary(self) -> None:
        self.end_np()
        self.pend_attrs = 0
        self.pend_count = None
        self.pend_rel = self.copula = False

    def tick(self) -> None:
        """A token that is not part of a subject: pending items wait at most ``_WINDOW`` of them."""
        if self.ttl:
            self.ttl -= 1
            if not self.ttl:
                self.pend_attrs = 0
                self.pend_count = None
                self.pend_rel = False


def _eligible(t: str) -> bool:
    """Could this unknown word be the head noun of its phrase?"""
    return len(t) > 2 and t.isalpha() and not t.endswith(("ly", "ing")) and not (t.endswith("ed") and len(t) > 4)


def _span_end(toks: list[str], j: int, limit: int, stop_kinds: frozenset[int]) -> int:
    """End of a free-text span from ``j``: up to ``limit`` tokens, to punctuation or a stop word."""
    n = len(toks)
    end = min(n, j + limit)
    k = j
    while k < end and toks[k] not in _PUNCT:
        if k > j and _classify(toks, k)[0] in stop_kinds:
            break
        k += 1
    return k


_TEXT_STOPS: Final = frozenset({_REL, _LAYOUT_REL, _DET, _STOP, _SPAN, _STYLE, _COPULA})
_SPAN_STOPS: Final = frozenset({_STOP})


def extract_features(prompt: str) -> ComplexityFeatures:
    """The features of a prompt; pure, linear in its length."""
    words = len(_WORD.findall(prompt))
    if not words:
        return ComplexityFeatures()
    masked, quoted = _QUOTED.subn(" \x01 ", prompt)
    toks = _TOKEN.findall(masked.casefold())
    s = _Scan()
    s.text = quoted
    n = len(toks)
    i = 0
    style_run = False
    prev_kind = _UNKNOWN
    while i < n:
        t = toks[i]
        if t in _PUNCT:
            kind, length, value = _STOP, 1, 0
        else:
            kind, length, value = _classify(toks, i)
        if kind != _STYLE:
            style_run = False
        if kind == _NOUN:
            j = i + length
            if j < n and toks[j] not in _PUNCT and _classify(toks, j)[0] == _NOUN:
                # A compound ("apple tree", "an orange cup"): the last noun is the subject.
                if t in _ATTR_WORDS:
                    s.pend_attrs += 1
                    s.ttl = _WINDOW
                s.np_open = True
            else:
                s.subject()
        elif kind == _ATTR:
            if s.copula:
                s.attributes += 1
            else:
                s.pend_attrs += 1
                s.ttl = _WINDOW
                s.np_open = True
        elif kind == _STOP:
            # "red and blue", "big, red": attributes stay pending across the conjunction.
            if not (prev_kind == _ATTR and t in (",", "and", "or") and i + 1 < n and toks[i + 1] not in _PUNCT
                    and _classify(toks, i + 1)[0] == _ATTR):
                s.boundary()
                if t in _PUNCT:
                    s.clause_subject = False
        elif kind == _DET:
            s.end_np()
            s.copula = False
            s.np_open = True
            s.tick()
        elif kind == _COUNT:
            s.end_np()
            s.copula = False
            if s.pend_count and value < 10 and s.pend_count % 10 == 0 and s.pend_count < 100:
                value += s.pend_count  # "twenty one"
            s.pend_count = value
            s.ttl = _WINDOW
            s.np_open = True
        elif kind == _REL:
            s.boundary()
            s.pend_rel = s.np_open = True
            s.ttl = _WINDOW
        elif kind == _LAYOUT_REL:
            s.boundary()
            s.relations += 1
        elif kind == _COPULA:
            s.boundary()
            s.copula = s.clause_subject
        elif kind == _STYLE:
            if not style_run:
                s.style += 1
            style_run = True
            s.tick()
        elif kind == _SPAN:
            s.boundary()
            s.style += 1
            length = _span_end(toks, i + length, 8, _SPAN_STOPS) - i
            style_run = True
        elif kind == _TEXT:
            s.boundary()
            j = i + length
            if j < n and toks[j] != _QUOTE:  # a quoted string was counted already
                end = _span_end(toks, j, 6, _TEXT_STOPS)
                if end > j:
                    s.text += 1
                length = end - i
        else:  # unknown or known non-subject words
            if kind == _UNKNOWN and s.np_open and _eligible(t):
                s.np_cand = t
            elif kind == _UNKNOWN and t.endswith(("ing", "ed")):
                s.end_np()  # a verb or participle ends the phrase before it
            s.tick()
        prev_kind = kind
        i += length
    s.end_np()
    return ComplexityFeatures(
        subjects=s.subjects, counts=len(s.counts), attributes=s.attributes, relations=s.relations,
        text_to_render=s.text, style=s.style, words=words, count_values=tuple(s.counts),
    )
