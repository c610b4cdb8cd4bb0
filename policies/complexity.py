"""How hard a prompt is to render faithfully, as a score in [0, 1] with the features behind it.

Complex prompts (several subjects, counted objects, colours bound to objects, spatial
relations, text to render, style constraints) need stronger models; simple ones can go
to cheap, fast ones. :func:`score_prompt` is pure, deterministic, stdlib-only and linear
in the prompt's length (tens of microseconds for a typical prompt).

Features (:class:`ComplexityFeatures`), read from the prompt with small built-in lexicons
(COCO's 80 classes plus a few hundred common image-prompt nouns, with plural handling):

- ``subjects``: noun mentions that name something to draw ("three red apples" is one
  subject; "a dog and a cat" two). Multi-word names ("teddy bear", "wine glass") count
  once; in a compound ("apple tree") only the last noun counts. An unknown word that
  ends a noun phrase opened by "a", "the", a count, an attribute or a relation counts
  too ("a photo of a quokka").
- ``counts``: subjects with an explicit count: number words ("one" … "twenty", "thirty"
  …), digits, "both", "a pair / couple / dozen of", "three of the …", a number closing a
  group ("a family of four"), and vague quantifiers ("several", "many", "a group of").
  ``count_values`` holds the numbers, 0 for a vague quantifier.
- ``plurals``: subjects named in the plural without a count ("bottles", "tennis balls").
- ``attributes``: colour, material, size, texture, shape and mood words, and participles
  ("a sleeping cat"), bound to a subject: before it in its noun phrase ("a red wooden
  table": 2) or after "is"/"are" ("the car is red"). Unbound ones ("red" alone) do not
  count. ``bound_subjects``: the subjects that carry at least one; two or more is the
  attribute-binding problem ("a red bench and a blue cup").
- ``relations``: spatial relations ("left of", "above", "on top of", "next to",
  "behind", "on", "in", …) followed by a subject or a pronoun ("on top of each other"),
  plus layout phrases that need none ("in the background", "to its left").
- ``positions``: the relations among those that place one subject against another
  (left/right of, above, below, behind, in front of, on top of, next to, between, the
  layout phrases), not containment or support ("in", "on", "at"): GenEval's "position".
- ``actions``: verbs that make a subject do something ("a cat jumping", "a dog sits").
- ``text_to_render``: written text: quoted strings ("...", “...”, '...', «...»); the words
  after "that says", "with the words", "labeled", "titled", "spelling", …; the words
  after "reading", "written", "called" when a cue says they are text (a sign before them,
  capitals after them: "a sign reading OPEN 24 HOURS"; a capitalised name before
  "written": "Carpe Diem written on it"); and things that carry text, given or not
  (signs, logos, banners, captions, book covers, neon signs, typography, lettering), once
  per clause with the words they carry.
- ``symbols``: pictures and marks to render on a surface that are not words: symbols,
  emblems, icons, stickers, tattoos, latte art, a print on a surface ("a t-shirt with a
  dog on it", "a drawing of X on it", "a cityscape painted on it"), a screen showing
  something.
- ``style``: style constraints: media and genres ("oil painting", "watercolor",
  "anime"), "in the style of ...", realism, lens, camera and lighting terms
  ("photorealistic", "35mm", "bokeh", "golden hour", "cinematic lighting"). Adjacent
  style words form one constraint ("cinematic lighting" is 1, "oil painting, 8k" 2).
- ``words``: word count of the whole prompt.

Flags (properties of :class:`ComplexityFeatures`): ``renders_text`` (text or symbols),
``has_count`` (an explicit count), ``has_spatial``, ``has_binding`` (two or more bound
subjects), ``has_style``.

Score: a weighted sum of saturating terms, ``sum(weight * min(1, feature / k))``, rounded
to 3 decimals (see :data:`WEIGHTS`; the weights sum to 1)::

    feature          weight  k (saturates at)
    subjects          0.28   2
    counts            0.17   1
    plurals           0.01   1
    attributes        0.02   4
    bound_subjects    0.02   2
    relations         0.02   3
    positions         0.04   1
    actions           0.06   2
    text_to_render    0.06   1
    symbols           0.03   1
    style             0.02   2
    words             0.27   40

The weights were fitted on the tune half of two public prompt sets and checked on the
other half, which was never tuned on (``benchmarks/complexity.py``; figures in
``benchmarks/results/complexity.md``): PartiPrompts' difficulty levels (Basic < Simple
Detail < Fine-grained Detail < Complex, labelled by people) and GenEval's tags, ordered
as SDXL's accuracy falls on them (single_object < colors < two_object < counting <
color_attr < position), with every PartiPrompts Basic prompt kept ``low`` and the
three-apples example below ``high``. Length carries most of what people call hard (word count
alone ranks PartiPrompts' levels at Spearman 0.90), so ``words`` saturates late; subjects,
counts and positions carry GenEval's order, where word count is at 0.65 and the score at
0.98. On PartiPrompts the score ranks a little below word count (0.87 held-out against
0.90): it gives up some of that for GenEval's order and for tiers that mean something.

Tiers: ``low`` below :data:`LOW_MAX` (0.35), ``high`` from :data:`HIGH_MIN` (0.7),
``medium`` between. "a photo of a cat" is low; "three red apples on a wooden table, a
sign that says SALE, oil painting, in the style of Van Gogh" high.
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
    "subjects": (0.28, 2),
    "counts": (0.17, 1),
    "plurals": (0.01, 1),
    "attributes": (0.02, 4),
    "bound_subjects": (0.02, 2),
    "relations": (0.02, 3),
    "positions": (0.04, 1),
    "actions": (0.06, 2),
    "text_to_render": (0.06, 1),
    "symbols": (0.03, 1),
    "style": (0.02, 2),
    "words": (0.27, 40),
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
    plurals: int = 0
    bound_subjects: int = 0
    actions: int = 0
    symbols: int = 0
    positions: int = 0

    @property
    def renders_text(self) -> bool:
        """Text or symbols to render: what models without a text encoder up to the task get wrong."""
        return self.text_to_render > 0 or self.symbols > 0

    @property
    def has_count(self) -> bool:
        """An explicit count ("three", "a dozen", "both", "several"); a bare plural is not one."""
        return self.counts > 0

    @property
    def has_spatial(self) -> bool:
        return self.relations > 0

    @property
    def has_binding(self) -> bool:
        """Two or more subjects with their own attributes ("a red bench and a blue cup")."""
        return self.bound_subjects >= 2

    @property
    def has_style(self) -> bool:
        return self.style > 0

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
            "plurals": self.plurals,
            "bound_subjects": self.bound_subjects,
            "actions": self.actions,
            "symbols": self.symbols,
            "positions": self.positions,
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
    """Score a prompt's complexity; pure and deterministic (so repeated prompts are answered from a cache;
    ``score_prompt.__wrapped__`` is the uncached function)."""
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
machine sculpture mascot novel album movie film bakery brand company band storefront shopfront menu
circle triangle rectangle sphere cube cylinder hexagon pentagon swirl line block"""

_IRREGULAR = {
    "people": "person", "persons": "person", "men": "man", "women": "woman", "children": "child",
    "mice": "mouse", "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "cacti": "cactus",
    "fungi": "mushroom", "dice": "die", "glasses": "glass", "scissors": "scissors", "jeans": "jeans",
    "pants": "pants", "woods": "woods", "ruins": "ruin", "chopsticks": "chopstick",
}
_SINGULAR_S = frozenset({"scissors", "jeans", "pants", "woods"})
"""Irregular forms that name one thing."""

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
storybook doodle chibi kawaii caricature silhouette vector lowpoly voxel pointillism pointilism pointillist
fauvism linocut screenprint crayon_drawing pencil_drawing pencil_sketch charcoal_drawing ink_drawing chalk_drawing"""
_STYLE_PHRASES = """oil_painting oil_on_canvas pixel_art line_art pop_art street_art concept_art digital_art
fine_art fan_art vector_art clip_art art_deco art_nouveau low_poly ray_tracing ray_traced unreal_engine
octane_render trending_on_artstation depth_of_field film_grain long_exposure tilt_shift wide_angle
golden_hour blue_hour studio_lighting studio_ghibli black_and_white_photo black_and_white_photograph
black_and_white_photography black_and_white_film black_and_white_image black_and_white_picture
black_and_white_style black_and_white_portrait close_up at_night at_dusk at_dawn at_sunset at_sunrise
at_twilight by_moonlight by_candlelight high_contrast high_resolution hyper_realistic hyper_detailed
ukiyo_e stained_glass ink_and_wash pen_and_ink color_ink colour_ink vector_illustration
matte_painting digital_painting 3d_render line_drawing"""
_STYLE_SPANS = "in_the_style_of in_the_manner_of style_of inspired_by in_the_spirit_of"

_POSITIONS = """left_of right_of to_the_left_of to_the_right_of on_the_left_of on_the_right_of
on_the_left_side_of on_the_right_side_of at_the_left_of at_the_right_of on_top_of at_the_top_of
at_the_bottom_of at_the_foot_of in_front_of in_back_of in_the_middle_of in_the_center_of in_the_centre_of
in_the_corner_of on_either_side_of on_the_other_side_of at_the_front_of at_the_back_of on_the_front_of
on_the_back_of in_the_front_of next_to adjacent_to across_from opposite_to
surrounded_by in_between above below under underneath beneath behind beside besides atop over between
opposite around surrounding"""
"""Relations that place one subject against another: what image models get wrong most often (GenEval's
"position" prompts)."""
_RELATIONS = """on_the_edge_of at_the_edge_of close_to near_to inside_of outside_of on_the_side_of away_from far_from
on in near inside outside among amongst amid amidst onto upon into within across along alongside against beyond
through at"""
"""Looser relations: containment, support, proximity."""
_LAYOUT = """on_the_left on_the_right to_the_left to_the_right at_the_left at_the_right in_the_background
in_the_foreground in_the_distance in_the_center in_the_centre in_the_middle at_the_top at_the_bottom
in_the_corner on_top to_its_left to_its_right on_its_left on_its_right to_their_left to_their_right
on_either_side on_each_side side_by_side on_the_outside on_the_inside at_the_front at_the_back in_the_front
in_the_back"""

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
    "set_of": 0, "handful_of": 0, "team_of": 0, "family_of": 0, "single": 1, "series_of": 0,
    "collection_of": 0, "assortment_of": 0, "array_of": 0, "cluster_of": 0, "line_of": 0, "various": 0,
    "half_a_dozen": 6, "trio_of": 3, "quartet_of": 4, "millions_of": 0,
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

# Text to render. Strong triggers take the words after them as the text ("that says OPEN").
_TEXT_TRIGGERS = """that_says which_says that_say says saying that_reads which_reads that_read with_the_text
with_the_words with_the_word with_text with_the_caption with_the_title with_the_slogan with_the_letters
with_the_letter with_the_phrase with_the_number with_the_numbers with_the_name with_the_message with_the_motto
with_the_headline with_the_inscription the_text the_words the_word the_letters the_letter the_phrase
the_number the_numbers the_name the_slogan the_title the_caption the_message the_motto labeled labelled
inscribed_with engraved_with emblazoned_with embossed_with printed_with stamped_with bearing_the_words
bearing_the_text that_spells that_spell spells spelled_out spelling_out spelling titled entitled captioned
headlined subtitled"""
# Weak triggers are text only with a cue: a text carrier before them in the clause, capitals after them ("a sign
# reading OPEN 24 HOURS"), or, for the "written" kind, a capitalised name before them ("Carpe Diem written on it").
_READ_TRIGGERS = "reading reads read"
_WRITE_TRIGGERS = """written writing writes write printed painted engraved carved embroidered etched scrawled
stenciled stencilled stamped inscribed spelled spelt drawn tattooed stitched sewn scribbled chalked spray_painted"""
_NAME_TRIGGERS = "called named"
_SHOW_TRIGGERS = "showing displaying shows displays"
"""After a screen ("a laptop screen showing a search"): a picture on a surface."""

_CARRIERS = """sign signboard signpost street_sign road_sign neon_sign billboard banner placard plaque marquee logo
book_cover magazine_cover album_cover record_cover cover_of_a_book cover_of_the_book cover_of_a_magazine
movie_poster film_poster concert_poster travel_poster propaganda_poster license_plate licence_plate
number_plate nameplate name_tag scoreboard speech_bubble thought_bubble menu meme"""
"""Things that carry text: each is text to render once, with or without the words given."""
_TEXT_WORDS = """typography typographic lettering calligraphy caption captions headline headlines inscription
slogan wordmark monogram text texts words letters signage subtitle subtitles font typeface hand_lettering
word_art neon_text neon_letters neon_lettering neon_words block_letters bubble_letters"""
"""Words for text itself (not subjects): text to render once per clause."""
_SYMBOLS = """symbol emblem insignia icon emoji crest coat_of_arms sticker decal tattoo latte_art yin_yang
peace_sign dollar_sign musical_note music_note pictogram glyph hieroglyph hieroglyphics infographic diagram
flowchart pie_chart bar_chart"""
_SURFACES = """shirt t_shirt tshirt sweatshirt hoodie jersey sweater cap hat mug cup bowl flag banner towel pillow
cushion blanket tote tote_bag poster card sticker skateboard surfboard kite umbrella sock napkin apron canvas
notebook phone_case"""
"""Surfaces that take a printed picture: "a t-shirt with a dog on it" is a symbol to render, not a second dog."""
_SCREENS = "screen monitor tv television laptop computer phone smartphone tablet billboard"
_TITLED = """book novel magazine newspaper album movie film show store shop storefront shopfront cafe restaurant bar
bakery brand company poster band"""
"""Things with a name: "a book called X" gives text to render."""
_DESIGNS = """drawing drawings cartoon picture image photo photograph print graphic design illustration painting
portrait pattern motif sketch doodle silhouette map"""
"""In "with a drawing of X on it": a picture on a surface."""
_ACRONYM_WORDS = "tv uk us usa nyc ufo dj dslr hdr cgi hd uhd led 3d 4k 8k"

_VERBS = """sits stands jumps runs walks holds wears rides eats plays swims dances sleeps climbs fights hugs chases
kicks throws catches carries pushes pulls lies leans hangs floats rises shines pours smiles laughs cries sings cooks
grows stares peers sips hides leaps dives drives rests hovers glides soars crawls stretches kneels perches sails"""
"""Finite action verbs; participles ("-ing") are found by their ending."""
_NOT_ACTION_WORDS = """during thing things string strings spring sibling siblings pudding icing frosting stuffing
wedding bedding railing railings awning clothing living viking vikings herring sapling seedling gosling offering
stocking stockings evening morning nothing something everything anything ceiling king kings ring rings wing wings
sling bling darling sterling beijing peking amazing interesting charming boring stunning striking upcoming
outstanding ongoing following"""

# Token kinds.
(_NOUN, _ATTR, _STYLE, _SPAN, _TEXT, _WEAK_TEXT, _TEXT_WORD, _SHOW, _VERB, _COUNT, _REL, _LAYOUT_REL, _DET, _STOP,
 _COPULA, _SKIP, _UNKNOWN) = range(17)
# Noun flags (a noun entry's value).
_PL, _CARRIER, _SYMBOL, _SURFACE, _SCREEN, _NAMED = 1, 2, 4, 8, 16, 32
# A pending relation.
_LOOSE, _POSITION = 1, 2
# Weak text triggers (their value).
_W_READ, _W_WRITE, _W_NAME = 1, 2, 3
_PUNCT = frozenset(".,;:!?()[]|/—–\x01")
_QUOTE = "\x01"
_SENTENCE = frozenset(".;:!?")
_CONJ = frozenset({"and", "or", "but", "while", "featuring", "plus"})
_PRONOUNS = {"it": 1, "them": 1, "itself": 1, "themselves": 1, "each_other": 2, "one_another": 2}
_OF_SELECT = frozenset({"the", "these", "those", "its", "his", "her", "their", "our", "my", "your"})
_OF_REFER = frozenset({"them", "which", "whom", "us", "you"})
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

    flags: dict[str, int] = {}
    for flag, text in ((_CARRIER, _CARRIERS), (_SYMBOL, _SYMBOLS), (_SURFACE, _SURFACES), (_SCREEN, _SCREENS),
                       (_NAMED, _TITLED)):
        for entry in text.split():
            flags[entry] = flags.get(entry, 0) | flag
    # Earlier additions win for single words: nouns before attributes ("orange", "glass").
    for entry in dict.fromkeys((_COCO + " " + _NOUNS).split() + list(flags)):
        *head, last = entry.split("_")
        for form in sorted(_plurals(last)):
            value = flags.get(entry, 0) | (_PL if form != last else 0)
            add("_".join([*head, form]), _NOUN, value)
    for form, base in _IRREGULAR.items():
        add(form, _NOUN, flags.get(base, 0) | (0 if form in _SINGULAR_S else _PL))
    for kind, value, text in ((_TEXT, 0, _TEXT_TRIGGERS), (_WEAK_TEXT, _W_READ, _READ_TRIGGERS),
                              (_WEAK_TEXT, _W_WRITE, _WRITE_TRIGGERS), (_WEAK_TEXT, _W_NAME, _NAME_TRIGGERS),
                              (_TEXT_WORD, 0, _TEXT_WORDS), (_SHOW, 0, _SHOW_TRIGGERS), (_SPAN, 0, _STYLE_SPANS),
                              (_STYLE, 0, _STYLE_PHRASES), (_LAYOUT_REL, 0, _LAYOUT), (_SKIP, 0, _IDIOMS),
                              (_REL, 1, _POSITIONS), (_REL, 0, _RELATIONS)):
        for entry in text.split():
            add(entry, kind, value)
    for entry, value in _COUNT_PHRASES.items():
        add("a_" + entry, _COUNT, value)
        add(entry, _COUNT, value)
    for word, value in _NUMBERS.items():
        add(word, _COUNT, value)
    for kind, text in ((_ATTR, " ".join((_COLOURS, _MATERIALS, _SIZES, _TEXTURES))), (_STYLE, _STYLE_WORDS),
                       (_DET, _DETERMINERS), (_STOP, _STOPS), (_COPULA, _COPULAS), (_VERB, _VERBS)):
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
_DESIGN: Final = frozenset(_DESIGNS.split())
_ACRONYMS: Final = frozenset(_ACRONYM_WORDS.split())
_NOT_ACTIONS: Final = frozenset(_NOT_ACTION_WORDS.split())

_QUOTED = re.compile(
    r'["“„«「][^"“”„«»「」\n]{1,300}["”“»」]'
    r"|(?<!\w)['‘][^'‘’\n]{1,300}['’](?!\w)"
)
_MONEY = re.compile(r"[$€£¥]\s?\d")
"""An amount of money ("a check for $10,000"): text to render."""
_TOKEN = re.compile(r"\x01|[.,;:!?()\[\]|/—–]|\w+")
_WORD = re.compile(r"\w+(?:['’]\w+)*")


# --- extraction ---------------------------------------------------------------------------


def _classify(toks: list[str], i: int) -> tuple[int, int, int]:
    """(kind, length in tokens, value) of the longest lexicon entry starting at ``toks[i]``."""
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
            if len(t) > 5 or (len(t) == 4 and 1000 <= int(t) <= 2100):
                return _SKIP, 1, 0  # a year, a serial number
            return _COUNT, 1, int(t)
        if t.endswith(("mm", "k", "fps")) and t.rstrip("mkfps").isdecimal():
            return _STYLE, 1, 0  # 35mm, 8k, 60fps
    return _UNKNOWN, 1, 0


class _Scan:
    """Left-to-right scan state: feature tallies, what waits for the next subject, and the clause's text."""

    __slots__ = ("actions", "attributes", "bound", "carrier", "clause_subject", "clause_text", "copula", "counts",
                 "in_with", "last_bound", "last_end", "last_flags", "mark", "np_cand", "np_open", "pend_attrs",
                 "pend_count", "pend_rel", "plurals", "positions", "relations", "style", "subjects", "symbols",
                 "text", "ttl", "with_mark", "word_count")

    def __init__(self) -> None:
        self.subjects = self.attributes = self.relations = self.text = self.style = 0
        self.plurals = self.bound = self.actions = self.symbols = self.positions = self.pend_rel = 0
        self.counts: list[int] = []
        self.pend_attrs = self.ttl = self.last_end = self.last_flags = 0
        self.pend_count: int | None = None
        self.np_open = self.clause_subject = self.copula = self.word_count = self.last_bound = False
        self.carrier = self.clause_text = self.mark = self.in_with = self.with_mark = False
        self.np_cand: str | None = None

    def subject(self, flags: int = 0, end: int = 0) -> None:
        """A subject: it takes the pending count, attributes and relation."""
        self.subjects += 1
        if self.pend_count is not None:
            self.counts.append(self.pend_count)
            self.pend_count = None
        elif flags & _PL:
            self.plurals += 1
        self.last_bound = self.pend_attrs > 0
        self.bound += self.last_bound
        self.attributes += self.pend_attrs
        self.pend_attrs = 0
        if self.pend_rel:
            self.relations += 1
            self.positions += self.pend_rel == _POSITION
            self.pend_rel = 0
        self.np_open = self.copula = self.word_count = False
        self.np_cand = None
        self.clause_subject = True
        self.ttl = 0
        self.last_flags, self.last_end = flags, end
        if flags & _SYMBOL:
            self.symbols += 1
            self.mark = True
        if flags & _CARRIER and not self.clause_text:
            self.carrier = True

    def end_np(self) -> None:
        """Close the open noun phrase; an unknown last word becomes its subject."""
        if self.np_open and self.np_cand is not None:
            t = self.np_cand
            plural = t.endswith("s") and not t.endswith(("ss", "us", "is", "ous"))
            self.subject(_PL if plural else 0)
        self.np_open = False
        self.np_cand = None

    def drop_count(self) -> None:
        """A count that found no subject: a number word still counts ("a family of four"), a digit does not."""
        if self.pend_count is not None and self.word_count:
            self.counts.append(self.pend_count)
        self.pend_count = None
        self.word_count = False

    def boundary(self) -> None:
        self.end_np()
        self.pend_attrs = 0
        self.drop_count()
        self.pend_rel = 0
        self.copula = False

    def text_item(self) -> None:
        """Text to render, found by a trigger: it is the text of a pending carrier, if any."""
        self.text += 1
        self.carrier = False
        self.clause_text = self.mark = True

    def end_clause(self, sentence: bool) -> None:
        """A pending carrier is text to render once; a sentence also ends the surface a print waits for."""
        if self.carrier:
            self.text += 1
        self.carrier = self.clause_text = False
        if sentence:
            self.mark = self.in_with = self.with_mark = False
            self.last_flags = 0

    def tick(self) -> None:
        """A token that is not part of a subject: pending items wait at most ``_WINDOW`` of them."""
        if self.ttl:
            self.ttl -= 1
            if not self.ttl:
                self.pend_attrs = 0
                self.drop_count()
                self.pend_rel = 0


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


def _capitals(word: str) -> bool:
    """An all-capitals word that is not a common acronym: text to render after "reading", "writing"."""
    return len(word) > 1 and word.isupper() and word.casefold() not in _ACRONYMS


def _named_before(raw: list[str], toks: list[str], i: int) -> bool:
    """A capitalised word (not a sentence's first) among the three tokens before ``i``: "Carpe Diem written"."""
    for k in range(max(1, i - 3), i):
        w = raw[k]
        if w[:1].isupper() and w[:1].isalpha() and raw[k - 1] not in _SENTENCE and toks[k] not in _SINGLE:
            return True
    return False


def _noun_next(toks: list[str], j: int) -> bool:
    """Does a noun (or a word that may be one) follow? Then an "-ing" word before it is an attribute."""
    if j >= len(toks) or toks[j] in _PUNCT:
        return False
    kind = _classify(toks, j)[0]
    return kind in (_NOUN, _ATTR) or (kind == _UNKNOWN and _eligible(toks[j]))


_TEXT_STOPS: Final = frozenset({_REL, _LAYOUT_REL, _DET, _STOP, _SPAN, _STYLE, _COPULA})
_SPAN_STOPS: Final = frozenset({_STOP})


def extract_features(prompt: str) -> ComplexityFeatures:
    """The features of a prompt; pure, linear in its length."""
    words = len(_WORD.findall(prompt))
    if not words:
        return ComplexityFeatures()
    masked, quoted = _QUOTED.subn(" \x01 ", prompt)
    raw = _TOKEN.findall(masked)
    toks = [t.casefold() for t in raw]
    s = _Scan()
    s.text = quoted + len(_MONEY.findall(masked))
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
        if s.in_with and t in _DESIGN:
            s.with_mark = True  # "with a drawing of X on it"
        if kind == _NOUN:
            j = i + length
            if j < n and toks[j] not in _PUNCT and _classify(toks, j)[0] == _NOUN:
                # A compound ("apple tree", "an orange cup"): the last noun is the subject.
                if t in _ATTR_WORDS:
                    s.pend_attrs += 1
                    s.ttl = _WINDOW
                s.np_open = True
            else:
                s.subject(value, j)
        elif kind == _ATTR:
            if s.copula:
                s.attributes += 1
                if not s.last_bound:
                    s.bound += 1
                    s.last_bound = True
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
            if t == _QUOTE:  # the quoted text (counted already) is what a carrier or trigger nearby carries
                s.carrier = False
                s.clause_text = s.mark = True
            elif t in _PUNCT or t in _CONJ:
                s.end_clause(t in _SENTENCE)
            elif t == "with":
                s.in_with = True
                s.with_mark = s.with_mark or (s.last_end == i and bool(s.last_flags & _SURFACE))
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
            else:
                s.drop_count()
            s.pend_count = value
            s.word_count = length == 1 and value >= 2 and t.isalpha()
            s.ttl = _WINDOW
            s.np_open = True
            j = i + length
            if value != 1 and j + 1 < n and toks[j] == "of":
                if toks[j + 1] in _OF_SELECT:  # "three of the cats"
                    length += 1
                elif toks[j + 1] in _OF_REFER:  # "two of which", "both of them"
                    s.counts.append(value)
                    s.pend_count = None
                    length += 2
        elif kind == _REL:
            s.boundary()
            j = i + length
            if j + 1 < n and toks[j + 1] in ("other", "another"):
                nxt = toks[j] + "_" + toks[j + 1]
            else:
                nxt = toks[j] if j < n else ""
            if nxt in _PRONOUNS and t != "at":  # "on top of each other", "a candle in it"
                s.relations += 1
                s.positions += value
                if s.with_mark and not s.mark and t in ("on", "onto", "over", "across"):
                    s.symbols += 1  # "a t-shirt with a dog on it"
                    s.mark = True
                length += _PRONOUNS[nxt]
            else:
                if s.with_mark and not s.mark and t in ("on", "onto", "over", "across") and nxt in ("its", "their"):
                    s.symbols += 1
                    s.mark = True
                s.pend_rel = _POSITION if value else _LOOSE
                s.np_open = True
                s.ttl = _WINDOW
        elif kind == _LAYOUT_REL:
            s.boundary()
            s.relations += 1
            s.positions += 1
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
            if j < n and toks[j] == _QUOTE:  # a quoted string was counted already
                s.carrier = False
                s.clause_text = s.mark = True
            else:
                end = _span_end(toks, j, 6, _TEXT_STOPS)
                if end > j:
                    s.text_item()
                length = end - i
        elif kind == _WEAK_TEXT:
            length = _weak_text(s, raw, toks, i, length, value)
        elif kind == _TEXT_WORD:
            if not s.clause_text:
                s.carrier = True  # "bold typography": text to render, given or not
            s.tick()
        elif kind == _SHOW:
            s.end_np()
            if s.last_flags & _SCREEN and not s.mark:
                s.symbols += 1  # "a laptop screen showing a search"
                s.mark = True
            else:
                s.actions += 1
            s.tick()
        elif kind == _VERB:
            s.end_np()
            s.actions += 1
            s.tick()
        else:  # unknown or known non-subject words
            if kind == _UNKNOWN and t.endswith("ing") and len(t) > 4 and t not in _NOT_ACTIONS:
                if s.np_open and s.np_cand is None and prev_kind in (_DET, _ATTR, _COUNT) and _noun_next(toks, i + 1):
                    s.pend_attrs += 1  # "a sleeping cat"
                    s.ttl = _WINDOW
                else:
                    s.end_np()
                    s.actions += 1  # "a cat sleeping"
            elif kind == _UNKNOWN and s.np_open and _eligible(t):
                s.np_cand = t
            elif kind == _UNKNOWN and t.endswith("ed"):
                if s.np_open and s.np_cand is None and prev_kind in (_DET, _ATTR, _COUNT) and _noun_next(toks, i + 1):
                    s.pend_attrs += 1  # "a dashed line"
                    s.ttl = _WINDOW
                else:
                    s.end_np()  # a participle ends the phrase before it
            s.tick()
        prev_kind = kind
        i += length
    s.end_np()
    s.drop_count()
    s.end_clause(True)
    return ComplexityFeatures(
        subjects=s.subjects, counts=len(s.counts), attributes=s.attributes, relations=s.relations,
        text_to_render=s.text, style=s.style, words=words, count_values=tuple(s.counts), plurals=s.plurals,
        bound_subjects=s.bound, actions=s.actions, symbols=s.symbols, positions=s.positions,
    )


def _weak_text(s: _Scan, raw: list[str], toks: list[str], i: int, length: int, kind: int) -> int:
    """A weak trigger ("reading", "written", "called" …): text with a cue, else a verb ("painted on": a mark)."""
    n = len(toks)
    j = i + length
    if j < n and toks[j] == _QUOTE:  # "a stain that writes 'OOPS'": the quote is the text
        s.carrier = False
        s.clause_text = s.mark = True
        return length
    if kind == _W_WRITE and s.clause_text:
        return length  # "'SALE' written on it"
    carried = s.carrier or (kind == _W_NAME and bool(s.last_flags & _NAMED))
    after = kind != _W_NAME and j < n and _capitals(raw[j])
    if carried or after:
        end = _span_end(toks, j, 6, _TEXT_STOPS)
        if end > j:
            s.text_item()
            return end - i
        return length
    if kind == _W_WRITE and _named_before(raw, toks, i):
        s.text_item()
    elif kind == _W_WRITE and j < n and toks[j] in ("on", "onto", "across", "over"):
        if not s.mark:
            s.symbols += 1  # "a cityscape painted on it"
            s.mark = True
    elif kind == _W_READ or (kind == _W_WRITE and toks[i] == "writing"):
        s.end_np()
        s.actions += 1  # "a cat reading a book"
    return length
