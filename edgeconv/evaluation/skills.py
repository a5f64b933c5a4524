"""A synthetic skill mixture: short prompts with one exact answer each, so a small model's skills can be
trained into it (experts tend to specialise on them) and scored by exact match. Sizes are small on purpose:
the demo models see a few million tokens, and copy, recall and reverse need induction-style attention that
such short training forms only for short inputs over frequent tokens (common words, single letters, digits).

Every example is one line, `PROMPT ANSWER`, where the prompt ends with `=` and the answer, after one space,
is what a model must generate, followed by a newline. The space keeps the prompt's last pre-token the same
whether or not the answer follows (byte-level BPE would otherwise merge `=yes` into one piece in training
that a prompt ending in `=` never shows). Generators are pure functions of a seeded
`random.Random`, so a split is reproducible from its seed alone.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from edgeconv.registry import Registry


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str  # ends with "="; what the model is given
    answer: str  # what it must produce next (then a newline)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


SKILLS: Registry[Callable[[random.Random], tuple[str, str]]] = Registry("skill")


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


@SKILLS.register("add")
def add(rng: random.Random) -> tuple[str, str]:
    """Two-digit addition: add 48+37= 85."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b)


# Common words, one BPE token each in the demo tokenizer: copying them is pure induction. Made-up words split
# into rare two-letter pieces whose embeddings a tiny model barely trains, and it never learned to copy those.
WORDS = """the and of to in is that for it with as was on be by this not are or from at but his have you he an
which my your me all will if can we so what they no her him our do one more when there their may then them shall
these would should thou thee thy lord king good love man now come time well like make know see let must value list
name file type code data function class module return string first new use set call line object error default
method""".split()


@SKILLS.register("copy")
def copy(rng: random.Random) -> tuple[str, str]:
    """Repeat a few common words: copy king of data= king of data."""
    # The same random draws as the made-up words of earlier versions (so every other skill's examples, and
    # the held-out sets, stay the same), each mapped to a common word.
    drawn = [_word(rng, 2, 4) for _ in range(rng.randint(1, 3))]
    words = " ".join(WORDS[zlib.crc32(w.encode()) % len(WORDS)] for w in drawn)
    return f"copy {words}=", words


@SKILLS.register("reverse")
def reverse(rng: random.Random) -> tuple[str, str]:
    """Reverse a few letters, spaced so each letter is one token: reverse a b c d= d c b a. (Unspaced, the
    answer's BPE pieces differ from the prompt's, which turns reversal into spelling for a tiny model.)"""
    w = _word(rng, 3, 5)
    return f"reverse {' '.join(w)}=", " ".join(w[::-1])


@SKILLS.register("sort")
def sort(rng: random.Random) -> tuple[str, str]:
    """Sort digits ascending: sort 5 2 9= 2 5 9."""
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"sort {' '.join(map(str, nums))}=", " ".join(map(str, sorted(nums)))


@SKILLS.register("brackets")
def brackets(rng: random.Random) -> tuple[str, str]:
    """Is a bracket string balanced: brackets (()[])= yes."""
    pairs = ["()", "[]", "{}"]
    if rng.random() < 0.5:  # balanced by construction
        s = ""
        for _ in range(rng.randint(2, 6)):
            o, c = rng.choice(pairs)
            s = rng.choice([o + s + c, s + o + c])
        return f"brackets {s}=", "yes"
    s = "".join(rng.choice("()[]{}") for _ in range(rng.randint(4, 12)))
    return f"brackets {s}=", "yes" if balanced(s) else "no"


def balanced(s: str) -> bool:
    stack, match = [], {")": "(", "]": "[", "}": "{"}
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif not stack or stack.pop() != match[ch]:
            return False
    return not stack


@SKILLS.register("recall")
def recall(rng: random.Random) -> tuple[str, str]:
    """Key-value recall: recall a:7 b:3 c:9 b= 3."""
    keys = rng.sample(string.ascii_lowercase, rng.randint(2, 4))
    values = {k: rng.randint(0, 9) for k in keys}
    pairs = " ".join(f"{k}:{v}" for k, v in values.items())
    key = rng.choice(keys)
    return f"recall {pairs} {key}=", str(values[key])


def examples(seed: int, n: int, skills: list[str] | None = None) -> list[Example]:
    """`n` examples cycling over `skills` (all by default), reproducible from `seed`."""
    rng = random.Random(seed)
    names = skills or SKILLS.names()
    out = []
    for i in range(n):
        name = names[i % len(names)]
        prompt, answer = SKILLS.get(name)(rng)
        out.append(Example(name, prompt, answer))
    return out
