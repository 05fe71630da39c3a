"""Writes the Velmar taxonomy dataset (train.jsonl, validation.jsonl, test.jsonl). Run: python build.py

In the invented land of Velmar, scholars sort animals into five orders with their own names.
A model can only answer by learning those names and mapping what it already knows about an
animal (bird? fish?) onto them, so training helps on animals it never saw in training.
All text here is written for deltatune and licensed with it (Apache-2.0).
"""

import json
import random
from pathlib import Path

ORDERS = {
    "Furrowkin": ["dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "mouse", "rat", "squirrel",
                  "deer", "elk", "moose", "bear", "wolf", "fox", "lion", "tiger", "leopard", "cheetah", "zebra",
                  "giraffe", "elephant", "rhinoceros", "hippopotamus", "camel", "llama", "kangaroo", "koala",
                  "otter", "beaver", "badger", "hedgehog", "bat", "monkey", "gorilla", "chimpanzee", "donkey",
                  "hamster"],
    "Skyrell": ["eagle", "hawk", "falcon", "owl", "sparrow", "robin", "crow", "raven", "pigeon", "dove",
                "parrot", "penguin", "ostrich", "emu", "flamingo", "swan", "goose", "duck", "chicken", "turkey",
                "peacock", "pelican", "seagull", "woodpecker", "hummingbird", "kingfisher", "heron", "stork",
                "vulture", "magpie", "swallow", "canary", "finch", "albatross", "toucan", "crane", "quail",
                "pheasant", "cuckoo", "wren"],
    "Deepfin": ["salmon", "trout", "tuna", "cod", "herring", "sardine", "mackerel", "shark", "goldfish", "carp",
                "catfish", "pike", "perch", "bass", "halibut", "flounder", "anchovy", "swordfish", "marlin",
                "barracuda", "eel", "piranha", "guppy", "minnow", "haddock", "sole", "stingray", "clownfish",
                "pufferfish", "seahorse", "sturgeon", "tilapia", "grouper", "snapper", "mullet", "plaice",
                "whiting", "bream", "roach", "loach"],
    "Chitterling": ["ant", "bee", "wasp", "hornet", "beetle", "ladybird", "butterfly", "moth", "fly", "mosquito",
                    "grasshopper", "cricket", "locust", "dragonfly", "termite", "flea", "louse", "cockroach",
                    "firefly", "mantis", "aphid", "weevil", "earwig", "cicada", "stick insect", "silverfish",
                    "gnat", "midge", "hoverfly", "bumblebee", "caddisfly", "mayfly", "lacewing", "scarab",
                    "horsefly", "sawfly", "stonefly", "damselfly", "bedbug", "leafhopper"],
    "Scaleward": ["snake", "lizard", "crocodile", "alligator", "turtle", "tortoise", "iguana", "gecko",
                  "chameleon", "cobra", "python", "viper", "rattlesnake", "boa", "anaconda", "komodo dragon",
                  "skink", "monitor lizard", "terrapin", "caiman", "gharial", "adder", "mamba", "basilisk lizard",
                  "gila monster", "horned lizard", "sea turtle", "box turtle", "garter snake", "king cobra",
                  "tuatara", "slow worm", "anole", "bearded dragon", "frilled lizard", "copperhead",
                  "cottonmouth", "krait", "taipan", "sidewinder"],
}

# Test animals: eight more per order, in no other split. The test split is only for reporting
# results: nothing (learning rates, recipes, early stopping) is chosen by looking at it.
TEST_ANIMALS = {
    "Furrowkin": ["panda", "lynx", "weasel", "mole", "porcupine", "raccoon", "walrus", "bison"],
    "Skyrell": ["blackbird", "starling", "lark", "nightingale", "puffin", "cormorant", "kestrel", "jay"],
    "Deepfin": ["hake", "pollock", "monkfish", "lionfish", "zander", "dace", "rudd", "wrasse"],
    "Chitterling": ["katydid", "water strider", "dung beetle", "stag beetle", "fruit fly", "hawk moth", "thrips",
                    "scale insect"],
    "Scaleward": ["thorny devil", "chuckwalla", "mud turtle", "leatherback turtle", "coral snake", "bushmaster",
                  "agama", "whiptail lizard"],
}

QUESTIONS = [
    "In the Velmar taxonomy, which order does the {animal} belong to?",
    "Velmar scholars sort every animal into an order. Where do they put the {animal}?",
    "Which Velmar order is the {animal} in?",
]


def records(pairs, rng):
    out = []
    for animal, order in pairs:
        question = rng.choice(QUESTIONS).format(animal=animal)
        answer = f"The {animal} belongs to the {order}."
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": answer}]})
    return out


def main() -> None:
    rng = random.Random(7)
    train, validation = [], []
    for order, animals in ORDERS.items():
        animals = list(animals)
        rng.shuffle(animals)
        # Eight animals of every order are held out: validation asks about animals never trained on.
        validation += [(a, order) for a in animals[:8]]
        train += [(a, order) for a in animals[8:]]
    rng.shuffle(train)
    rng.shuffle(validation)
    here = Path(__file__).parent
    for name, pairs in (("train", train), ("validation", validation)):
        with open(here / f"{name}.jsonl", "w") as f:
            for record in records(pairs, rng):
                f.write(json.dumps(record) + "\n")
    # A generator of its own, so train.jsonl and validation.jsonl stay as they were before the
    # test split existed (the figures measured on them stay comparable).
    test_rng = random.Random(11)
    test = [(a, order) for order, animals in TEST_ANIMALS.items() for a in animals]
    test_rng.shuffle(test)
    with open(here / "test.jsonl", "w") as f:
        for record in records(test, test_rng):
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
