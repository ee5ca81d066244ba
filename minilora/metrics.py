"""Scores: ROUGE-L F1 as the published study computed it, a code-aware ROUGE-L, and unbiased pass@k.

- `rouge_l`: `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` with its default tokenizer (lowercase,
  every non-alphanumeric character is a separator, so `a+b` and `a - b` tokenize alike), mean F1.
- `rouge_l_code`: the same LCS F1 from rouge-score, through its `tokenizer=` hook with `CodeTokenizer`:
  identifiers, numbers and each operator, bracket or punctuation mark are tokens, case is kept.
- `pass_at_k`: Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1),
  1 - C(n-c, k) / C(n, k), as the product form of their numerically stable numpy snippet.
"""
import re

from rouge_score import rouge_scorer

# Longest first, so `**=` is one token rather than `**` and `=`.
_OPERATORS = ["**=", "//=", ">>=", "<<=", "...", "===", "!==", "->", "=>", "::", "**", "//", "==", "!=", "<=",
              ">=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", ":=", "&&", "||", "<<", ">>", "++", "--"]
_CODE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*"            # identifiers and keywords
                         r"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"     # numbers: 3, 3.14, 1e-5
                         r"|" + "|".join(re.escape(op) for op in _OPERATORS) +
                         r"|\S")                                # any other single character: ( ) [ ] , : . + = ...


class CodeTokenizer:
    """rouge-score tokenizer hook for code: `tokenize("x[i]+=1")` -> ['x', '[', 'i', ']', '+=', '1']."""

    def tokenize(self, text):
        return _CODE_TOKEN.findall(text)


_SCORERS = {}


def _scorer(code):
    if code not in _SCORERS:  # the default scorer builds a Porter stemmer object: make each once
        _SCORERS[code] = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CodeTokenizer() if code else None)
    return _SCORERS[code]


def rouge_l_scores(predictions, references, code=False):
    """Per-sample ROUGE-L F1 (0-1). rouge-score's argument order is (target, prediction)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    scorer = _scorer(code)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def _mean(values):
    if not values:
        raise ValueError("no samples to score.")
    return sum(values) / len(values)


def rouge_l(predictions, references):
    """Corpus ROUGE-L: the mean over samples of rouge-score's default-tokenizer F1 (the study's metric)."""
    return _mean(rouge_l_scores(predictions, references))


def rouge_l_code(predictions, references):
    """Corpus code-aware ROUGE-L: mean F1 with `CodeTokenizer` (operators and brackets count)."""
    return _mean(rouge_l_scores(predictions, references, code=True))


def pass_at_k(n, c, k):
    """Unbiased P(at least one of k samples passes) from c passing out of n samples (Chen et al. 2021)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no cancellation.
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail
