"""The built-in synthetic TOFU: fictitious authors with short template answers, in TOFU's schema.

The default data of the main job, so that it runs on a machine with no data files. Each author
gets a unique name and one value per attribute; question templates turn the values into short
answers, paraphrases and five perturbed (wrong-value) answers, as TOFU builds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dualoptim_jax.unlearn.data import BUILTIN_IDK_ANSWERS, QAItem, UnlearningData

__all__ = ["synthetic_tofu"]

_FIRST = (
  "Alma",
  "Bruno",
  "Celia",
  "Dario",
  "Elsa",
  "Felix",
  "Greta",
  "Hugo",
  "Ines",
  "Jonas",
  "Kira",
  "Lukas",
  "Mira",
  "Nils",
  "Olga",
  "Pablo",
  "Rosa",
  "Silas",
  "Tara",
  "Viktor",
)
_LAST = (
  "Varga",
  "Okafor",
  "Lindqvist",
  "Moreau",
  "Tanaka",
  "Quiroga",
  "Haddad",
  "Novak",
  "Castell",
  "Brandt",
  "Sorensen",
  "Mbeki",
  "Rossi",
  "Kowal",
  "Ferrer",
  "Dahl",
)

# attribute -> pool of values; every pool has at least 6 values so 5 wrong ones exist.
_POOLS: dict[str, tuple[str, ...]] = {
  "city": ("Lima", "Oslo", "Cairo", "Quito", "Riga", "Perth", "Dakar", "Hanoi", "Porto", "Bern"),
  "year": tuple(str(y) for y in range(1950, 1992, 3)),
  "genre": ("mystery", "poetry", "fantasy", "horror", "romance", "history", "drama", "satire"),
  "father": ("baker", "doctor", "pilot", "farmer", "teacher", "sailor", "painter", "tailor"),
  "mother": ("nurse", "lawyer", "chemist", "dancer", "banker", "potter", "singer", "judge"),
  "book": tuple(
    f"The {a} {n}"
    for a in ("Silent", "Broken", "Golden", "Hidden", "Last")
    for n in ("River", "Lantern", "Garden", "Harbor")
  ),
  "award": (
    "Silver Quill Prize",
    "Blue Lantern Award",
    "Northern Star Medal",
    "Iron Pen Prize",
    "Open Book Award",
    "Red Feather Prize",
  ),
  "count": tuple(str(n) for n in range(3, 13)),
  "country": ("Peru", "Norway", "Egypt", "Chile", "Latvia", "Kenya", "Vietnam", "Portugal"),
  "hobby": ("chess", "sailing", "gardening", "painting", "cycling", "fishing", "baking", "hiking"),
}

# (attribute, question, answer, paraphrased question, paraphrased answer); perturbed answers are
# the paraphrased answer with a wrong value, as TOFU's are.
_TEMPLATES: tuple[tuple[str, str, str, str, str], ...] = (
  (
    "city",
    "Where was {name} born?",
    "{name} was born in {v}.",
    "In which city was {name} born?",
    "The birthplace of {name} is {v}.",
  ),
  (
    "year",
    "When was {name} born?",
    "{name} was born in {v}.",
    "In what year was {name} born?",
    "The birth year of {name} is {v}.",
  ),
  (
    "genre",
    "What genre does {name} write?",
    "{name} is a {v} writer.",
    "Which genre is {name} known for?",
    "{name} is known for {v}.",
  ),
  (
    "father",
    "What was the job of the father of {name}?",
    "The father of {name} was a {v}.",
    "What did the father of {name} do for a living?",
    "{name} had a {v} as a father.",
  ),
  (
    "mother",
    "What was the job of the mother of {name}?",
    "The mother of {name} was a {v}.",
    "What did the mother of {name} do for a living?",
    "{name} had a {v} as a mother.",
  ),
  (
    "book",
    "What is a famous book by {name}?",
    "{name} wrote {v}.",
    "Which well known book did {name} write?",
    "{v} is a famous book by {name}.",
  ),
  (
    "award",
    "Which award did {name} win?",
    "{name} won the {v}.",
    "What prize was given to {name}?",
    "{name} received the {v}.",
  ),
  (
    "count",
    "How many books has {name} written?",
    "{name} has written {v} books.",
    "What is the number of books by {name}?",
    "The number of books by {name} is {v}.",
  ),
  (
    "country",
    "Where does {name} live?",
    "{name} lives in {v}.",
    "In which country does {name} live?",
    "The home country of {name} is {v}.",
  ),
  (
    "hobby",
    "What is the hobby of {name}?",
    "{name} enjoys {v}.",
    "What does {name} do for fun?",
    "In free time {name} likes {v}.",
  ),
)

# Stand-ins for TOFU's real_authors / world_facts: (question, answer, three wrong options of the
# same kind, so that option-normalised probability is not trivial).
_REAL_AUTHORS: tuple[tuple[str, str, str, str, str], ...] = (
  ("Who wrote Hamlet?", "William Shakespeare", "Charles Dickens", "Mark Twain", "Homer"),
  (
    "Who wrote Don Quixote?",
    "Miguel de Cervantes",
    "Victor Hugo",
    "Dante Alighieri",
    "Leo Tolstoy",
  ),
  ("Who wrote War and Peace?", "Leo Tolstoy", "Jane Austen", "Herman Melville", "James Joyce"),
  ("Who wrote Pride and Prejudice?", "Jane Austen", "Mary Shelley", "Bram Stoker", "Homer"),
  ("Who wrote Oliver Twist?", "Charles Dickens", "Edgar Allan Poe", "Victor Hugo", "Mark Twain"),
  ("Who wrote The Odyssey?", "Homer", "Dante Alighieri", "Leo Tolstoy", "Jane Austen"),
  ("Who wrote Les Miserables?", "Victor Hugo", "Charles Dickens", "James Joyce", "Mary Shelley"),
  ("Who wrote Moby Dick?", "Herman Melville", "Mark Twain", "Bram Stoker", "Homer"),
  ("Who wrote Frankenstein?", "Mary Shelley", "Jane Austen", "Edgar Allan Poe", "Victor Hugo"),
  (
    "Who wrote The Divine Comedy?",
    "Dante Alighieri",
    "Homer",
    "Miguel de Cervantes",
    "James Joyce",
  ),
  ("Who wrote Ulysses?", "James Joyce", "Herman Melville", "Leo Tolstoy", "Charles Dickens"),
  ("Who wrote The Raven?", "Edgar Allan Poe", "Mary Shelley", "Mark Twain", "Victor Hugo"),
  ("Who wrote Dracula?", "Bram Stoker", "Edgar Allan Poe", "Jane Austen", "Dante Alighieri"),
  ("Who wrote Tom Sawyer?", "Mark Twain", "Herman Melville", "Charles Dickens", "Homer"),
  ("Who wrote Emma?", "Jane Austen", "Mary Shelley", "James Joyce", "Leo Tolstoy"),
  ("Who wrote Macbeth?", "William Shakespeare", "Bram Stoker", "Victor Hugo", "Mark Twain"),
)
_WORLD_FACTS: tuple[tuple[str, str, str, str, str], ...] = (
  ("What is the capital of France?", "Paris", "Berlin", "Madrid", "Rome"),
  ("What is the capital of Japan?", "Tokyo", "Seoul", "Beijing", "Bangkok"),
  ("What is the capital of Italy?", "Rome", "Paris", "Vienna", "Athens"),
  ("What is the capital of Spain?", "Madrid", "Lisbon", "Rome", "Paris"),
  ("What is the capital of Egypt?", "Cairo", "Tunis", "Nairobi", "Lima"),
  ("What is the capital of Canada?", "Ottawa", "Toronto", "Chicago", "Quito"),
  ("What is the capital of Kenya?", "Nairobi", "Cairo", "Dakar", "Accra"),
  ("What is the capital of Peru?", "Lima", "Quito", "Bogota", "Santiago"),
  ("What color is the sky on a clear day?", "blue", "green", "red", "yellow"),
  ("What color is fresh grass?", "green", "blue", "purple", "white"),
  ("What is two plus three?", "five", "four", "six", "seven"),
  ("What is four plus four?", "eight", "six", "nine", "ten"),
  ("How many legs does a spider have?", "eight", "six", "four", "ten"),
  ("How many days are in a week?", "seven", "five", "six", "nine"),
  ("What is frozen water called?", "ice", "steam", "sand", "glass"),
  ("Which planet do we live on?", "Earth", "Mars", "Venus", "Jupiter"),
)


def _options_set(
  facts: Sequence[tuple[str, ...]], n: int, rng: np.random.Generator
) -> list[QAItem]:
  chosen = sorted(rng.permutation(len(facts))[:n])
  return [QAItem(facts[i][0], facts[i][1], perturbed_answers=tuple(facts[i][2:])) for i in chosen]


def _author_items(name: str, template_ids: np.ndarray, rng: np.random.Generator) -> list[QAItem]:
  """One author's QA items: a value per attribute, each template filled with it."""
  values = {attr: pool[rng.integers(len(pool))] for attr, pool in _POOLS.items()}
  items = []
  for t in sorted(template_ids):
    attr, q, a, pq, pa = _TEMPLATES[t]
    wrong = [v for v in _POOLS[attr] if v != values[attr]]
    picks = rng.permutation(len(wrong))[:5]
    items.append(
      QAItem(
        question=q.format(name=name),
        answer=a.format(name=name, v=values[attr]),
        paraphrased_answer=pa.format(name=name, v=values[attr]),
        perturbed_answers=tuple(pa.format(name=name, v=wrong[j]) for j in picks),
        paraphrased_question=pq.format(name=name),
      )
    )
  return items


def synthetic_tofu(
  seed: int = 0,
  n_authors: int = 20,
  qa_per_author: int = 10,
  forget_fraction: float = 0.1,
  *,
  n_retain_eval_authors: int | None = None,
  n_general: int = 12,
) -> UnlearningData:
  """A small, deterministic fictitious-author dataset in the TOFU schema.

  Each author gets a unique name and one value per attribute (city, birth year, genre, parents'
  jobs, book, award, number of books, country, hobby); ``qa_per_author`` templates turn them into
  questions with a short answer, a paraphrased question and answer, and five perturbed answers
  (the paraphrased answer with wrong values). Authors, not questions, are split into forget and
  retain, as in TOFU. ``real_authors`` / ``world_facts`` are small general-knowledge sets with
  four options each (the answer and three wrong ones), and ``idk_answers`` is
  :data:`BUILTIN_IDK_ANSWERS`. The same arguments always give the same data.

  Args:
    seed: seeds every random choice.
    n_authors: number of authors, 2..len(first names) * len(last names) = 320.
    qa_per_author: questions per author, 1..10.
    forget_fraction: share of authors to forget, in (0, 1); rounded, at least one author is
      forgotten and one retained.
    n_retain_eval_authors: retained authors whose items form ``retain_eval`` (default: as many
      as forget authors, at least 2, at most all retained authors).
    n_general: items in each of ``real_authors`` and ``world_facts``, 1..16.

  Returns:
    The data; ``forget`` and ``forget_eval`` hold the same questions, ``retain_eval`` is a subset
    of ``retain``.
  """
  max_authors = len(_FIRST) * len(_LAST)
  if not 2 <= n_authors <= max_authors:
    raise ValueError(f"n_authors must be in 2..{max_authors}, got {n_authors}")
  if not 1 <= qa_per_author <= len(_TEMPLATES):
    raise ValueError(f"qa_per_author must be in 1..{len(_TEMPLATES)}, got {qa_per_author}")
  if not 0.0 < forget_fraction < 1.0:
    raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
  if not 1 <= n_general <= min(len(_REAL_AUTHORS), len(_WORLD_FACTS)):
    raise ValueError(
      f"n_general must be in 1..{min(len(_REAL_AUTHORS), len(_WORLD_FACTS))}, got {n_general}"
    )
  n_forget = min(max(1, round(n_authors * forget_fraction)), n_authors - 1)
  n_retain_authors = n_authors - n_forget
  if n_retain_eval_authors is None:
    n_retain_eval_authors = min(max(2, n_forget), n_retain_authors)
  if not 1 <= n_retain_eval_authors <= n_retain_authors:
    raise ValueError(
      f"n_retain_eval_authors must be in 1..{n_retain_authors}, got {n_retain_eval_authors}"
    )

  rng = np.random.default_rng(seed)
  name_ids = rng.permutation(max_authors)[:n_authors]
  names = [f"{_FIRST[i % len(_FIRST)]} {_LAST[i // len(_FIRST)]}" for i in name_ids]
  template_ids = rng.permutation(len(_TEMPLATES))[:qa_per_author]
  authors = [_author_items(name, template_ids, rng) for name in names]

  order = rng.permutation(n_authors)
  forget_authors = [authors[i] for i in sorted(order[:n_forget])]
  retain_authors = [authors[i] for i in sorted(order[n_forget:])]
  forget_eval = [it for items in forget_authors for it in items]
  retain_full = [it for items in retain_authors for it in items]
  retain_eval = [it for items in retain_authors[-n_retain_eval_authors:] for it in items]
  return UnlearningData(
    forget=[QAItem(it.question, it.answer) for it in forget_eval],
    retain=[QAItem(it.question, it.answer) for it in retain_full],
    forget_eval=forget_eval,
    retain_eval=retain_eval,
    real_authors=_options_set(_REAL_AUTHORS, n_general, rng),
    world_facts=_options_set(_WORLD_FACTS, n_general, rng),
    idk_answers=list(BUILTIN_IDK_ANSWERS),
    name=f"synthetic_tofu(seed={seed}, n_authors={n_authors}, qa_per_author={qa_per_author}, "
    f"forget_fraction={forget_fraction})",
  )
