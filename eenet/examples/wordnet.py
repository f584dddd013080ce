"""WordNet 3.0 supersenses: 117,659 synsets, their text, and 45 lexicographer-file labels.

The files come from the Debian package ``wordnet-base`` (``/usr/share/wordnet``;
``$EENET_WORDNET_DIR`` points elsewhere). Each synset of ``data.noun``,
``data.verb``, ``data.adj`` and ``data.adv`` is one sample:

- the label is its lexicographer file, the second field of its data line
  (``man 5 wndb``; the 45 names of ``man 5 lexnames``, :data:`LEXNAMES`:
  ``noun.animal``, ``verb.motion``, ``adj.all``, ...);
- the text is its lemma words (underscores as spaces, adjective markers such
  as ``(a)`` dropped) followed by its gloss, the part after ``| ``.

A data line reads ``synset_offset lex_filenum ss_type w_cnt word lex_id
[word lex_id ...] p_cnt [ptr ...] [frames ...] | gloss`` with ``w_cnt`` two
hexadecimal digits; lines starting with a space are the licence header.

Splits are fixed and stratified by class: the samples of each class, in file
order (noun, verb, adj, adv), are permuted by ``numpy.random.default_rng(SPLIT_SEED)``
and the first 80% go to ``train``, the next 10% to ``val`` and the rest to
``test`` (rounded down, at least one sample per class in ``val`` and ``test``
when a class has three or more). Each split keeps file order.

Text becomes token ids by :func:`tokenize`: lower-cased words, each hashed
with ``zlib.crc32`` (stable across processes, unlike Python's salted
``hash()``) into ``N_BUCKETS`` buckets, after a ``[CLS]`` token, padded with
``PAD_ID`` to ``MAX_LEN``. No vocabulary file and no dependency. Words that
share a bucket cost accuracy (a hashed bag-of-words classifier loses 2.2 points
of test accuracy at 16,384 buckets against 32,768), so the bundled transformer
reads 65,536 buckets through a 16-wide factorised word table
(``benchmarks/RESULTS.md``, section 8).
"""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from eenet._validation import EenetError, check_choice

DEFAULT_DIR = "/usr/share/wordnet"
ENV_VAR = "EENET_WORDNET_DIR"
FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
SPLIT_SHARES = (0.8, 0.1, 0.1)
INSTALL_HINT = (f"run `sudo apt-get install wordnet-base` or set {ENV_VAR} to a folder "
                f"holding {', '.join(FILES)}")

#: the lexicographer files by number (``man 5 lexnames``): the 45 classes
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl")
N_CLASSES = len(LEXNAMES)

# token ids: 0 pads, 1 is [CLS], words hash into 2 .. N_BUCKETS - 1
PAD_ID = 0
CLS_ID = 1
N_SPECIAL = 2
N_BUCKETS = 65_536
MAX_LEN = 40  # [CLS] + 39 words: longer than the 99th percentile of lemmas + gloss
WORD_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Synset:
    """One parsed data line.

    Attributes:
        offset: the synset's byte offset in its file (its id within a part of speech).
        lex_filenum: the lexicographer file, 0-44 (the class).
        ss_type: ``n``, ``v``, ``a``, ``s`` (adjective satellite) or ``r``.
        words: the lemmas, underscores turned into spaces, markers dropped.
        gloss: the definition and examples.
    """

    offset: int
    lex_filenum: int
    ss_type: str
    words: tuple[str, ...]
    gloss: str

    @property
    def text(self) -> str:
        """Lemmas then gloss, the text the network reads."""
        return " ; ".join(self.words) + " : " + self.gloss


def parse_line(line: str, where: str = "data line") -> Synset:
    """Parse one ``data.*`` line (``man 5 wndb``).

    Raises:
        EenetError: the line does not follow the format.

    Example:
        >>> s = parse_line("00001740 29 v 02 breathe 0 take_a_breath 0 000 | draw air in")
        >>> s.lex_filenum, s.words, s.gloss
        (29, ('breathe', 'take a breath'), 'draw air in')
    """
    head, bar, gloss = line.partition("|")
    fields = head.split()
    try:
        if not bar or len(fields) < 4:
            raise ValueError("no '|' before the gloss or fewer than four fields")
        offset, lex, ss_type = int(fields[0]), int(fields[1]), fields[2]
        n_words = int(fields[3], 16)  # w_cnt: two hexadecimal digits
        words = fields[4:4 + 2 * n_words:2]
        n_pointers = int(fields[4 + 2 * n_words]) if len(fields) > 4 + 2 * n_words else -1
        # each pointer is 4 fields: symbol, offset, part of speech, source/target
        if n_words < 1 or n_pointers < 0 or len(fields) < 5 + 2 * n_words + 4 * n_pointers \
                or not 0 <= lex < N_CLASSES or ss_type not in "nvasr":
            raise ValueError(f"{n_words} words, {n_pointers} pointers in {len(fields)} fields, "
                             f"lex file {lex}, type {ss_type!r}")
    except ValueError as err:
        raise EenetError(f"{where}: not a WordNet data line ({err}); the file is damaged, "
                         f"reinstall wordnet-base") from None
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(offset, lex, ss_type, lemmas, gloss.strip())


def data_directory(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four ``data.*`` files, checked to have them all.

    Args:
        data_dir: explicit folder; else ``$EENET_WORDNET_DIR``; else ``/usr/share/wordnet``.

    Raises:
        EenetError: a file is missing, with the install command.
    """
    where = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)
    missing = [name for name in FILES if not (where / name).is_file()]
    if missing:
        raise EenetError(f"WordNet not found in {where} (no {', '.join(missing)}): "
                         f"{INSTALL_HINT}")
    return where


def read_synsets(data_dir: str | os.PathLike | None = None) -> list[Synset]:
    """Every synset of the four data files, in file order (noun, verb, adj, adv)."""
    where = data_directory(data_dir)
    synsets = []
    for name in FILES:
        path = where / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise EenetError(f"{path} cannot be read ({err}); {INSTALL_HINT}") from None
        synsets += [parse_line(line, f"{path} line {i + 1}")
                    for i, line in enumerate(lines) if line and not line.startswith(" ")]
    if not synsets:
        raise EenetError(f"{where}: the data files hold no synsets; {INSTALL_HINT}")
    return synsets


def word_id(word: str, n_buckets: int = N_BUCKETS) -> int:
    """The bucket of one lower-cased word: stable across processes and machines.

    Example:
        >>> word_id("animal")
        63607
    """
    return N_SPECIAL + zlib.crc32(word.encode("utf-8")) % (n_buckets - N_SPECIAL)


def tokenize(text: str, max_len: int = MAX_LEN, n_buckets: int = N_BUCKETS) -> np.ndarray:
    """``[CLS]`` + hashed lower-cased words, padded or cut to ``max_len``.

    Returns:
        int64 [max_len]: ``CLS_ID``, then word buckets, then ``PAD_ID``.

    Example:
        >>> tokenize("A dog", max_len=5).tolist()
        [1, 36791, 15321, 0, 0]
    """
    ids = np.full(max_len, PAD_ID, dtype=np.int64)
    ids[0] = CLS_ID
    words = WORD_PATTERN.findall(text.lower())[:max_len - 1]
    ids[1:1 + len(words)] = [word_id(w, n_buckets) for w in words]
    return ids


def split_indices(labels: np.ndarray, split: Split) -> np.ndarray:
    """Rows of ``split`` in a fixed seeded 80/10/10 split stratified by ``labels``.

    Example:
        >>> y = np.repeat(np.arange(3), 10)
        >>> [len(split_indices(y, s)) for s in ("train", "val", "test")]
        [24, 3, 3]
    """
    check_choice("WordNet split", split, SPLITS)
    rng = np.random.default_rng(SPLIT_SEED)
    part = SPLITS.index(split)
    chosen = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        n_held = int(len(rows) * SPLIT_SHARES[1]) or int(len(rows) >= 3)
        edges = (0, len(rows) - 2 * n_held, len(rows) - n_held, len(rows))
        chosen.append(rows[edges[part]:edges[part + 1]])
    return np.sort(np.concatenate(chosen))


def load_arrays(split: Split, data_dir: str | os.PathLike | None = None,
                max_len: int = MAX_LEN, n_buckets: int = N_BUCKETS
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels of one split.

    Returns:
        ``tokens`` int64 [n_samples, max_len] and ``labels`` int64 [n_samples].
    """
    check_choice("WordNet split", split, SPLITS)
    synsets = read_synsets(data_dir)
    labels = np.array([s.lex_filenum for s in synsets], dtype=np.int64)
    rows = split_indices(labels, split)
    tokens = np.stack([tokenize(synsets[i].text, max_len, n_buckets) for i in rows])
    return tokens, labels[rows]


def load_wordnet(split: Split = "val", data_dir: str | os.PathLike | None = None
                 ) -> TensorDataset:
    """One split as a dataset of (token ids int64 [MAX_LEN], label int64 0-d tensor).

    Args:
        split: ``"train"`` (80%, what the network trains on), ``"val"`` (10%,
            for fitting exit policies) or ``"test"`` (10%).
        data_dir: folder of the ``data.*`` files (see :func:`data_directory`).

    Raises:
        EenetError: unknown split, or the files are missing or damaged.

    Example:
        >>> ds = load_wordnet("test")  # doctest: +SKIP
        >>> len(ds), ds[0][0].shape  # doctest: +SKIP
        (11746, torch.Size([40]))
    """
    tokens, labels = load_arrays(split, data_dir)
    return TensorDataset(torch.from_numpy(tokens), torch.from_numpy(labels))


def class_names(labels: Sequence[int] | None = None) -> list[str]:
    """The lexicographer-file names of ``labels`` (all 45 when ``None``)."""
    return [LEXNAMES[int(c)] for c in (range(N_CLASSES) if labels is None else labels)]
