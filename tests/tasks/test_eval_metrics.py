"""The transfer metrics of `palitorch eval --metrics` (tasks/metrics.py).

VQA accuracy, ANLS and relaxed accuracy against figures worked out by hand from their definitions (VQAv2's
evaluation page and code, Biten et al. 2019, ChartQA's paper); CIDEr-D against pycocoevalcap's own scorer (the
COCO caption evaluation) on the same tokens, within 1e-12 (float64, one summation order); the PTB tokenization
against pycocoevalcap's Java tokenizer where Java is installed.
"""

import random
import shutil

import pytest

from palitorch.tasks.metrics import (
    anls,
    cider,
    edit_distance,
    ptb_tokens,
    relaxed_accuracy,
    score,
    vqa_accuracy,
    vqa_normalize,
)


def test_vqa_accuracy_is_min_of_one_and_matches_over_three_averaged_over_leave_one_out():
    ten = ["yes"] * 3 + ["no"] * 7
    # leaving out one of the three "yes": 2 matches (2/3); leaving out a "no": 3 matches (1)
    assert vqa_accuracy("yes", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("no", ten) == 1.0
    assert vqa_accuracy("maybe", ten) == 0.0
    two = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("red", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(1 / 3 * 9 / 10)


def test_vqa_answers_are_normalized_only_when_the_references_disagree():
    # the references disagree: "Two dogs." is "2 dogs" after normalization, as are the references' forms
    refs = ["2 dogs"] * 5 + ["two dogs"] * 3 + ["dogs"] * 2
    assert vqa_accuracy("Two dogs.", refs) == 1.0
    # all ten agree: compared as given, after stripping (the official evaluation does so: a capital fails)
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    # one reference: its exact match after stripping, normalized never
    assert vqa_accuracy("circle ", ["circle"]) == 1.0
    assert vqa_accuracy("Circle", ["circle"]) == 0.0


@pytest.mark.parametrize("given, normalized", [
    ("The Dog.", "dog"), ("an apple", "apple"), ("Two", "2"), ("none", "0"), ("ten", "10"),
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("im", "im"),
    ("somebody'd", "somebodyd"), ("yall", "y'all"),
    ("red, white", "red white"),  # a comma next to a space: removed
    ("red,white", "red white"),  # none: a space
    ("1,000 people", "1000 people"),  # a digit-comma-digit: every punctuation mark removed
    ("yes!", "yes"), ("3.5", "3.5"), ("end.", "end"), ("a/b", "b"), ("left-handed", "left handed"),
    ("(left)", "left"),
])
def test_vqa_normalization(given, normalized):
    assert vqa_normalize(given) == normalized


def test_edit_distance_matches_the_full_table():
    def table(a, b):
        d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        return d[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choices("abc", k=rng.randint(0, 8)))
        b = "".join(rng.choices("abc", k=rng.randint(0, 8)))
        assert edit_distance(a, b) == table(a, b), (a, b)
    assert edit_distance("kitten", "sitting") == 3


def test_anls():
    assert anls("Hello", ["hello"]) == 1.0  # lower case
    assert anls("hallo", ["hello"]) == pytest.approx(1 - 1 / 5)
    assert anls("helloooooo", ["hello"]) == 0.0  # distance 5 of 10: at the threshold, 0
    assert anls("hellooooo", ["hello"]) == pytest.approx(1 - 4 / 9)
    assert anls("abc", ["xyz", "abd", "abc d"]) == pytest.approx(1 - 1 / 3)  # the closest reference
    assert anls("  two   words ", ["two words"]) == 1.0
    assert anls("", [""]) == 1.0 and anls("x", [""]) == 0.0


def test_relaxed_accuracy():
    assert relaxed_accuracy("12.5", ["12"]) == 1.0  # 4.2% off
    assert relaxed_accuracy("12.7", ["12"]) == 0.0  # 5.8% off
    assert relaxed_accuracy("10%", ["0.104"]) == 1.0  # a percentage is its fraction
    assert relaxed_accuracy("0.0001", ["0"]) == 0.0 and relaxed_accuracy("0", ["0"]) == 1.0  # 0: exactly
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0 and relaxed_accuracy("yes", ["no"]) == 0.0
    assert relaxed_accuracy("nan", ["nan"]) == 1.0 and relaxed_accuracy("1", ["nan"]) == 0.0  # not numbers
    assert relaxed_accuracy("95", ["x", "100"]) == 1.0  # any reference


def test_score_dispatches_and_exact_takes_any_reference():
    assert score("exact", "a  b", ["c", "a b"]) == 1.0 and score("exact", "A b", ["a b"]) == 0.0
    assert score("vqa", "yes", ["yes"] * 10) == 1.0
    assert score("anls", "abcd", ["abce"]) == pytest.approx(0.75)
    assert score("relaxed", "3", ["3.1"]) == 1.0


CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "Two dogs' toys (red) and [blue] {x} items...",
    "It's a don't stop sign; can't you see?", 'He said "hello" -- then left!',
    "The U.S. flag at 3.5 p.m. costs $5 & 50%", "A t-shirt and/or jeans: nice",
    "I'm sure they're here, we'll go, you'd know, I've seen", "a cat's  tail 's  end", "won't cannot gonna",
    "A red, white and blue train sitting on the tracks.", "a kitchen with a stove , sink and refrigerator",
    "Is this a 10-year-old's bike?", "there are 2 people...",
    # (Java's figures for these, as pycocoevalcap tokenizes them, are in test_ptb_tokens_split_as_the_java_tokenizer)
    'A sign that says "Don\'t Walk" (it\'s red)', "The dog\u2019s \u201cball\u201d and the cats\u2019 toys",
    "Wow!! Really?! A dog!?", "a red,white and blue bus at 3:30 with 1,000 people; nice", "she'd've couldn't've",
    "-5 degrees and +3 and --5", "dog(s) and a man--standing and a cat...sitting", "a `quoted` word",
]


def test_ptb_tokens():
    assert ptb_tokens(CAPTIONS[0]) == "a man riding a wave on top of a surfboard".split()
    assert ptb_tokens(CAPTIONS[1]) == "two dogs toys -lrb- red -rrb- and -lsb- blue -rsb- -lcb- x -rcb- items".split()
    assert ptb_tokens(CAPTIONS[2]) == "it 's a do n't stop sign ca n't you see".split()
    assert ptb_tokens(CAPTIONS[4]) == "the u.s. flag at 3.5 p.m. costs $ 5 & 50 %".split()
    assert ptb_tokens(CAPTIONS[7]) == "a cat 's tail 's end".split()


@pytest.mark.parametrize("caption, tokens", [
    # a quote or bracket before a word that ends in a clitic is a token of its own
    (CAPTIONS[13], "a sign that says do n't walk -lrb- it 's red -rrb-"),
    (CAPTIONS[14], "the dog 's ball and the cats toys"),  # curly quotes and apostrophes as straight ones
    (CAPTIONS[15], "wow !! really ?! a dog !?"),  # a run of ! and ? is one token, kept
    (CAPTIONS[16], "a red white and blue bus at 3:30 with 1,000 people nice"),  # a comma between letters splits
    (CAPTIONS[17], "she 'd 've could n't 've"), (CAPTIONS[18], "-5 degrees and +3 and 5"),
    (CAPTIONS[19], "dog -lrb- s -rrb- and a man standing and a cat sitting"),
    (CAPTIONS[20], "a quoted word"),  # a backquote is dropped as a quote
])
def test_ptb_tokens_split_as_the_java_tokenizer(caption, tokens):
    """pycocoevalcap's Java PTBTokenizer's output for each (run by hand, so that this runs without Java)."""
    assert ptb_tokens(caption) == tokens.split()


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer runs Java")
def test_ptb_tokens_match_pycocoevalcaps_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    for i, caption in enumerate(CAPTIONS):
        assert " ".join(ptb_tokens(caption)) == theirs[i][0], caption


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    words = "a an the man woman dog cat red blue green sitting on in of with next to field table plate".split()
    for _ in range(12):
        n = rng.randint(2, 10)
        refs = [[" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
                for _ in range(n)]
        preds = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]
        preds[0] = refs[0][0]  # one answer right, so that the figure is not ~0
        mean, each = Cider().compute_score({i: [" ".join(ptb_tokens(r)) for r in rs] for i, rs in enumerate(refs)},
                                           {i: [" ".join(ptb_tokens(p))] for i, p in enumerate(preds)})
        ours = cider(preds, refs)
        assert sum(ours) / n == pytest.approx(mean, abs=1e-12)
        assert ours == pytest.approx(list(each), abs=1e-12)


def test_cider_of_raw_captions_reads_quotes_and_curly_apostrophes_as_the_coco_evaluation_does():
    refs = [["a sign that says don't walk", "a do not walk sign"], ["the dog's ball on the grass"], ["a red bus"]]
    plain = cider(["a sign that says don't walk", "the dog's ball on the grass", "a bus"], refs)
    assert cider(['A sign that says "Don\'t Walk."', "The dog\u2019s ball on the grass.", "A bus!"], refs) == \
        pytest.approx(plain)


def test_cider_tokenizes_as_the_coco_evaluation_does():
    """Punctuation and case do not change the figure; a different word does."""
    refs = [["A dog on a bench.", "a dog sitting on a bench"], ["Two cats in a field!"], ["a red bus"]]
    plain = cider(["a dog on a bench", "two cats in a field", "a bus"], refs)
    assert cider(["A dog, on a bench.", "Two cats in a field!", "A bus."], refs) == pytest.approx(plain)
    assert cider(["a cat on a bench", "two cats in a field", "a bus"], refs)[0] < plain[0]


@pytest.mark.parametrize("given, normalized", [
    # found by mutation testing; each is what big_vision's postprocess_vqav2_text (the PaliGemma evaluator) gives
    ("x -y well-known", "x y wellknown"),  # a mark with a space before it: removed everywhere in the answer
    ("well-known- yes", "wellknown yes"),  # ... or with one after it
    ("x(-y c-d", "x y c d"),  # which of the two is decided on the answer as given, not as earlier marks left it
    ("2, red-blue", "2 red blue"),  # a digit and a comma but no digit after: not the digit-comma-digit rule
    ("3.", "3"),  # a full stop after a digit but before none: removed
    ("one@two x", "1 2 x"), ("a=b", "b"),  # @ and = are punctuation too
])
def test_vqa_normalization_as_big_vision_gives_it(given, normalized):
    assert vqa_normalize(given) == normalized


def test_vqa_newlines_and_tabs_are_spaces_in_the_answer_and_the_references():
    # (each 1.0 under big_vision's VQAv2 evaluator too: its stripspace_vqav2 on both sides)
    assert vqa_accuracy("two\ndogs", ["two dogs"] * 10) == 1.0
    assert vqa_accuracy("red car", ["red\tcar"] * 10) == 1.0
    assert vqa_accuracy("yes", [" yes\n"] * 10) == 1.0 and vqa_accuracy("circle", ["circle\t"]) == 1.0


def test_anls_references_are_lower_cased_and_spaced_as_the_answer_is():
    assert anls("hello", ["HeLLo"]) == 1.0 and anls("a b", ["A  B "]) == 1.0
    # just under the threshold still scores (distance 10 of 21)
    assert anls("abcdefghijk", ["abcdefghijkxxxxxxxxxx"]) == pytest.approx(1 - 10 / 21)
