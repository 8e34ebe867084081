"""Verifiers: a reward for one sampled completion, ``reward(prompt, completion, reference) -> float``.

Three kinds, named as ``dft sample --verifier`` takes them ([`load_verifier`][dft.verifiers.load_verifier]):

* ``exact``: 1.0 when the final answers match, else 0.0. The final answer of a text is the content of its
  last ``\\boxed{...}`` when there is one, else its last number, else the stripped text
  ([`extract_answer`][dft.verifiers.extract_answer]; ``answer_regex`` overrides: the last match, its first group if it
  has one). Two answers that both read as numbers are compared as numbers (``88`` = ``88.0``, ``1,000`` = ``1000``;
  a minus sign counts when it does not follow a digit, a letter or a bracket: ``52-17`` ends in ``17``),
  others as text with spaces, ``$`` and a trailing period removed.
* ``math``: ``math-verify`` (Hugging Face's answer checker: LaTeX and expressions parsed to SymPy and
  compared symbolically), an optional extra: ``pip install 'dft-loss[math]'``.
* ``"MODULE:FUNCTION"``: a user function ``reward(prompt, completion, reference) -> float``, imported from
  an importable module or a ``path/to/file.py``. ``prompt`` is the row's prompt as it appears in the data (a
  string, or for chat rows the list of messages before the reference turn); ``reference`` is the row's
  completion / last assistant turn, ``None`` when the row has none.

A sample is *accepted* when its reward is ``>= threshold`` (default 1.0). [`reward_of`][dft.verifiers.reward_of] calls a
verifier and checks what it returns (a finite real number, else [`VerifierError`][dft.verifiers.VerifierError]).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

__all__ = [
    "ExactVerifier",
    "MathVerifier",
    "Verifier",
    "VerifierError",
    "extract_answer",
    "load_verifier",
    "needs_reference",
    "reward_of",
]

Verifier = Callable[[Any, str, Any], float]
"""``reward(prompt, completion, reference) -> float``."""

_SIGN = r"(?:(?<![\w)\]}.])-)?"
_NUMBER = re.compile(rf"{_SIGN}(?:\d+(?:,\d{{3}})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


class VerifierError(ValueError):
    """A verifier that cannot be loaded, or that raised / returned something other than a number."""


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[begin : i - 1] if depth == 0 else text[begin:]


def extract_answer(text: str, answer_regex: str | re.Pattern | None = None) -> str:
    """The final answer of ``text``: see the module docstring. ``""`` when ``answer_regex`` does not match."""
    if answer_regex is not None:
        pattern = re.compile(answer_regex) if isinstance(answer_regex, str) else answer_regex
        matches = list(pattern.finditer(text))
        if not matches:
            return ""
        last = matches[-1]
        return (last.group(1) if pattern.groups else last.group(0)).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip()


def _as_number(text: str) -> Decimal | None:
    text = text.strip().strip("$").strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        return None


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    return re.sub(r"\s+", "", text).rstrip(".")


class ExactVerifier:
    """``exact``: 1.0 when [`extract_answer`][dft.verifiers.extract_answer] of the completion equals that of the
    reference."""

    needs_reference = True

    def __init__(self, answer_regex: str | None = None) -> None:
        self.answer_regex = re.compile(answer_regex) if answer_regex is not None else None

    def __call__(self, prompt: Any, completion: str, reference: Any) -> float:
        if reference is None:
            raise VerifierError("the exact verifier needs a reference answer")
        got = extract_answer(completion, self.answer_regex)
        want = extract_answer(str(reference), self.answer_regex)
        if not got or not want:
            return 0.0
        a, b = _as_number(got), _as_number(want)
        if a is not None and b is not None:
            return float(a == b)
        return float(_normalise(got) == _normalise(want))

    def __repr__(self) -> str:
        regex = f"answer_regex={self.answer_regex.pattern!r}" if self.answer_regex else ""
        return f"ExactVerifier({regex})"


class MathVerifier:
    """``math``: ``math_verify.verify(parse(reference), parse(completion))`` as 1.0 / 0.0.

    math-verify bounds its parsing and comparison with ``signal.alarm``, which only the main thread may
    set: elsewhere the calls run without that timeout.
    """

    needs_reference = True

    def __init__(self) -> None:
        try:
            import math_verify
        except ImportError:
            raise VerifierError(
                "--verifier math needs math-verify: pip install 'dft-loss[math]' (or pip install math-verify)."
            ) from None
        self._mv = math_verify

    def __call__(self, prompt: Any, completion: str, reference: Any) -> float:
        if reference is None:
            raise VerifierError("the math verifier needs a reference answer")
        main = threading.current_thread() is threading.main_thread()
        limit = {} if main else {"parsing_timeout": None}
        gold = self._mv.parse(str(reference), **limit)
        pred = self._mv.parse(completion, **limit)
        return float(self._mv.verify(gold, pred, **({} if main else {"timeout_seconds": None})))

    def __repr__(self) -> str:
        return "MathVerifier()"


def needs_reference(verifier: Verifier) -> bool:
    """Whether every row must carry a reference (``exact``, ``math``); user functions decide for themselves."""
    return bool(getattr(verifier, "needs_reference", False))


def _import_module(name: str) -> Any:
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise VerifierError(f"--verifier {name}: file not found")
        spec = importlib.util.spec_from_file_location(f"_dft_verifier_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # `dft sample` finds modules in the cwd
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(name)


def load_verifier(spec: str | Verifier, *, answer_regex: str | None = None) -> Verifier:
    """``"exact"``, ``"math"``, ``"MODULE:FUNCTION"`` (or ``"path/to/file.py:FUNCTION"``), or a callable.

    Raises [`VerifierError`][dft.verifiers.VerifierError] (one line) when the spec names nothing callable, the module
    does not import, math-verify is missing, or ``answer_regex`` is given with a verifier that does not use it / is
    not a valid regular expression.
    """
    if callable(spec):
        if answer_regex is not None:
            raise VerifierError("answer_regex applies to the exact verifier only")
        return spec
    if not isinstance(spec, str) or not spec:
        raise VerifierError(f"a verifier is 'exact', 'math', 'MODULE:FUNCTION' or a callable; got {spec!r}")
    if answer_regex is not None and spec != "exact":
        raise VerifierError(f"--answer_regex applies to --verifier exact only, not {spec}")
    if spec == "exact":
        try:
            return ExactVerifier(answer_regex)
        except re.error as e:
            raise VerifierError(f"--answer_regex {answer_regex!r} is not a valid regular expression: {e}") from None
    if spec == "math":
        return MathVerifier()
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise VerifierError(f"--verifier must be exact, math or MODULE:FUNCTION; got {spec!r}")
    try:
        module = _import_module(module_name)
    except VerifierError:
        raise
    except Exception as e:  # ImportError, or whatever the module raises at import
        raise VerifierError(f"--verifier {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise VerifierError(f"--verifier {spec}: {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise VerifierError(f"--verifier {spec}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def reward_of(verifier: Verifier, prompt: Any, completion: str, reference: Any) -> float:
    """``float(verifier(prompt, completion, reference))``; [`VerifierError`][dft.verifiers.VerifierError] when it raises
    or returns something that is not a finite real number (``bool`` counts as 0 / 1)."""
    try:
        value = verifier(prompt, completion, reference)
    except VerifierError:
        raise
    except Exception as e:
        raise VerifierError(f"the verifier {_name(verifier)} raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VerifierError(
            f"the verifier {_name(verifier)} returned {type(value).__name__} {value!r:.60}, not a number"
        ) from None
    if isinstance(value, (str, bytes)) or not math.isfinite(number):
        raise VerifierError(f"the verifier {_name(verifier)} returned {value!r:.60}, not a finite number")
    return number


def _name(verifier: Verifier) -> str:
    if isinstance(verifier, (ExactVerifier, MathVerifier)):
        return repr(verifier)
    module = getattr(verifier, "__module__", None) or ""
    return f"{module}:{getattr(verifier, '__qualname__', repr(verifier))}".lstrip(":")
