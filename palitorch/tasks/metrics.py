"""The metrics PaliGemma's transfers are reported in, for `palitorch eval`: each compares a model's answer with one or
more reference answers (a JSONL line's "answers" list, else its "suffix").

- `exact`: the answer equals the reference, whitespace runs counted as one space (the trainer's measure).
- `vqa`: the VQAv2 accuracy (visualqa.org/evaluation.html): min(1, matches / 3), averaged over the leave-one-out
  subsets of the references (10 human answers in VQAv2: an answer three people gave scores 1). The answer and its
  references are normalized (punctuation, articles, number words, contractions, as the official evaluation's
  tables) only when the references disagree, as big_vision's PaliGemma evaluator does (the official script
  normalizes the answer always and the references less: its figures differ slightly). With one reference it is the
  exact match after stripping (leave-one-out would leave nothing to match).
- `anls`: Average Normalized Levenshtein Similarity (DocVQA, InfographicVQA, ST-VQA; Biten et al. 2019): for the
  closest reference, 1 - edit distance / the longer length, or 0 when that is 0.5 or more; lower case, whitespace
  runs as one space.
- `relaxed`: ChartQA's relaxed accuracy (Masry et al. 2022): a number (a percentage as its fraction) within 5% of a
  non-zero numeric reference counts as right, anything else must match exactly (lower case).
- `cider`: CIDEr-D (Vedantam et al. 2015) over the whole set, as the COCO caption evaluation's pycocoevalcap
  computes it (n-grams up to 4, tf-idf with the document frequencies of the evaluated references, Gaussian length
  penalty sigma 6, clipped counts, x10), on text tokenized as its PTB tokenizer does for plain English
  (`ptb_tokens`). Its figure is for the whole set: a per-example score is that example's part of the mean.

All of them score in [0, 1] per example except CIDEr (0 to 10 per example); the reported figure is the mean.
"""

from __future__ import annotations

import math
import re
from collections import Counter

METRICS = {"exact": "exact_match", "vqa": "vqa_accuracy", "anls": "anls", "relaxed": "relaxed_accuracy",
           "cider": "cider"}  # the name `--metrics` takes -> the name it is reported under

# VQAv2's normalization. Contractions written without their apostrophes get them back: each form below is reached
# from its spellings with one apostrophe left out (couldnt've, couldn'tve -> couldn't've), as the official table
# lists them (its I'm / I'd've keys are capitalized, so they never match a lower-cased word, and are left out).
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
_WORDS = {form[:i] + form[i + 1:]: form for form in _CONTRACTIONS for i, c in enumerate(form) if c == "'"}
_WORDS["somebody'd"] = "somebodyd"  # (so in the official table)
_WORDS.update({w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())})
_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = ';/[]"{}()=+\\_->@<`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop not followed by a digit (3.5 keeps its point)


def normalize_answer(text: str) -> str:
    """Whitespace runs as one space, none at either end: what `exact` compares."""
    return " ".join(text.split())


def vqa_normalize(text: str) -> str:
    """An answer as VQAv2's evaluation compares it when its references disagree: punctuation next to a space (or
    any, in an answer with a digit-comma-digit) removed, other punctuation made a space, full stops not followed by a
    digit removed, lower case, articles dropped, number words as digits, contractions with their apostrophes."""
    loose = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if loose or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    return " ".join(_WORDS.get(w, w) for w in out.lower().split() if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's accuracy of one answer against its references (see the module's docstring)."""
    strip = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    guess = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(strip)) > 1:
        strip, guess = [vqa_normalize(a) for a in strip], vqa_normalize(guess)
    if len(strip) == 1:
        return float(guess == strip[0])
    matches = [a == guess for a in strip]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character, each costing 1."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of one answer: the best over its references of 1 - normalized edit distance, 0 at `threshold` or more."""
    guess = normalize_answer(prediction).lower()
    best = 0.0
    for answer in answers:
        want = normalize_answer(answer).lower()
        if not want and not guess:
            return 1.0
        distance = edit_distance(want, guess) / max(len(want), len(guess))
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _number(text: str) -> float | None:
    """A finite number written as text ("12", "3.5", "-2e3"; "45%" is 0.45), else None."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = 0.05) -> float:
    """1.0 if the answer matches a reference: within `tolerance` relative error where both are numbers and the
    reference is not 0, else exactly (lower case, whitespace runs as one space); else 0.0."""
    guess = normalize_answer(prediction).lower()
    value = _number(guess)
    for answer in answers:
        want = normalize_answer(answer).lower()
        target = _number(want)
        if value is not None and target:
            if abs(value - target) / abs(target) <= tolerance:
                return 1.0
        elif guess == want:
            return 1.0
    return 0.0


# PTB tokenization as the COCO caption evaluation uses it (Stanford's PTBTokenizer, lower case, then its punctuation
# tokens dropped): punctuation apart from words, one token each (brackets as -lrb- and so on, which it keeps: it
# lower-cases them before looking for them among the upper-case ones it drops; a run of ! and ? is one token, which it
# keeps too: "!!"), clitics split off (don't -> do n't, it's -> it 's, she'd've -> she 'd 've, cannot -> can not), a
# full stop kept only inside a word or after an abbreviation's letters (3.5, u.s.), a hyphen or slash inside a word
# kept (t-shirt), a comma or colon inside one only between digits (1,000, 3:30; red,white -> red , white), a sign
# before a number kept (-5), curly quotes and apostrophes read as straight ones (dog’s -> dog 's). Not covered:
# its list of abbreviations (mr.), splits inside a word at other marks (don't-stop, 'twas, dog$5), and the words it
# keeps whole with a leading apostrophe ('90s, 'cause).
_DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_LEADING = re.compile(r"(?:n't|'s|'re|'ve|'ll|'d|'m)(?![^\W_])|[-+]\d")  # where a word's leading marks stop: "'s", -5
_SPLIT = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_ABBREVIATION = re.compile(r"(?:[a-z]\.)+")  # u.s. p.m.
# where a word is split at punctuation: brackets, double quotes, ; and --; , and : but between digits (1,000 3:30), and
# ... between letters, but before a hyphenated part (x,t-shirt is one word)
_INSIDE = re.compile(r'[()\[\]{}";]|-{2,}|(?<!\d):|:(?!\d)|(?:(?<!\d),|,(?!\d)|(?<=\w)\.{3,}(?=\w))(?![\w.,]*-\w)')
_MARK = re.compile(r"[!?]+|-+|''|``|.")  # one punctuation token: a run of ! and ?, or of hyphens, '' and ``, a mark
_MARK_END = re.compile(f"(?:{_MARK.pattern})\\Z")
_STRAIGHT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"',
                           "\u00bb": '"', "\u2026": "..."})


def ptb_tokens(text: str) -> list[str]:
    """`text`'s words as pycocoevalcap's PTB tokenization gives them, for plain English (see above)."""
    tokens = []
    for word in _INSIDE.sub(lambda m: f" {m[0]} ", text.translate(_STRAIGHT).lower()).split():
        head, tail = [], []
        while word and not word[0].isalnum() and not _LEADING.match(word):
            n = _MARK.match(word).end()
            head, word = head + [word[:n]], word[n:]
        while word and not word[-1].isalnum() and not _ABBREVIATION.fullmatch(word):
            n = _MARK_END.search(word).start()
            tail, word = [word[n:]] + tail, word[:n]
        core = []
        while clitic := _CLITIC.fullmatch(word):  # she'd've -> she 'd 've
            core, word = [clitic[2]] + core, clitic[1]
        core = ((not core and _SPLIT.get(word)) or ([word] if word else [])) + core  # (cannot's: cannot 's)
        tokens += [t for t in (_BRACKETS.get(t, t) for t in head + core + tail) if t not in _DROPPED]
    return tokens


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> list[float]:
    """Each example's CIDEr-D score (their mean is the set's CIDEr), as pycocoevalcap computes it: document
    frequencies from the references of all `predictions`, so the figure depends on the set evaluated."""
    hyps = [_ngrams(ptb_tokens(p)) for p in predictions]
    refs = [[_ngrams(ptb_tokens(r)) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_n = math.log(float(len(refs))) if refs else 0.0

    def vector(counts: Counter):
        vec, norm, length = {}, [0.0] * 4, 0
        for gram, tf in counts.items():
            vec[gram] = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[len(gram) - 1] += vec[gram] ** 2
            length += tf if len(gram) == 2 else 0  # (pycocoevalcap's length counts bigrams)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, rs in zip(hyps, refs):
        vec, norm, length = vector(hyp)
        total = 0.0
        for r in rs:
            rvec, rnorm, rlength = vector(r)
            sims = [0.0] * 4
            for gram, v in vec.items():
                sims[len(gram) - 1] += min(v, rvec.get(gram, 0.0)) * rvec.get(gram, 0.0)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
            total += sum(s / (norm[n] * rnorm[n]) if norm[n] and rnorm[n] else s for n, s in enumerate(sims)) \
                * penalty / 4
        scores.append(10.0 * total / len(rs) if rs else 0.0)
    return scores


def score(metric: str, prediction: str, answers: list[str]) -> float:
    """One example's score under a per-example metric (every one but `cider`)."""
    if metric == "exact":
        return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))
    return {"vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy}[metric](prediction, answers)
