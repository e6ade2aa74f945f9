"""Benchmark tasks: items with a gold answer, a way to grade, and a verifier where one exists.

Built in: ``chain_sum`` (multi-step arithmetic, numeric answers, a step verifier) and ``syllogism``
(yes/no classification, scored for accuracy and calibration). A user's own task comes from a JSONL
file (:mod:`natix.bench.task_file`). Built-in task data comes from the Apache-2.0 ``reasoning-gym``
generators, not from text we wrote.
Training and evaluation items are disjoint by construction: an item's split is a function of
its problem text (a hash), so no evaluation problem can ever appear in training data,
whatever seeds or sizes either side uses.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

EVAL_BUCKETS = 5  # of 100: 5% of all problem texts are evaluation-only


def split_of(text: str) -> str:
    """``eval`` or ``train``, decided by the problem text alone."""
    bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100
    return "eval" if bucket < EVAL_BUCKETS else "train"


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


class Task:
    """A task: a stream of items, how to prompt, how to grade, and (optionally) a verifier.

    ``verify(item, text)`` scores a completion without looking at the gold answer (it may use
    the question): it is a legitimate test-time signal, e.g. for best-of-N. Tasks without one
    return None.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "number"  # answer kind: which extractor grades it
    max_tokens: ClassVar[int] = 96
    system: ClassVar[str | None] = None

    def items(self, split: str, n: int, seed: int = 0) -> list[Item]:
        raise NotImplementedError

    def user_text(self, item: Item) -> str:
        return item.question

    @property
    def extractor(self) -> str:
        """The answer extractor's spec (``number``, ``yesno``, ``choice``, ``regex:...``)."""
        return self.kind

    def few_shot(self) -> list[tuple[str, str]]:
        """(user text, assistant answer) turns shown before every question of this task."""
        return []

    def shots(self, k: int, seed: int = 0) -> list[tuple[str, str]]:
        """``k`` worked examples from the training split (disjoint from eval), for the matrix's
        ``few_shot`` axis: longer prompts with real content."""
        return [(self.user_text(it), self.reference_answer(it)) for it in self.items("train", k, seed=seed)]

    def system_for(self, item: Item) -> str | None:
        return self.system

    def prompt(self, tokenizer: Any, item: Item, shots: list[tuple[str, str]] | None = None) -> str:
        """The chat-formatted prompt of ``item``: system message, the task's few-shot turns and
        ``shots``, the question."""
        shots, system = self.few_shot() + list(shots or []), self.system_for(item)
        if not shots:
            from natix.engines.chat import apply_chat

            return apply_chat(tokenizer, self.user_text(item), system=system)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}] if system is not None else []
            for q, a in shots:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": self.user_text(item)})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = ([system] if system else []) + [f"{q}\n{a}" for q, a in shots] + [self.user_text(item)]
        return "\n\n".join(parts)

    def _extractor(self) -> Any:
        from natix.scaling.extract import get_extractor

        return get_extractor(self.extractor)

    def extract(self, text: str) -> str | None:
        return self._extractor()(text)

    def gold_label(self, item: Item) -> str | None:
        """The gold answer in the extractor's canonical form (what an extraction must equal)."""
        ex = self._extractor()
        return ex.normalize(item.gold) if hasattr(ex, "normalize") else ex(item.gold)

    def is_correct(self, answer: str | None, item: Item) -> bool:
        return answer is not None and answer == self.gold_label(item)

    def verify(self, item: Item, text: str) -> float | None:
        return None

    def item_from_text(self, text: str) -> Item | None:
        """The item a free-form prompt poses (e.g. a question sent to natix-serve), so that
        :meth:`verify` can score completions of it; None when the text poses none this task
        recognises. Tasks whose verifier needs only the question override this."""
        return None

    def reference_answer(self, item: Item) -> str:
        """A good completion for ``item`` (calibration data, training targets): the gold
        answer unless the task knows the worked solution."""
        return item.gold

    @property
    def has_verifier(self) -> bool:
        return type(self).verify is not Task.verify


_TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name]()


def available_tasks() -> list[str]:
    return sorted(_TASKS)


# --- chain_sum: multi-step integer addition/subtraction with worked steps ---------------------

_STEP = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")
_FINAL = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
_TERMS = re.compile(r"(-?\d+|[+-])")
_PROBLEM = re.compile(r"arithmetic problem:\s*(-?\d+(?:\s+[+-]\s+\d+)+)\s*=")


def chain_terms(expression: str) -> list[int]:
    """``"4 - 1 + 7"`` -> ``[4, -1, 7]`` (signed terms, left to right)."""
    toks = expression.split()
    out, sign = [int(toks[0])], 1
    for t in toks[1:]:
        if t in "+-":
            sign = 1 if t == "+" else -1
        else:
            out.append(sign * int(t))
    return out


def worked_solution(expression: str) -> str:
    """The step-by-step answer the demo adapter is trained to write:
    ``"4 - 1 = 3. 3 + 7 = 10. The answer is 10."``"""
    toks = expression.split()
    acc, steps = int(toks[0]), []
    for op, num in zip(toks[1::2], toks[2::2]):
        new = acc + int(num) if op == "+" else acc - int(num)
        steps.append(f"{acc} {op} {num} = {new}.")
        acc = new
    return " ".join(steps) + f" The answer is {acc}."


@register_task("chain_sum")
class ChainSum(Task):
    """reasoning-gym ``chain_sum``: 3-5 terms of 1-2 digits, + and -.

    Verifier: parse every ``a op b = c`` step; the first step must start from the question's
    first term, each step must continue from the previous result with the question's next
    term, every step's arithmetic must be right, and the stated final answer must equal the
    last step's result. Score 1.0 when all hold, else the fraction of correct steps times 0.5
    (so partially right chains still rank above garbage). It never reads the gold answer.
    """

    kind = "number"
    max_tokens = 96
    min_terms, max_terms, min_digits, max_digits = 3, 5, 1, 2
    _prefix = "State the final answer to the following arithmetic problem: "

    def items(self, split: str, n: int, seed: int = 0) -> list[Item]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return list(self._iter(split, n, seed))

    def _iter(self, split: str, n: int, seed: int) -> Iterator[Item]:
        import reasoning_gym as rg

        seen: set[str] = set()
        chunk = 0
        while True:
            # eval is ~5% of problems, so draw generously; seeds differ per chunk.
            ds = rg.create_dataset(
                "chain_sum", size=max(200, 4 * n if split == "train" else 40 * n),
                seed=seed * 1000 + chunk, min_terms=self.min_terms, max_terms=self.max_terms,
                min_digits=self.min_digits, max_digits=self.max_digits,
            )
            for x in ds:
                expr = x["metadata"]["expression"]
                if expr in seen or split_of(expr) != split:
                    continue
                seen.add(expr)
                yield Item(f"chain_sum/{split}/{len(seen) - 1}", x["question"], str(x["answer"]),
                           {"expression": expr})
                if len(seen) == n:
                    return
            chunk += 1
            if chunk > 50:
                raise RuntimeError(f"could not draw {n} distinct {split} items for chain_sum")

    def user_text(self, item: Item) -> str:
        return item.question + " Show each step."

    def reference_answer(self, item: Item) -> str:
        return worked_solution(item.meta["expression"])

    def item_from_text(self, text: str) -> Item | None:
        # the last problem in the text: a chat-formatted prompt may quote earlier turns
        found = _PROBLEM.findall(text)
        if not found:
            return None
        expr = " ".join(found[-1].split())
        return Item(f"chain_sum/text/{expr}", f"{self._prefix}{expr} =",
                    str(sum(chain_terms(expr))), {"expression": expr})

    def verify(self, item: Item, text: str) -> float:
        terms = chain_terms(item.meta["expression"])
        steps = _STEP.findall(text)
        if not steps:
            return 0.0
        ok, acc = 0, terms[0]
        chain_ok = len(steps) == len(terms) - 1
        for i, (a, op, b, c) in enumerate(steps):
            a, b, c = int(a), int(b), int(c)
            if (a + b if op == "+" else a - b) == c:
                ok += 1
            expected_term = terms[i + 1] if i + 1 < len(terms) else None
            if a != acc or expected_term is None or (b if op == "+" else -b) != expected_term:
                chain_ok = False
            acc = c
        final = _FINAL.search(text)
        if chain_ok and ok == len(steps) and final is not None and int(final.group(1)) == acc:
            return 1.0
        return 0.5 * ok / len(steps)



# --- syllogism: yes/no classification --------------------------------------------------------


@register_task("syllogism")
class Syllogism(Task):
    """reasoning-gym ``syllogism``: two premises and a conclusion; does it follow? Yes or No.

    A binary classification task of the shape natix was made for (a yes/no decision from a short
    text), so voting is tested where answers are binary and calibration (Brier, ECE of the
    strategy's P(yes)) is reported beside accuracy. No verifier: whether a conclusion follows is
    the answer itself. Train and eval items are split by a hash of the question, as for chain_sum.
    """

    kind = "yesno"
    max_tokens = 32
    system = "Answer the question with Yes or No first, then one short sentence of reason."

    def items(self, split: str, n: int, seed: int = 0) -> list[Item]:
        import reasoning_gym as rg

        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        seen: set[str] = set()
        out: list[Item] = []
        for chunk in range(60):
            ds = rg.create_dataset("syllogism", size=max(200, 4 * n if split == "train" else 40 * n),
                                   seed=seed * 1000 + chunk)
            for x in ds:
                q = x["question"]
                if q in seen or split_of(q) != split:
                    continue
                seen.add(q)
                out.append(Item(f"syllogism/{split}/{len(out)}", q, str(x["answer"]), {"type": x["metadata"].get("type")}))
                if len(out) == n:
                    return out
        raise RuntimeError(f"could not draw {n} distinct {split} items for syllogism")
