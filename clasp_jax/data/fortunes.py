"""Real sentences in several languages from Debian's fortunes packages.

The fortune files are quotations, jokes and aphorisms written by people, grouped by topic
(one file per topic), in English (`fortunes`, `fortunes-min`), German (`fortunes-de`),
Spanish (`fortunes-es`) and Italian (`fortunes-it`). Each entry is cleaned (attribution
and layout dropped), cut into sentences, and a sentence is kept when it has 3 to 40
words, reads as prose (no ASCII art, code or tables) and looks like its file's language.
"""

from __future__ import annotations

import dataclasses
import os
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
# Folder of each language under the fortunes root ("" is the root: the English packages).
LANGUAGE_FOLDERS = {"en": "", "de": "de", "es": "es", "it": "it"}
# Debian package that installs each language's files.
LANGUAGE_PACKAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es",
                     "it": "fortunes-it"}
# Topics that are pictures or banners rather than prose.
_EXCLUDED_TOPICS = {"ascii-art", "asciiart", "banner", "art-ascii"}
# Subfolders with offensive fortunes (the `off` variants) are never read.
_EXCLUDED_FOLDERS = {"off"}
MIN_WORDS = 3
MAX_WORDS = 40

# Frequent function words, enough to tell the four languages apart on a sentence.
_FUNCTION_WORDS = {
    "en": set("the a an and of to in is it that you for was with he she they we not be are "
              "have has this but on at by or as do if what when his her my your all no".split()),
    "de": set("der die das und ist nicht ein eine zu den mit sich auf dem des für ich du er "
              "sie es wir ihr im wenn man auch noch nur wie was aber oder kein keine bei "
              "wird sind hat".split()),
    "es": set("el la los las de que y en un una es no por con para se lo su al del como más "
              "pero sus le ya o fue este ha sí porque esta son entre cuando muy sin sobre "
              "también me hay yo tu".split()),
    "it": set("il lo la i gli le di che e è un una per non in con si da del della dei al "
              "alla sono come ma più anche se mi ti ci ha ho chi questo quando perché nel "
              "nella tutto".split()),
}
_ALLOWED_PUNCTUATION = set(" .,;:!?¿¡'\"-()«»“”‘’…–—")
# A sentence ends at . ! ? or … (and a closing quote) before a space and the next word.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'»”’)]))\s+"
                           r"(?=[\"'«“‘(¿¡]*[^\W\d_])", re.UNICODE)
_ATTRIBUTION = re.compile(r"^\s*(--|—|~~)")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Sentence:
  text: str
  language: str
  category: str  # The fortune file's topic.


def available_languages(fortunes_dir: str = DEFAULT_FORTUNES_DIR) -> list[str]:
  """Languages whose fortune files are installed under `fortunes_dir`."""
  return [language for language in LANGUAGE_FOLDERS
          if _topic_files(fortunes_dir, language)]


def _topic_files(fortunes_dir: str, language: str) -> list[tuple[str, str]]:
  """(topic, path) of a language's fortune files, sorted; symlinks into other languages out."""
  folder = os.path.join(fortunes_dir, LANGUAGE_FOLDERS[language])
  if not os.path.isdir(folder):
    return []
  files = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if (name.endswith((".dat", ".u8", "-pre")) or name.startswith(".")
        or name in _EXCLUDED_FOLDERS or not os.path.isfile(path)):
      continue
    # The English root links the Italian files in; they belong to their own folder.
    if os.path.islink(path) and os.path.dirname(os.path.realpath(path)) != os.path.realpath(
        folder):
      continue
    topic = name[:-len(".fortunes")] if name.endswith(".fortunes") else name
    if topic not in _EXCLUDED_TOPICS:
      files.append((topic, path))
  return files


def _read_text(path: str) -> str:
  with open(path, "rb") as stream:
    raw = stream.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin-1")


def _entries(text: str) -> Iterable[str]:
  """Fortune entries (separated by lines holding only '%') without their attribution."""
  for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
    lines = []
    for line in entry.splitlines():
      if _ATTRIBUTION.match(line):
        break
      lines.append(line)
    # Indented or tabulated layout means verse, dialogue or tables, not running prose.
    if any(line.startswith(("\t", "    ")) for line in lines if line.strip()):
      continue
    yield " ".join(" ".join(lines).split())


def _is_prose(sentence: str) -> bool:
  for char in sentence:
    if not (char.isalpha() or char.isspace() or char in _ALLOWED_PUNCTUATION):
      return False
  words = sentence.split()
  # A cut that starts mid-sentence (after an abbreviation or a list) is not a sentence.
  first_letter = next((char for char in sentence if char.isalpha()), "")
  if not first_letter.isupper():
    return False
  # Upper-case shouting and one-letter word salads do not read as sentences.
  letters = [char for char in sentence if char.isalpha()]
  if sum(char.isupper() for char in letters) > 0.3 * len(letters):
    return False
  return all(len(word) < 25 for word in words) and sentence[-1] in ".!?…"


def language_scores(sentence: str) -> dict[str, int]:
  """How many of each language's function words the sentence uses."""
  words = [word.casefold() for word in _WORD.findall(sentence)]
  return {language: sum(word in vocabulary for word in words)
          for language, vocabulary in _FUNCTION_WORDS.items()}


def looks_like(sentence: str, language: str) -> bool:
  """The sentence uses its language's function words at least as much as any other's."""
  scores = language_scores(sentence)
  return scores[language] >= 1 and scores[language] >= max(scores.values())


def split_sentences(paragraph: str) -> list[str]:
  return [part.strip() for part in _SENTENCE_END.split(paragraph) if part.strip()]


def _balanced(sentence: str) -> str:
  """Drops quote and bracket marks that a sentence cut left unmatched."""
  for opening, closing in (("(", ")"), ("«", "»"), ("“", "”")):
    if sentence.count(opening) != sentence.count(closing):
      sentence = sentence.replace(opening, "").replace(closing, "")
  if sentence.count('"') % 2:
    sentence = sentence.replace('"', "")
  return " ".join(sentence.split())


def read_sentences(language: str, fortunes_dir: str = DEFAULT_FORTUNES_DIR) -> list[Sentence]:
  """Distinct sentences of one language, in file and entry order.

  Raises:
    ValueError: the language has no fortunes package.
    FileNotFoundError: its package is not installed under `fortunes_dir`.
  """
  if language not in LANGUAGE_FOLDERS:
    raise ValueError(f"no Debian fortunes package for language {language!r}; available: "
                     f"{', '.join(LANGUAGE_FOLDERS)}")
  files = _topic_files(fortunes_dir, language)
  if not files:
    raise FileNotFoundError(
        f"no {language} fortunes under {fortunes_dir}: install the Debian package "
        f"{LANGUAGE_PACKAGES[language]} (scripts/install_system_packages.sh)")
  seen, sentences = set(), []
  for topic, path in files:
    for entry in _entries(_read_text(path)):
      for sentence in split_sentences(unicodedata.normalize("NFC", entry)):
        sentence = _balanced(sentence)
        if not sentence or not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
          continue
        if not _is_prose(sentence) or not looks_like(sentence, language):
          continue
        key = " ".join(_WORD.findall(sentence.casefold()))
        if key in seen:
          continue
        seen.add(key)
        sentences.append(Sentence(text=sentence, language=language, category=topic))
  return sentences


def sample_sentences(languages: Sequence[str], num_sentences: int, seed: int,
                     fortunes_dir: str = DEFAULT_FORTUNES_DIR) -> list[Sentence]:
  """`num_sentences` in total, split evenly over `languages`, chosen with `seed`.

  A sentence that occurs in two languages' files is kept once, so no two utterances of the
  corpus share a sentence.
  """
  if num_sentences < len(languages):
    raise ValueError(f"{num_sentences} sentences cannot cover {len(languages)} languages")


  chosen: list[Sentence] = []
  taken: set[str] = set()
  base, extra = divmod(num_sentences, len(languages))
  for position, language in enumerate(languages):
    wanted = base + (1 if position < extra else 0)
    pool = [s for s in read_sentences(language, fortunes_dir)
            if " ".join(_WORD.findall(s.text.casefold())) not in taken]
    if len(pool) < wanted:
      raise ValueError(f"only {len(pool)} usable {language} sentences in {fortunes_dir}, "
                       f"{wanted} asked for")
    rng = np.random.default_rng([seed, position])
    picked = [pool[i] for i in sorted(rng.choice(len(pool), size=wanted, replace=False))]
    taken.update(" ".join(_WORD.findall(s.text.casefold())) for s in picked)
    chosen += picked
  return chosen
