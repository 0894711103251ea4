"""Write ``code.parquet`` (HumanEval style: prompt, completion, tests) from the rows below.

Why: parquet is binary, so the shipped file is generated from this readable list; running the script again
gives the same rows. Every row is executed (prompt + completion + tests) before writing, so a shipped example
can never teach a wrong solution. Usage: ``python examples/data/make_code_parquet.py``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "code.parquet"


def _row(signature: str, doc: str, body: str, *tests: str) -> dict[str, str]:
    """A HumanEval-style row: prompt = signature + docstring, completion = indented body, tests = asserts."""
    return {"prompt": f'{signature}\n    """{doc}"""\n', "completion": body, "tests": "\n".join(tests)}


ROWS: list[dict[str, str]] = [
    _row(
        "def add(a: int, b: int) -> int:",
        "Return the sum of a and b.",
        "    return a + b\n",
        "assert add(2, 3) == 5",
        "assert add(-1, 1) == 0",
        "assert add(0, 0) == 0",
    ),
    _row(
        "def is_even(n: int) -> bool:",
        "Return True if n is even.",
        "    return n % 2 == 0\n",
        "assert is_even(4)",
        "assert not is_even(7)",
        "assert is_even(0)",
    ),
    _row(
        "def reverse_string(s: str) -> str:",
        "Return s reversed.",
        "    return s[::-1]\n",
        "assert reverse_string('abc') == 'cba'",
        "assert reverse_string('') == ''",
    ),
    _row(
        "def count_vowels(s: str) -> int:",
        "Count the vowels (a, e, i, o, u, any case) in s.",
        "    return sum(1 for c in s.lower() if c in 'aeiou')\n",
        "assert count_vowels('Hello World') == 3",
        "assert count_vowels('xyz') == 0",
    ),
    _row(
        "def factorial(n: int) -> int:",
        "Return n! for n >= 0.",
        "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
        "assert factorial(0) == 1",
        "assert factorial(5) == 120",
    ),
    _row(
        "def max_of_list(xs: list[int]) -> int:",
        "Return the largest element of a non-empty list.",
        "    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n"
        "    return best\n",
        "assert max_of_list([3, 9, 2]) == 9",
        "assert max_of_list([-5, -2]) == -2",
    ),
    _row(
        "def is_palindrome(s: str) -> bool:",
        "Return True if s reads the same forwards and backwards.",
        "    return s == s[::-1]\n",
        "assert is_palindrome('racecar')",
        "assert not is_palindrome('python')",
        "assert is_palindrome('')",
    ),
    _row(
        "def fizzbuzz(n: int) -> str:",
        'Return "Fizz", "Buzz", "FizzBuzz" or str(n) by the usual rules.',
        "    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
        "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
        "assert fizzbuzz(15) == 'FizzBuzz'",
        "assert fizzbuzz(9) == 'Fizz'",
        "assert fizzbuzz(10) == 'Buzz'",
        "assert fizzbuzz(7) == '7'",
    ),
    _row(
        "def sum_of_squares(n: int) -> int:",
        "Return 1^2 + 2^2 + ... + n^2.",
        "    return sum(i * i for i in range(1, n + 1))\n",
        "assert sum_of_squares(3) == 14",
        "assert sum_of_squares(0) == 0",
    ),
    _row(
        "def unique_sorted(xs: list[int]) -> list[int]:",
        "Return the distinct elements of xs in ascending order.",
        "    return sorted(set(xs))\n",
        "assert unique_sorted([3, 1, 3, 2]) == [1, 2, 3]",
        "assert unique_sorted([]) == []",
    ),
    _row(
        "def word_count(text: str) -> int:",
        "Return the number of whitespace-separated words in text.",
        "    return len(text.split())\n",
        "assert word_count('the quick brown fox') == 4",
        "assert word_count('   ') == 0",
    ),
    _row(
        "def celsius_to_fahrenheit(c: float) -> float:",
        "Convert a temperature from Celsius to Fahrenheit.",
        "    return c * 9 / 5 + 32\n",
        "assert celsius_to_fahrenheit(0) == 32",
        "assert celsius_to_fahrenheit(100) == 212",
    ),
]


def check(rows: list[dict[str, str]]) -> None:
    """Run every row's prompt + completion + tests; an AssertionError names the broken row."""
    for i, row in enumerate(rows):
        try:
            exec(
                row["prompt"] + row["completion"] + "\n" + row["tests"], {}
            )  # our own inline code, not input
        except Exception as exc:
            raise AssertionError(f"row {i} fails its own tests: {exc!r}") from exc


def main() -> None:
    check(ROWS)
    table = pa.table({key: [row[key] for row in ROWS] for key in ("prompt", "completion", "tests")})
    pq.write_table(table, OUT)
    print(f"wrote {len(ROWS)} rows to {OUT}")


if __name__ == "__main__":
    main()
