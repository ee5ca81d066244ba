"""minilora.metrics against rouge-score itself, hand-computed cases and exact binomials."""
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from minilora.metrics import CodeTokenizer, pass_at_k, rouge_l, rouge_l_code, rouge_l_scores

code_text = st.text(alphabet="abXY_01 +-*/=()[]{}:.,<>\n\t'\"", max_size=40)


def lcs_f1(a, b):
    """F1 of the longest common subsequence of two token lists, written out (0 when either is empty)."""
    if not a or not b:
        return 0.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    p, r = lcs / len(a), lcs / len(b)
    return 0.0 if lcs == 0 else 2 * p * r / (p + r)


def test_rouge_l_hand_case():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5: P = 1, R = 5/6, F = 10/11
    assert rouge_l(["The cat on the mat"], ["the cat sat on the mat."]) == pytest.approx(10 / 11, abs=1e-12)
    # the default tokenizer drops operators: these two lines are identical to it
    assert rouge_l(["a+b"], ["a - b"]) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(code_text, code_text), min_size=1, max_size=4))
def test_rouge_l_equals_rouge_score(pairs):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
    assert rouge_l_scores(preds, refs) == want
    assert rouge_l(preds, refs) == pytest.approx(sum(want) / len(want), abs=1e-12)


@pytest.mark.parametrize("text, tokens", [
    ("x[i]+=1", ["x", "[", "i", "]", "+=", "1"]),
    ("def f(a, b): return a**2 >= 3.5e-1", ["def", "f", "(", "a", ",", "b", ")", ":", "return", "a", "**", "2", ">=", "3.5e-1"]),
    ("if (x == y) { y--; }", ["if", "(", "x", "==", "y", ")", "{", "y", "--", ";", "}"]),
    ("print('Hi')  # ok", ["print", "(", "'", "Hi", "'", ")", "#", "ok"]),
    ("", []),
])
def test_code_tokenizer(text, tokens):
    assert CodeTokenizer().tokenize(text) == tokens


def test_rouge_l_code_hand_case():
    # [a, +, b] vs [a, -, b]: LCS 2, P = R = 2/3
    assert rouge_l_code(["a+b"], ["a - b"]) == pytest.approx(2 / 3, abs=1e-12)
    # case is kept: Foo vs foo differ; [return, Foo] vs [return, foo]: F = 1/2
    assert rouge_l_code(["return Foo"], ["return foo"]) == pytest.approx(0.5, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(code_text, code_text), min_size=1, max_size=4))
def test_rouge_l_code_is_lcs_f1_of_code_tokens(pairs):
    tok = CodeTokenizer()
    want = [lcs_f1(tok.tokenize(p), tok.tokenize(r)) for p, r in pairs]
    got = rouge_l_scores([p for p, _ in pairs], [r for _, r in pairs], code=True)
    assert got == pytest.approx(want, abs=1e-12)


def test_rouge_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        rouge_l_code([], [])


def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_cases():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is c/n
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


def test_pass_at_k_matches_exact_binomials():
    for n in (1, 2, 5, 13, 50, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 5, 10, 100):
                if k <= n:
                    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
