"""COCO captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

The scores are those of the COCO caption evaluation (``pycocoevalcap.eval.COCOEvalCap``, which BLIP's
``coco_caption_eval`` runs), under the same names and scales: ``Bleu_1`` .. ``Bleu_4`` (corpus BLEU,
closest reference length), ``METEOR``, ``ROUGE_L``, ``CIDEr`` (CIDEr-D, 10 for a perfect match) and
``SPICE``, all in [0, 1] except CIDEr.

**Java.** The COCO evaluation tokenizes captions with Stanford's PTBTokenizer (lowercased, then the
punctuation tokens dropped) and scores METEOR and SPICE with Java programs, all shipped inside
pycocoevalcap. By default (``java=True``) a missing ``java`` is an error that names it: numbers
meant to be compared with published ones should not quietly come from another tokenization.
``java=False`` is the explicit way to run without Java: the captions are tokenized in Python
(:func:`basic_tokenize`, which agrees with PTBTokenizer on ordinary captions but not on every corner
of English), BLEU, ROUGE-L and CIDEr are computed, METEOR and SPICE are skipped, and the result says
all of this in its ``notices``.

**No downloads.** pycocoevalcap 1.2 downloads nothing when imported, but constructing its ``Spice``
scorer downloads Stanford CoreNLP 3.6.0 (several hundred MB, from nlp.stanford.edu) into its package
folder when ``spice/lib/stanford-corenlp-3.6.0.jar`` is missing. SPICE therefore runs only when both
CoreNLP jars are already there (put them there by hand, or run pycocoevalcap's
``get_stanford_models`` once); otherwise it is skipped with a one-line notice. SPICE 1.0 was built for Java 8
and is known to fail on Java 16 and newer (its parse cache serialiser reaches into ``java.lang``,
which the module system refuses); such a failure is raised, not skipped: installing CoreNLP asked
for SPICE.

pycocoevalcap's tokenizer writes its input to a temporary file inside its own package folder and
Java prints a one-line token count on stderr; SPICE keeps its parse cache in that folder as well.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.spice import get_stanford_models as spice_models
    from pycocoevalcap.spice.spice import Spice
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
except ModuleNotFoundError as error:  # an optional dependency: only this module needs it
    raise ModuleNotFoundError(f"the caption metrics need pycocoevalcap ({error}): pip install 'blip-fast[eval]'",
                              name=error.name) from error


@dataclass(frozen=True)
class CaptionMetrics:
    scores: dict[str, float]
    """``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``, ``SPICE``: those that were computed."""
    notices: list[str] = field(default_factory=list)
    """One line per metric skipped, and one when the captions were not tokenized by PTBTokenizer."""


def require_java() -> None:
    """A ValueError (a missing dependency the user can install, said in one line) when ``java`` is not on PATH:
    callers that caption first check it before the long part."""
    if shutil.which("java") is None:
        raise ValueError(
            "the COCO caption metrics need Java: `java` is not on PATH, and PTBTokenizer, METEOR and SPICE (jars "
            "shipped in pycocoevalcap) run on it. Install a Java runtime (e.g. `apt-get install "
            "default-jre-headless`), or score without it (java=False, --no-java: BLEU, ROUGE-L and CIDEr on a "
            "Python tokenization)")


def caption_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                    java: bool = True) -> CaptionMetrics:
    """Corpus scores of ``predictions`` (image id -> one caption) against ``references`` (image id -> its
    reference captions). ``java=False`` runs without Java: Python tokenization, no METEOR, no SPICE."""
    _check_captions(references, predictions)
    if java:
        require_java()
        gts, res = _ptb_tokenize(references, predictions)
        notices = []
    else:
        gts = {image: [basic_tokenize(caption) for caption in references[image]] for image in references}
        res = {image: [basic_tokenize(predictions[image])] for image in references}
        notices = ["tokenized in Python (java=False), not by PTBTokenizer: close to, not always equal to, the "
                   "official COCO scores"]

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if java:
        scores["METEOR"] = _meteor(gts, res)
    else:
        notices.append("METEOR skipped: it runs on Java (java=False)")
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    missing = missing_spice_models()
    if not java:
        notices.append("SPICE skipped: it runs on Java (java=False)")
    elif missing:
        notices.append(f"SPICE skipped: Stanford CoreNLP 3.6.0 is not installed ({', '.join(missing)} missing); "
                       f"pycocoevalcap would download it, blip_fast does not")
    else:
        scores["SPICE"] = _spice(gts, res)
    return CaptionMetrics(scores, notices)


def missing_spice_models() -> list[str]:
    """The Stanford CoreNLP jars SPICE needs that are not installed. The first is the very file whose absence
    makes pycocoevalcap's ``Spice()`` download CoreNLP (same folder and name as its ``get_stanford_models``)."""
    folder = Path(spice_models.SPICEDIR) / spice_models.SPICELIB
    jars = [folder / f"{spice_models.JAR}.jar", folder / f"{spice_models.JAR}-models.jar"]
    return [str(jar) for jar in jars if not jar.is_file()]


# Python stand-in for PTBTokenizer -lowerCase. Brackets become its escape tokens, lowercased, so that, as in the COCO
# evaluation, they survive the punctuation filter (which lists them in upper case). The rules split what it splits in
# captions: clitics ("do n't", "man 's"), symbols, quotes and sentence punctuation, but neither the comma, colon and
# period inside a number ("1,000", "10:30", "3.5") nor a token's last period when it has others ("u.s.a.")
BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
SPLITS = (
    (re.compile(r"\.\.\.+"), " ... "),
    (re.compile(r'["`]'), " '' "),
    (re.compile(r"(?<!\d)[,;:]|[,;:](?!\d)"), r" \g<0> "),
    (re.compile(r"[!?]+(?=\s|$)"), r" \g<0> "),
    (re.compile(r"[$%*=+]"), r" \g<0> "),
    # quotes that do not join two letters, before the clitics are split off (which puts a quote after a space)
    (re.compile(r"'(?!\w)|(?<!\w)'"), " ' "),
    (re.compile(r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b"), r" \1\3\5 \2\4\6 "),
    (re.compile(r"(?<=\w)(n't)\b"), r" \1"),
    (re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b"), r" '\1"),
    (re.compile(r"(?<!\S)([^\s.]+)\.(?=\s|$)"), r"\1 . "),
)


def basic_tokenize(caption: str) -> str:
    """A caption tokenized in Python as the COCO evaluation's PTBTokenizer would: lowercased, split into words and
    punctuation, the punctuation tokens dropped, joined by single spaces."""
    text = caption.lower()
    for bracket, token in BRACKETS.items():
        text = text.replace(bracket, token)
    for pattern, replacement in SPLITS:
        text = pattern.sub(replacement, text)
    return " ".join(token for token in text.split() if token not in PUNCTUATIONS)


def _check_captions(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> None:
    if not references:
        raise ValueError("no images to evaluate")
    missing = [image for image in references if image not in predictions]
    unknown = [image for image in predictions if image not in references]
    if missing or unknown:
        raise ValueError(f"predictions and references must cover the same images: {len(missing)} without a "
                         f"prediction (first {missing[:3]}), {len(unknown)} without references (first {unknown[:3]})")
    for image, captions in references.items():
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"image {image!r}: references must be a non-empty list of str, got {captions!r}")
        if not isinstance(predictions[image], str):
            raise ValueError(f"image {image!r}: a prediction is one str, got {predictions[image]!r}")


def _one_line(caption: str) -> str:
    # PTBTokenizer reads one caption per line and also breaks lines at \r, \v, \x85 and \u2028: a caption
    # spanning two lines would shift every caption after it
    return " ".join(caption.splitlines())


def _ptb_tokenize(references, predictions) -> tuple[dict, dict]:
    """References and predictions tokenized by pycocoevalcap's PTBTokenizer, in one Java run."""
    captions = {("ref", image): [{"caption": _one_line(c)} for c in references[image]] for image in references}
    captions |= {("pred", image): [{"caption": _one_line(predictions[image])}] for image in references}
    tokens = PTBTokenizer().tokenize(captions)
    # the tokenizer pairs its output lines with the captions without counting them: a Java failure would
    # otherwise leave captions out unnoticed
    if any(len(tokens.get(key, ())) != len(value) for key, value in captions.items()):
        raise RuntimeError("PTBTokenizer returned fewer lines than captions; see its Java error output above")
    return ({image: tokens[("ref", image)] for image in references},
            {image: tokens[("pred", image)] for image in references})


def _meteor(gts, res) -> float:
    meteor = Meteor()
    process = meteor.meteor_p
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as error:  # an empty line where a score should be, or a closed pipe: the JVM stopped
        process.kill()
        detail = process.stderr.read().decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"METEOR failed: {detail[-1] if detail else error}") from None
    finally:
        # compute_score keeps its lock when it fails, and Meteor.__del__ takes the lock again: it would wait forever
        if meteor.lock.locked():
            meteor.lock.release()
        # Meteor.__del__ stops the JVM too, but leaves its output pipes open; after this it has nothing left to do
        process.kill()
        with contextlib.suppress(OSError):  # input the stopped JVM never read
            process.stdin.close()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def _spice(gts, res) -> float:
    try:
        return float(Spice().compute_score(gts, res)[0])
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"SPICE failed (java exit status {error.returncode}, its error output is above); SPICE "
                           f"1.0 is known to need Java 8") from None
