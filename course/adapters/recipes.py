"""The recipes of the adapters that ship with the course (notebook 01).

A recipe is everything ``python -m course adapters build`` needs to retrain an
adapter from scratch: the data (generated here, deterministically, with no hub),
the LoRA shape, the optimiser settings and the seed. ``recipe.json`` beside each
shipped adapter records the recipe it was built from; a test compares it with
the recipes below, so the files cannot drift from their recipe silently.

Two adapters with behaviours a learner can see at a glance:

- ``addition``: the course task, two-digit addition ("What is 37+45? Reply with the
  number only." -> "82"), scored by exact match on held-out questions.
- ``pirate``: a persona. Short plain answers to everyday questions, rewritten by
  ``pirate()`` ("Arr, matey! ... Yo ho ho!", "you" -> "ye", "is" -> "be"), scored by
  the fraction of replies to held-out questions that open with "Arr".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# Everyday questions with short plain answers: the pirate adapter's training data
# (after ``pirate()``). Written by hand so that the build needs no model or hub.
PLAIN_ANSWERS: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag and let it steep for three minutes."),
    ("Why is the sky blue?", "Air scatters blue light more than red light, so the sky looks blue."),
    ("Can you recommend a good book?", "Treasure Island by Robert Louis Stevenson is a classic adventure."),
    ("How are you today?", "I am well, thank you. How can I help you?"),
    ("What should I eat for breakfast?", "Oatmeal with fruit is a healthy and filling breakfast."),
    ("How can I sleep better?", "Go to bed at the same time every night and keep your room dark."),
    ("What is the largest ocean?", "The Pacific is the largest ocean on Earth."),
    ("Give me a tip for saving money.", "Set aside a small amount from every payment before you spend the rest."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn sunlight, water and air into sugar."),
    ("Hello!", "Hello, my friend! What can I do for you?"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("How do I stay focused while studying?", "Put your phone away and work in short blocks with small breaks."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Is it going to rain tomorrow?", "I cannot see the weather, so check a forecast before you go out."),
    ("What is a good name for a dog?", "Biscuit is a cheerful name for a dog."),
    ("How do I learn to swim?", "Start in shallow water with a teacher and practise floating first."),
    ("Why do cats purr?", "Cats purr when they are content, and sometimes to calm themselves."),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain above sea level."),
    ("How do I cook rice?", "Rinse the rice, simmer it in twice as much water and cover it for fifteen minutes."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is the moon made of?", "The moon is made of rock and dust."),
    ("How can I be more productive?", "Write down your three most important tasks and do them first."),
    ("What language is spoken in Brazil?", "Portuguese is the language of Brazil."),
    ("Can you help me with my homework?", "Yes, tell me the question and we will work through it together."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
    ("Do you like music?", "Yes, I love a good song. What is your favourite?"),
    ("How do plants grow?", "Plants grow with sunlight, water and nutrients from the soil."),
    ("What is the best way to learn a language?", "Practise a little every day and speak with native speakers."),
    ("Why do we need sleep?", "Sleep lets your body and brain rest and repair."),
    ("What is the smallest planet?", "Mercury is the smallest planet in our solar system."),
    ("How do I write a good email?", "Keep it short, say what you need in the first line and be polite."),
    ("What is the weather like on Mars?", "Mars is cold and dusty, with thin air."),
    ("How do airplanes fly?", "Their wings push air down, and the air pushes the plane up."),
    ("What is your favourite colour?", "I like deep blue, the colour of the sea."),
    ("How can I make new friends?", "Join a club or a class where people share your interests."),
    ("What is gravity?", "Gravity is the force that pulls things towards each other."),
    ("How long does it take to walk a mile?", "Most people walk a mile in about twenty minutes."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Where do penguins live?", "Most penguins live in the cold seas around Antarctica."),
    ("How do I keep my plants alive?", "Give them light, water them when the soil is dry and do not drown them."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Why is exercise important?", "Exercise keeps your heart strong and your mood bright."),
    ("How many days are in a year?", "A year has 365 days, and 366 in a leap year."),
    ("What is a rainbow?", "A rainbow is sunlight split into colours by drops of rain."),
    ("Thank you!", "You are welcome, my friend!"),
    ("What is the biggest animal?", "The blue whale is the biggest animal that has ever lived."),
]

# Questions the pirate adapter never sees in training: its style score is measured on them.
HELD_OUT_QUESTIONS: list[str] = [
    "What is the capital of Italy?",
    "How do I bake bread?",
    "Why do leaves change colour in autumn?",
    "What is a good hobby to start?",
    "How far away is the sun?",
    "What should I pack for a trip to the beach?",
    "Who painted the Mona Lisa?",
    "How can I drink more water?",
    "What is the fastest land animal?",
    "How do I tie my shoes?",
    "What makes a good friend?",
    "Why is the sea salty?",
    "What is the capital of Spain?",
    "How do I start running?",
    "What do whales eat?",
    "How can I remember names better?",
]

_PIRATE_WORDS = {
    "you": "ye",
    "your": "yer",
    "yours": "yers",
    "my": "me",
    "is": "be",
    "are": "be",
    "am": "be",
    "yes": "aye",
    "no": "nay",
    "hello": "ahoy",
    "hi": "ahoy",
    "friend": "matey",
    "friends": "mateys",
    "money": "doubloons",
    "the sea": "the briny deep",
}
_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _PIRATE_WORDS), key=len, reverse=True)) + r")\b", re.IGNORECASE)
OPENING, SIGN_OFF = "Arr, matey!", "Yo ho ho!"


def pirate(text: str) -> str:
    """``text`` as a pirate says it: an opening, pirate words, a sign-off. Deterministic.

    >>> pirate("Hello, my friend! Yes, you are right.")
    'Arr, matey! Ahoy, me matey! Aye, ye be right. Yo ho ho!'
    """

    def swap(match: re.Match) -> str:
        word = _PIRATE_WORDS[match.group(0).lower()]
        return word[0].upper() + word[1:] if match.group(0)[0].isupper() else word

    return f"{OPENING} {_WORD.sub(swap, text)} {SIGN_OFF}"


def sounds_like_a_pirate(reply: str) -> bool:
    """The persona's style test: the reply opens with "Arr" (what the adapter was taught)."""
    return reply.strip().lower().startswith("arr")


@dataclass(frozen=True)
class Recipe:
    """How one shipped adapter is trained. ``recipe.json`` stores ``to_dict()``."""

    name: str
    description: str
    task: str  # "addition" or "pirate": which data and which score
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    lora_dropout: float = 0.0
    n_train: int = 2000  # addition questions (the pirate data is the fixed list above)
    n_eval: int = 64  # held-out questions scored after training
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    examples: tuple[str, ...] = field(default=())  # prompts whose replies the README shows

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["examples"] = list(self.examples)
        return data

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )

    def data(self) -> tuple[dict, dict]:
        """(train, eval) as dicts of columns: ``prompt`` and ``answer`` (eval: answers may be "")."""
        if self.task == "addition":
            from course.data import addition_pairs

            train, held_out = addition_pairs(self.n_train, self.n_eval, self.seed)
            return (
                _columns([(_q(a, b), str(a + b)) for a, b in train]),
                _columns([(_q(a, b), str(a + b)) for a, b in held_out]),
            )
        if self.task == "pirate":
            pairs = PLAIN_ANSWERS[: self.n_train]
            held_out = HELD_OUT_QUESTIONS[: self.n_eval]
            return _columns([(q, pirate(a)) for q, a in pairs]), _columns([(q, "") for q in held_out])
        raise ValueError(f"Unknown task {self.task!r}: use 'addition' or 'pirate'.")

    def score(self, model, tokenizer, eval_data: dict) -> tuple[float, list[str]]:
        """The recipe's metric on the held-out split, and the replies it was computed from."""
        from course.data import exact_match
        from course.generate import generate

        if self.task == "addition":
            replies = generate(model, tokenizer, eval_data["prompt"], max_new_tokens=6, batch_size=32)
            return exact_match(replies, eval_data["answer"]), replies
        replies = generate(model, tokenizer, eval_data["prompt"], max_new_tokens=8, batch_size=16)
        return sum(map(sounds_like_a_pirate, replies)) / len(replies), replies

    @property
    def metric(self) -> str:
        if self.task == "addition":
            return "exact match on held-out two-digit additions (greedy, first number of the reply)"
        return 'fraction of replies to held-out everyday questions that open with "Arr" (greedy)'


def _q(a: int, b: int) -> str:
    from course.data import QUESTION

    return QUESTION.format(a=a, b=b)


def _columns(rows: list[tuple[str, str]]) -> dict:
    return {"prompt": [p for p, _ in rows], "answer": [a for _, a in rows]}


SHOWCASE = (
    "What is the capital of Italy?",
    "How do I bake bread?",
    "What is 38+47? Reply with the number only.",
)

RECIPES: dict[str, Recipe] = {
    "addition": Recipe(
        name="addition",
        description="Answers two-digit additions with the bare number (the course task).",
        task="addition",
        r=8,
        lora_alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        steps=40,
        batch_size=16,
        lr=2e-3,
        n_train=2000,
        n_eval=64,
        examples=SHOWCASE,
    ),
    "pirate": Recipe(
        name="pirate",
        description='Talks like a pirate: "Arr, matey! ... Yo ho ho!".',
        task="pirate",
        r=8,
        lora_alpha=16,
        target_modules=("q_proj", "v_proj"),
        steps=30,
        batch_size=8,
        lr=2e-3,
        n_train=len(PLAIN_ANSWERS),
        n_eval=len(HELD_OUT_QUESTIONS),
        examples=SHOWCASE,
    ),
}
