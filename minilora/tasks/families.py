"""The task families of the embedded data set: one small Python function each, written for this project.

A family fixes what the function does; a task of the family picks its name, its parameter's name and its
constant(s). Each family gives:
  kind       what the function takes: "number" (an int), "list" (a list of ints), "string", "dict" (str -> int)
  verbs      stems of the function names (the task adds a noun: `bump_prices`)
  constants  the values the constant `k` (and `k2`) may take; () when the family has none
  says       what the function returns, in words, with {p} (the parameter) and {k}/{k2} (the constants as
             Python literals); used for the instruction and the docstring
  body       the reference solution's body, same placeholders
  oracle     (argument, k, k2) -> the expected result, computed here in Python, independently of `body`,
             so a test that runs `body` against the oracle's answers checks the template
  example    True: the task's optional input shows one call and its result
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    verbs: tuple
    constants: tuple
    says: str
    body: str
    oracle: object
    example: bool = False


NUMBERS = tuple(range(2, 20))
SMALL = (2, 3, 4, 5)
LETTERS = tuple("abcdeilmnorstu")
AFFIXES = ("pre_", "tmp_", "my_", "old_", "new_", "x_", "id_", "key_")
SUFFIXES = ("_v2", "_bak", "_end", ".txt", ".py", "_ok", "_new", "!")
KEYS = ("a", "b", "red", "blue", "x", "total", "count", "name")

FAMILIES = (
    # ---------------------------------------------------------------- numbers
    Family("add_const", "number", ("add", "plus", "raise"), NUMBERS,
           "returns {p} plus {k}", "return {p} + {k}", lambda x, k, k2: x + k),
    Family("sub_const", "number", ("minus", "lower", "reduce"), NUMBERS,
           "returns {p} minus {k}", "return {p} - {k}", lambda x, k, k2: x - k),
    Family("mul_const", "number", ("times", "scale", "multiply"), NUMBERS,
           "returns {p} multiplied by {k}", "return {p} * {k}", lambda x, k, k2: x * k),
    Family("floor_div", "number", ("split", "divide", "share"), NUMBERS,
           "returns {p} divided by {k}, rounded down (integer division)", "return {p} // {k}",
           lambda x, k, k2: x // k),
    Family("remainder", "number", ("mod", "rest", "remainder"), NUMBERS,
           "returns the remainder of {p} divided by {k}", "return {p} % {k}", lambda x, k, k2: x % k),
    Family("is_multiple", "number", ("divisible", "is_multiple", "fits"), NUMBERS,
           "returns True if {p} is a multiple of {k}, else False", "return {p} % {k} == 0",
           lambda x, k, k2: x % k == 0),
    Family("cap", "number", ("cap", "limit", "clip"), NUMBERS,
           "returns {p}, but never more than {k}", "return min({p}, {k})", lambda x, k, k2: min(x, k)),
    Family("floor", "number", ("floor", "at_least", "bound"), NUMBERS,
           "returns {p}, but never less than {k}", "return max({p}, {k})", lambda x, k, k2: max(x, k)),
    Family("power", "number", ("power", "pow", "exp"), SMALL,
           "returns {p} to the power {k}", "return {p} ** {k}", lambda x, k, k2: x ** k),
    Family("above", "number", ("above", "exceeds", "over"), NUMBERS,
           "returns True if {p} is greater than {k}, else False", "return {p} > {k}", lambda x, k, k2: x > k),
    Family("affine", "number", ("affine", "linear", "line"), tuple((a, b) for a in SMALL for b in (1, 3, 5, 7, 9)),
           "returns {p} times {k} plus {k2}", "return {p} * {k} + {k2}", lambda x, k, k2: x * k + k2),
    # ---------------------------------------------------------------- lists
    Family("list_add", "list", ("bump", "shift", "offset"), NUMBERS,
           "returns a new list with {k} added to every element of {p}", "return [v + {k} for v in {p}]",
           lambda xs, k, k2: [v + k for v in xs], example=True),
    Family("list_mul", "list", ("stretch", "grow", "amplify"), NUMBERS,
           "returns a new list with every element of {p} multiplied by {k}", "return [v * {k} for v in {p}]",
           lambda xs, k, k2: [v * k for v in xs], example=True),
    Family("keep_above", "list", ("keep_above", "big", "large"), NUMBERS,
           "returns the elements of {p} that are greater than {k}, in order", "return [v for v in {p} if v > {k}]",
           lambda xs, k, k2: [v for v in xs if v > k]),
    Family("keep_below", "list", ("keep_below", "small", "tiny"), NUMBERS,
           "returns the elements of {p} that are less than {k}, in order", "return [v for v in {p} if v < {k}]",
           lambda xs, k, k2: [v for v in xs if v < k]),
    Family("count_value", "list", ("count", "tally", "occurrences"), NUMBERS,
           "returns how many times {k} occurs in {p}", "return {p}.count({k})", lambda xs, k, k2: xs.count(k)),
    Family("count_above", "list", ("count_above", "how_many", "num_over"), NUMBERS,
           "returns how many elements of {p} are greater than {k}", "return sum(1 for v in {p} if v > {k})",
           lambda xs, k, k2: sum(1 for v in xs if v > k)),
    Family("take", "list", ("head", "take", "first"), SMALL,
           "returns the first {k} elements of {p}", "return {p}[:{k}]", lambda xs, k, k2: xs[:k]),
    Family("drop", "list", ("drop", "skip", "tail"), SMALL,
           "returns {p} without its first {k} elements", "return {p}[{k}:]", lambda xs, k, k2: xs[k:]),
    Family("contains", "list", ("has", "contains", "includes"), NUMBERS,
           "returns True if {k} is in {p}, else False", "return {k} in {p}", lambda xs, k, k2: k in xs),
    Family("total", "list", ("total", "sum", "add_up"), (),
           "returns the sum of the elements of {p}", "return sum({p})", lambda xs, k, k2: sum(xs), example=True),
    Family("largest", "list", ("largest", "biggest", "top"), (),
           "returns the largest element of {p}, or None if {p} is empty", "return max({p}) if {p} else None",
           lambda xs, k, k2: max(xs) if xs else None),
    Family("smallest", "list", ("smallest", "least", "bottom"), (),
           "returns the smallest element of {p}, or None if {p} is empty", "return min({p}) if {p} else None",
           lambda xs, k, k2: min(xs) if xs else None),
    Family("reverse", "list", ("reverse", "flip", "backwards"), (),
           "returns the elements of {p} in reverse order", "return {p}[::-1]", lambda xs, k, k2: xs[::-1],
           example=True),
    Family("evens", "list", ("evens", "even", "pairs"), (),
           "returns the even elements of {p}, in order", "return [v for v in {p} if v % 2 == 0]",
           lambda xs, k, k2: [v for v in xs if v % 2 == 0]),
    Family("find", "list", ("find", "index", "locate"), NUMBERS,
           "returns the index of the first {k} in {p}, or -1 if there is none",
           "return {p}.index({k}) if {k} in {p} else -1", lambda xs, k, k2: xs.index(k) if k in xs else -1),
    Family("replace_value", "list", ("swap", "replace", "substitute"),
           tuple((a, b) for a in (2, 3, 5, 7, 11) for b in (0, 1, 4, 9)),
           "returns a copy of {p} where every {k} is replaced by {k2}",
           "return [{k2} if v == {k} else v for v in {p}]", lambda xs, k, k2: [k2 if v == k else v for v in xs]),
    Family("sort_list", "list", ("sort", "order", "rank"), (),
           "returns the elements of {p} sorted from smallest to largest", "return sorted({p})",
           lambda xs, k, k2: sorted(xs), example=True),
    # ---------------------------------------------------------------- strings
    Family("repeat", "string", ("repeat", "echo", "copies"), SMALL,
           "returns {p} repeated {k} times", "return {p} * {k}", lambda s, k, k2: s * k, example=True),
    Family("prefix", "string", ("prefix", "tag", "label"), AFFIXES,
           "returns {p} with {k} added at the front", "return {k} + {p}", lambda s, k, k2: k + s),
    Family("suffix", "string", ("suffix", "extend", "append_to"), SUFFIXES,
           "returns {p} with {k} added at the end", "return {p} + {k}", lambda s, k, k2: s + k),
    Family("upper", "string", ("upper", "shout", "capitals"), (),
           "returns {p} in upper case", "return {p}.upper()", lambda s, k, k2: s.upper(), example=True),
    Family("count_char", "string", ("count_char", "letters", "char_count"), LETTERS,
           "returns how many times the letter {k} occurs in {p}", "return {p}.count({k})",
           lambda s, k, k2: s.count(k)),
    Family("starts", "string", ("starts", "begins", "opens"), LETTERS,
           "returns True if {p} starts with {k}, else False", "return {p}.startswith({k})",
           lambda s, k, k2: s.startswith(k)),
    Family("first_chars", "string", ("clip_text", "shorten", "truncate"), SMALL,
           "returns the first {k} characters of {p}", "return {p}[:{k}]", lambda s, k, k2: s[:k]),
    Family("replace_char", "string", ("replace_char", "mask", "blank"),
           tuple((a, b) for a in "aeiou" for b in "xyz*-"),
           "returns {p} with every {k} replaced by {k2}", "return {p}.replace({k}, {k2})",
           lambda s, k, k2: s.replace(k, k2)),
    Family("longer", "string", ("longer", "is_long", "wordy"), SMALL + (6, 7, 8),
           "returns True if {p} has more than {k} characters, else False", "return len({p}) > {k}",
           lambda s, k, k2: len(s) > k),
    Family("reverse_text", "string", ("mirror", "reverse_text", "backward"), (),
           "returns the characters of {p} in reverse order", "return {p}[::-1]", lambda s, k, k2: s[::-1],
           example=True),
    # ---------------------------------------------------------------- dicts
    Family("lookup", "dict", ("lookup", "get", "fetch"), tuple((key, d) for key in KEYS for d in (0, -1)),
           "returns the value stored under the key {k} in {p}, or {k2} if there is none",
           "return {p}.get({k}, {k2})", lambda d, k, k2: d.get(k, k2)),
    Family("sorted_keys", "dict", ("keys", "names", "labels"), (),
           "returns the keys of {p} as a sorted list", "return sorted({p})", lambda d, k, k2: sorted(d)),
    Family("scale_values", "dict", ("scale_values", "weigh", "boost"), NUMBERS,
           "returns a new dict with the same keys as {p} and every value multiplied by {k}",
           "return {{key: v * {k} for key, v in {p}.items()}}", lambda d, k, k2: {key: v * k for key, v in d.items()}),
    Family("value_sum", "dict", ("value_sum", "sum_values", "grand_total"), (),
           "returns the sum of the values of {p}", "return sum({p}.values())", lambda d, k, k2: sum(d.values())),
    Family("keys_above", "dict", ("keys_above", "winners", "passing"), NUMBERS,
           "returns the sorted list of the keys of {p} whose value is greater than {k}",
           "return sorted(key for key, v in {p}.items() if v > {k})",
           lambda d, k, k2: sorted(key for key, v in d.items() if v > k)),
)

# The nouns that complete a function name, and the parameter names, by kind.
NOUNS = {
    "number": ("value", "count", "score", "total", "size", "amount", "level", "age"),
    "list": ("values", "items", "scores", "prices", "numbers", "counts", "points", "marks"),
    "string": ("word", "text", "name", "title", "line", "label", "code", "tag"),
    "dict": ("table", "stock", "prices", "votes", "counts", "grades", "scores", "ages"),
}
PARAMETERS = {
    "number": ("n", "x", "value", "num"),
    "list": ("xs", "values", "nums", "items"),
    "string": ("s", "text", "word", "string"),
    "dict": ("d", "table", "counts", "mapping"),
}
