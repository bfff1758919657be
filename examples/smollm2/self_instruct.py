"""Self-instruct training data for IFPruning on SmolLM2-135M-Instruct: instructions the dense
model writes itself, far more varied than data.py's templates (issue 22, item 4).

    python -m examples.smollm2.self_instruct            # -> examples/smollm2/self_instruct.jsonl

1. Instructions. The dense model (MLX, batched, sampled at --temp) is asked for one request a
   given person might send an assistant about a given topic, of a given kind (SEED_PROMPT,
   ASKERS x TOPICS x KINDS, drawn without repeats). Greedy requests barely depend on the asker,
   so most were near duplicates. Each kept row records its temperature ("temp"); the shipped
   file's first 1,327 were written greedily, before --temp existed. Rounds of ROUND candidates
   run until TARGET instructions survive the filters or the candidates run out.
2. Filters: 4-60 words, one line, no meta talk ("Sure", "Here is"); not within the held-out
   distance rule (ifprune_mlx/tasks/distance.py: <= 2 word edits or word-Jaccard >= 0.5) of any
   prompt of the evaluation tasks (ifprune_mlx/tasks, dev and test) nor of the held-out
   prompts of data.jsonl; deduplicated by the same rule (an instruction too close to one kept
   earlier is dropped).
3. Format constraints. A seeded share of the instructions gets one constraint in the project's
   own words (CONSTRAINTS: length, lists, casing, a closing phrase, ...), of TRAINED_KINDS only,
   so IFEval's other instruction kinds stay never-trained and are reported apart.
4. Targets: the dense model's own greedy answer to the chat-formatted instruction, at most
   MAX_ANSWER tokens (eos included when it comes first), token ids stored as generated.

Resumable: every stage appends to OUT.partial/ (or --work) as it goes; run the same command
again after a stop and it goes on. A larger --target continues the same state: its first rows
are those of a smaller one (self_instruct_5200.jsonl continues self_instruct.jsonl). The JSONL
has data.py's line format (family "self_instruct_v2", split "train"; its header line says how
it was made), so train.py reads it with --data.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

from examples.smollm2 import data

MAX_ANSWER = 64
MAX_INSTRUCTION = 48  # tokens the model may spend writing one instruction
TARGET = 6000
ROUND = 256  # progress is saved after every round
BATCH = 128
FAMILY = "self_instruct_v2"
CONSTRAINED_SHARE = 0.35
TEMP = 0.8  # greedy instructions repeat each other across askers and kinds: most were dropped as near duplicates

SEED_PROMPT = ("Write one request that {asker} might send to an AI assistant about {topic}. "
               "The request {kind}. Write only the request.")
ASKERS = ["a student", "a teacher", "a parent", "a nurse", "a software developer", "a small business owner",
          "a retired engineer", "a traveller", "a farmer", "a journalist", "a chef", "a teenager",
          "a scientist", "a musician", "an office manager", "a gardener", "a football coach", "a librarian",
          "a new employee", "a museum guide"]
TOPICS = [
    "ancient Rome", "the French Revolution", "the printing press", "medieval castles", "the Silk Road",
    "the space race", "the Moon landing", "Mars", "comets", "black holes", "telescopes", "the solar system",
    "volcanoes", "earthquakes", "glaciers", "rainforests", "deserts", "coral reefs", "honey bees", "wolves",
    "octopuses", "migrating birds", "houseplants", "composting", "tomato gardening", "bread baking",
    "vegetarian dinners", "coffee brewing", "spices", "fermented food", "meal planning", "nutrition labels",
    "sleep", "running", "yoga", "swimming lessons", "first aid", "the common cold", "hand washing",
    "stress at work", "time management", "job interviews", "writing a CV", "public speaking", "negotiating a salary",
    "starting a bakery", "online shops", "budgeting", "saving for retirement", "credit cards", "renting a flat",
    "moving to a new city", "learning Spanish", "learning to code", "spreadsheets", "databases", "password safety",
    "phishing emails", "smartphones", "electric cars", "solar panels", "wind power", "recycling plastic",
    "water saving", "public transport", "cycling in cities", "train travel in Europe", "packing for a trip",
    "camping", "mountain hiking", "photography", "painting with watercolors", "playing the guitar", "jazz",
    "classical music", "writing poetry", "short stories", "science fiction novels", "chess", "board games",
    "video game design", "football tactics", "the Olympic Games", "basketball", "tennis", "marathon training",
    "dogs", "cats", "keeping chickens", "aquariums", "birthday parties", "weddings", "wedding speeches",
    "thank-you notes", "friendship", "moving house", "teaching children to read", "homework help",
    "school science fairs", "exams", "university applications", "volunteering", "local elections",
    "city parks", "libraries", "museums", "architecture", "bridges", "the human heart", "the brain",
    "vaccines", "bacteria", "genetics", "the weather", "clouds", "ocean tides", "maps", "time zones",
    "calendars", "prime numbers", "fractions", "probability", "geometry", "statistics", "robots",
    "artificial intelligence", "the internet", "email etiquette", "customer service", "team meetings",
]
KINDS = [
    "asks for a simple explanation", "asks for a short list", "asks for step-by-step instructions",
    "asks for advice", "asks to compare two things", "asks for a short plan", "asks for a short poem",
    "asks for a short email", "asks for a recipe", "asks for a short story", "asks for a definition",
    "asks for pros and cons", "asks for a description", "asks for ideas", "asks a factual question",
    "asks for a title", "asks for a product description", "asks for a short letter", "asks for a slogan",
    "asks for a summary", "asks for a joke", "asks for a short speech", "asks for tips for beginners",
    "asks for a Python function", "asks for a quiz question",
]
META = re.compile(r"^(sure|here is|here's|certainly|as an ai|i am here|i'm here|i am a |i'm a |i'm designed|"
                  r"request|the request|dear )", re.I)  # the model answering as the assistant, or a letter head
QUOTED = re.compile(r'"([^"]{12,})"?')
FRAME = re.compile(r"^(an?|the|as an?) [\w\s,-]{1,40}?(might|could|would|can|may|wants? to) (ask|request|send|say|write|want)\b[^:]*:?", re.I)

# One format constraint per kind, in this project's words (IFEval checks other phrasings of some
# of these kinds; the eval prompts are checked against these sentences by the distance rule).
CONSTRAINTS = {
    "length_constraints:number_words": ["Keep it under {n} words.", "Use no more than {n} words."],
    "length_constraints:number_sentences": ["Answer in {k} sentences.", "Reply with exactly {k} sentences."],
    "change_case:english_lowercase": ["Write everything in lowercase letters.", "Do not use any capital letters."],
    "change_case:english_capital": ["Write the whole reply in capital letters."],
    "detectable_format:number_bullet_lists": ["Format the answer as {k} bullet points.", "Give {k} points as a bulleted list."],
    "startend:end_checker": ["Finish with the words \"{end}\"", "End your reply with \"{end}\""],
    "keywords:existence": ["Mention the word \"{word}\".", "Make sure to use the word \"{word}\"."],
    "detectable_content:postscript": ["Add a P.S. at the end.", "Include a postscript starting with P.S."],
}
TRAINED_KINDS = sorted(CONSTRAINTS)
ENDINGS = ["Have a nice day.", "That is all.", "Good luck!", "Thanks for reading.", "Any questions?"]
KEYWORDS = ["simple", "important", "example", "together", "quickly", "careful", "future", "balance"]


def constraint(rng: random.Random) -> tuple[str, str]:
    """(kind, sentence): one format constraint with its parameters drawn."""
    kind = rng.choice(TRAINED_KINDS)
    text = rng.choice(CONSTRAINTS[kind]).format(n=rng.choice([30, 50, 80]), k=rng.choice([2, 3, 4]),
                                                end=rng.choice(ENDINGS), word=rng.choice(KEYWORDS))
    return kind, text


def clean(text: str) -> str | None:
    """The instruction the model wrote, or None when it is unusable."""
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    frame = FRAME.match(text)
    if frame:  # 'A student might ask: "How ...?"': the quoted request, or what follows the colon
        quoted = QUOTED.search(text, frame.start())
        text = quoted.group(1) if quoted else text[frame.end():] if frame.group(0).endswith(":") else ""
    text = text.strip().strip('"').strip()
    if not 4 <= len(text.split()) <= 60 or META.match(text) or "{" in text or not text.endswith((".", "?", "!")):
        return None  # too short or long, the assistant talking, a template left over, or cut off
    return text


def eval_prompts() -> list[str]:
    """Every prompt of the shipped evaluation tasks, dev and test."""
    from ifprune_mlx.tasks import TASK_DIR

    out = []
    for name in ("ifeval_dev", "ifeval_test", "exact_dev", "exact_test"):
        for line in (TASK_DIR / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            out.append(record.get("prompt") or record.get("question"))
    return out


def seeds(rng: random.Random) -> list[str]:
    """Every (asker, topic, kind) seed prompt, shuffled."""
    out = [SEED_PROMPT.format(asker=a, topic=t, kind=k) for a in ASKERS for t in TOPICS for k in KINDS]
    rng.shuffle(out)
    return out


def stop_tokens(tokenizer, newline: bool) -> set[int]:
    """The end-of-sequence ids, and with newline=True every token whose text holds a line break."""
    stops = set(tokenizer.eos_token_ids)
    if newline:
        stops |= {i for i in tokenizer.get_vocab().values() if "\n" in tokenizer.decode([i])}
    return stops


def generate(model, tokenizer, prompts: list[str], max_tokens: int, stops: set[int],
             temp: float = 0.0) -> list[list[int]]:
    """Token ids per chat-formatted prompt (the stop token kept when reached), batched; greedy
    at temp 0, else sampled (seed mx.random first for a repeatable draw)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts]
    gen = BatchGenerator(model, stop_tokens=[[s] for s in stops], completion_batch_size=BATCH,
                         prefill_batch_size=BATCH, sampler=make_sampler(temp) if temp else None)
    uids = gen.insert(encoded, [max_tokens] * len(encoded))
    out = {u: [] for u in uids}
    while responses := gen.next_generated():
        for r in responses:
            out[r.uid].append(r.token)  # a stop token too (eos kept, as data.py keeps it)
    gen.close()
    return [out[u] for u in uids]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "self_instruct.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=int, default=TARGET, help="instructions to keep")
    ap.add_argument("--round", type=int, default=ROUND, help="candidate instructions per round")
    ap.add_argument("--model", default=None, help="a model folder or GGUF (default: the SmolLM2 GGUF, float32)")
    ap.add_argument("--temp", type=float, default=TEMP,
                    help="sampling temperature for the instructions (0: greedy; answers are always greedy)")
    ap.add_argument("--work", type=Path, default=None,
                    help="the resumable state (default: OUT with the suffix .partial); files of other --target share it")
    args = ap.parse_args(argv)

    import mlx.core as mx

    from ifprune_mlx.engine import load
    from ifprune_mlx.resolve import default_gguf, resolve
    from ifprune_mlx.tasks.distance import clashes

    engine = load(resolve(args.model or default_gguf()).path)
    model, tokenizer = engine.model, engine.tokenizer
    rng = random.Random(args.seed)
    work = args.work or args.out.with_suffix(".partial")
    work.mkdir(exist_ok=True)
    kept_file, answers_file = work / "instructions.jsonl", work / "answers.jsonl"
    tried_file = work / "tried.json"
    kept = _read_lines(kept_file)
    tried = set(json.loads(tried_file.read_text())) if tried_file.exists() else set()
    _, data_rows = data.load(Path(__file__).parent / "data.jsonl")
    far_from = eval_prompts() + [r["prompt"] for r in data_rows if r["split"] == "heldout"]
    done = tried | {k["seed_prompt"] for k in kept}  # a kept one's seed too, if a stop came between the writes
    pool = [p for p in seeds(rng) if p not in done]
    line_ends = stop_tokens(tokenizer, newline=True)
    t0 = time.time()
    while len(kept) < args.target and pool:
        batch, pool = pool[:args.round], pool[args.round:]
        mx.random.seed(args.seed * 1_000_003 + len(tried))  # the same draw after a resume
        texts = [clean(tokenizer.decode(ids, skip_special_tokens=True))
                 for ids in generate(model, tokenizer, batch, MAX_INSTRUCTION, line_ends, args.temp)]
        fresh = [(s, t) for s, t in zip(batch, texts) if t]
        near_eval = {c.i for c in clashes([t for _, t in fresh], far_from)}
        fresh = [f for n, f in enumerate(fresh) if n not in near_eval]
        texts = [t for _, t in fresh]
        drop = {c.i for c in clashes(texts, [k["prompt_plain"] for k in kept])} if kept else set()
        for c in clashes(texts):  # (i, j) with i < j: the later one goes
            if c.i not in drop:
                drop.add(c.j)
        with open(kept_file, "a") as fh:
            for n, (s, t) in enumerate(fresh):
                if n in drop:
                    continue
                own = random.Random(f"{args.seed}:{s}")  # per instruction: the same after a resume
                kind, sentence = constraint(own) if own.random() < CONSTRAINED_SHARE else (None, None)
                row = {"seed_prompt": s, "prompt_plain": t, "constraint": kind,
                       "prompt": f"{t} {sentence}" if sentence else t, "temp": args.temp}
                kept.append(row)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tried |= set(batch)
        tried_file.write_text(json.dumps(sorted(tried)))
        print(f"instructions: {len(kept)} kept of {len(tried)} seeds "
              f"({len(near_eval)} near an eval prompt this round), {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    kept = kept[: args.target]
    answered, eos = _read_lines(answers_file), stop_tokens(tokenizer, newline=False)
    for start in range(len(answered), len(kept), args.round):
        chunk = kept[start: start + args.round]
        ids = generate(model, tokenizer, [k["prompt"] for k in chunk], MAX_ANSWER, eos)
        with open(answers_file, "a") as fh:
            for k, a in zip(chunk, ids):
                fh.write(json.dumps({"prompt": k["prompt"], "answer_ids": a}) + "\n")
                answered.append({"prompt": k["prompt"], "answer_ids": a})
        print(f"answers: {len(answered)}/{len(kept)}, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    write(args, kept, answered, tokenizer, time.time() - t0)


def _read_lines(path: Path) -> list[dict]:
    """The JSON lines a stage appended so far (none before it started)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write(args, kept: list[dict], answered: list[dict], tokenizer, seconds: float) -> None:
    eos = stop_tokens(tokenizer, newline=False)
    rows = []
    for i, (k, a) in enumerate(zip(kept, answered)):
        assert k["prompt"] == a["prompt"]
        rows.append({"id": i, "family": FAMILY, "source": "self_instruct", "prompt": k["prompt"], "split": "train",
                     "constraint": k["constraint"], "answer": tokenizer.decode(a["answer_ids"], skip_special_tokens=True),
                     "answer_ids": a["answer_ids"], "finished": bool(a["answer_ids"]) and a["answer_ids"][-1] in eos})
    meta = {"seed": args.seed, "model": "SmolLM2-135M-Instruct.Q4_1.gguf (float32, MLX, greedy)",
            "instructions_per_temperature": dict(Counter(str(k["temp"]) for k in kept)),
            "max_answer_tokens": MAX_ANSWER, "instructions": len(rows), "families": 1, "held_out_families": [],
            "split_rule": "all train; far from every eval task prompt and data.jsonl's held-out prompts (distance rule)",
            "train": len(rows), "heldout": 0, "per_family": {FAMILY: len(rows)},
            "constraint_kinds_trained": TRAINED_KINDS,
            "constrained": sum(r["constraint"] is not None for r in rows),
            "finished_answers": sum(r["finished"] for r in rows), "seconds": round(seconds)}
    data.save(args.out, meta, rows)
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    main()
