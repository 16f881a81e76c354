"""GBNF grammars read as llama.cpp's parser reads them, so that a bad one is refused before it
reaches a worker: some parse there into a crash (`x{2,1}` allocates without end) or a hang."""

from __future__ import annotations

import re
from collections.abc import Iterator

LARGEST = 64 << 10  # characters of GBNF a request may carry
_REPEAT_LIMIT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_ELEMENTS = 1 << 16  # elements the rules may expand to: `"…"{2000}` copies its item 2000 times
_DEPTH = 200  # nested groups, and rules reached one from the start of another (llama.cpp recurses on both)
_STEPS = 1 << 16  # rules llama.cpp's left-recursion check may walk: it walks a shared one once per path to it

# llama_gretype, as far as the checks need it
_END, _ALT, _REF, _OTHER = range(4)
_NAME = re.compile(r"[a-zA-Z0-9-]+")
_DIGITS = re.compile(r"[0-9]+")
_HEX = {"x": 2, "u": 4, "U": 8}
_ESCAPES = 'trn\\"[]-'  # after a backslash, besides x, u and U
_EXPANDS = f"the grammar expands to more than {_ELEMENTS} elements; lower its repetition counts"


class GrammarError(ValueError):
    """Why llama.cpp would not take the grammar, in its own words where it has them."""


class Beyond(GrammarError):
    """Past a bound of rbeed's, which keeps llama.cpp from crashing or hanging on the grammar."""


def check(text: str) -> list[int]:
    """GrammarError unless `text` is a GBNF grammar with a `root` rule that llama.cpp takes; the
    token ids it names (`<[id]>`), which the model's vocabulary must hold (llama.cpp aborts on one
    past it).

    What a <text> token names is left to the worker, which has the model's vocabulary.
    """
    if len(text) > LARGEST:
        raise Beyond(f"the grammar has {len(text)} characters, more than the {LARGEST} rbeed takes")
    if "\0" in text:
        raise Beyond("the grammar holds a NUL character; write it as \\x00")
    parser = _Parser(text)
    parser.parse()
    if "root" not in parser.symbols:
        raise GrammarError("the grammar has no rule named root, where the output starts")
    parser.check_left_recursion()
    return parser.token_ids


def token_ids(text: str) -> list[int]:
    """The token ids a grammar that check() took names (`<[id]>`): parsed again only if it names any."""
    return check(text) if "<[" in text else []


class _Parser:
    """llama_grammar_parser's rules, built as it builds them (the same rules, ids and checks)."""

    def __init__(self, src: str):
        self.src = src
        self.symbols: dict[str, int] = {}
        self.rules: dict[int, list[tuple[int, int]]] = {}
        self.elements = 0
        self.steps = 0
        self.token_ids: list[int] = []  # of the `<[id]>` tokens

    def parse(self) -> None:
        at = self._space(0, True)
        while self._char(at):
            at = self._rule(at)
        if not self.rules:
            raise GrammarError("the grammar has no rules")
        for kind, value in (element for rule in self.rules.values() for element in rule):
            if kind == _REF and value not in self.rules:
                raise GrammarError(f"Undefined rule identifier '{self._name_of(value)}'")

    def check_left_recursion(self) -> None:
        """Refuse a rule that can reach itself before it matches anything, as llama.cpp does, and
        the ones its check misses that would make it build parse stacks without end.

        Its check looks one rule down for rules that may match nothing; it is run as it runs,
        bounded: it walks a rule once for each path to it.
        """
        visited: set[int] = set()
        may_be_empty: set[int] = set()
        for id in sorted(self.rules):
            if id not in visited and self._left_recursive(id, visited, set(), may_be_empty, 0):
                raise GrammarError(f"unsupported grammar, left recursion detected for nonterminal {self._name_of(id)}")
        if (id := self._growing_cycle(self._nullable())) is not None:
            raise Beyond(f"left recursion at rule {self._name_of(id)}, through rules that may match nothing, "
                         "would make llama.cpp's parse stack grow without end")  # fmt: skip

    def _name_of(self, id: int) -> str:
        return next(name for name, number in self.symbols.items() if number == id)

    def _left_recursive(self, id: int, visited: set[int], in_progress: set[int], may_be_empty: set[int], depth: int) -> bool:
        """llama_grammar_detect_left_recursion, counting its steps."""
        if id in in_progress:
            return True
        self.steps += 1
        if depth > _DEPTH or self.steps > _STEPS:
            raise Beyond(f"rules lead to rules more than {_DEPTH} deep, or by too many paths, at their start; "
                         "simplify the grammar")  # fmt: skip
        in_progress.add(id)
        rule = self.rules[id]
        if any(not alternative for alternative in _alternatives(rule)):
            may_be_empty.add(id)
        recurse = True
        for kind, value in rule:
            if kind == _REF and recurse:
                if self._left_recursive(value, visited, in_progress, may_be_empty, depth + 1):
                    return True
                recurse = value in may_be_empty
            else:
                recurse = kind in (_END, _ALT)
        in_progress.discard(id)
        visited.add(id)
        return False

    def _growing_cycle(self, nullable: set[int]) -> int | None:
        """A rule that starts a cycle of rules starting rules in which some reference has more
        after it: llama.cpp pushes that onto the parse stack at each turn."""
        starts = {id: [start for alternative in _alternatives(rule) for start in _leftmost(alternative, nullable)]
                  for id, rule in self.rules.items()}  # fmt: skip
        component = _components({id: [next_id for next_id, _ in following] for id, following in starts.items()})
        for id, following in starts.items():
            if any(grows and component[id] == component[next_id] for next_id, grows in following):
                return id
        return None

    def _nullable(self) -> set[int]:
        """The rules that may match nothing, through any number of rules."""
        counts: list[list[int]] = []  # per alternative of references only: its rule, its references not yet nullable
        users: dict[int, list[int]] = {}  # rule -> those alternatives, once per reference to it
        ready = []
        for id, rule in self.rules.items():
            for alternative in _alternatives(rule):
                if all(kind == _REF for kind, _ in alternative):
                    for _, value in alternative:
                        users.setdefault(value, []).append(len(counts))
                    counts.append([id, len(alternative)])
                    if not alternative:
                        ready.append(id)
        nullable: set[int] = set()
        while ready:
            if (id := ready.pop()) not in nullable:
                nullable.add(id)
                for index in users.get(id, ()):
                    counts[index][1] -= 1
                    if counts[index][1] == 0:
                        ready.append(counts[index][0])
        return nullable

    # -- the text ----------------------------------------------------------------------------

    def _char(self, at: int) -> str:
        return self.src[at] if at < len(self.src) else ""

    def _rest(self, at: int) -> str:
        rest = self.src[at : at + 32]
        return repr(rest + "…" if len(self.src) > at + 32 else rest) if rest else "the end"

    def _space(self, at: int, newline_ok: bool) -> int:
        while (char := self._char(at)) in (" ", "\t", "#") or (newline_ok and char in ("\r", "\n")):
            if char == "#":
                while self._char(at) not in ("", "\r", "\n"):
                    at += 1
            else:
                at += 1
        return at

    def _name(self, at: int) -> int:
        if (match := _NAME.match(self.src, at)) is None:
            raise GrammarError(f"expecting name at {self._rest(at)}")
        return match.end()

    def _int(self, at: int, what: str = "an int") -> tuple[int, int]:
        if (match := _DIGITS.match(self.src, at)) is None:
            raise GrammarError(f"expecting {what} at {self._rest(at)}")
        return int(match.group()), match.end()

    def _escape(self, at: int) -> int:
        """Past one character of a literal or a class, escaped or not."""
        if self._char(at) != "\\":
            if not self._char(at):
                raise GrammarError("unexpected end of input")
            return at + 1
        code = self._char(at + 1)
        if size := _HEX.get(code):
            digits = self.src[at + 2 : at + 2 + size]
            if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise GrammarError(f"expecting {size} hex chars at {self._rest(at + 2)}")
            return at + 2 + size
        if not code or code not in _ESCAPES:
            raise GrammarError(f"unknown escape at {self._rest(at)}")
        return at + 2

    def _token(self, at: int) -> int:
        """Past `<[id]>` or `<text>`: the worker's vocabulary says whether `text` is one token."""
        if self._char(at) != "<":
            raise GrammarError(f"expecting '<' at {self._rest(at)}")
        if self._char(at + 1) == "[":
            token_id, at = self._int(at + 2, "integer")
            self.token_ids.append(token_id)
            for close in "]>":
                if self._char(at) != close:
                    raise GrammarError(f"expecting '{close}' at {self._rest(at)}")
                at += 1
            return at
        if (end := self.src.find(">", at)) < 0:
            raise GrammarError(f"expecting '>' at {self._rest(len(self.src))}")
        return end + 1

    # -- rules, as llama_grammar_parser builds them ------------------------------------------

    def _symbol(self, name: str) -> int:
        return self.symbols.setdefault(name, len(self.symbols))

    def _new_symbol(self, base: str) -> int:
        id = len(self.symbols)  # as llama.cpp numbers it, even where the name is already taken
        self.symbols[f"{base}_{id}"] = id
        return id

    def _add(self, id: int, rule: list) -> None:
        self.elements += len(rule)
        if self.elements > _ELEMENTS:
            raise Beyond(_EXPANDS)
        self.rules[id] = rule

    def _rule(self, at: int) -> int:
        end = self._name(at)
        name = self.src[at:end]
        at = self._space(end, False)
        if self.src[at : at + 3] != "::=":
            raise GrammarError(f"expecting ::= at {self._rest(at)}")
        at = self._alternates(self._space(at + 3, True), name, self._symbol(name), False, 0)
        if self._char(at) == "\r":
            at += 2 if self._char(at + 1) == "\n" else 1
        elif self._char(at) == "\n":
            at += 1
        elif self._char(at):
            raise GrammarError(f"expecting newline or end at {self._rest(at)}")
        return self._space(at, True)

    def _alternates(self, at: int, name: str, id: int, nested: bool, depth: int) -> int:
        rule: list[tuple[int, int]] = []
        at = self._sequence(at, name, rule, nested, depth)
        while self._char(at) == "|":
            rule.append((_ALT, 0))
            at = self._sequence(self._space(at + 1, True), name, rule, nested, depth)
        rule.append((_END, 0))
        self._add(id, rule)
        return at

    def _sequence(self, at: int, name: str, rule: list, nested: bool, depth: int) -> int:
        last_start, prev_rules = len(rule), 1

        def repeat(least: int, most: int | None) -> None:  # most None: no bound
            nonlocal prev_rules
            if last_start == len(rule):
                raise GrammarError(f"expecting preceding item to */+/?/{{ at {self._rest(at)}")
            if most is not None and most < least:
                raise Beyond(f"repetition {{{least},{most}}}: the most is fewer than the least")
            total = most if most else least or 1
            if prev_rules * total > _REPEAT_LIMIT:
                raise GrammarError("number of rules that are going to be repeated multiplied by the new "
                                   "repetition exceeds sane defaults")  # fmt: skip
            item = rule[last_start:]
            if len(rule) + len(item) * max(least - 1, 0) > _ELEMENTS:
                raise Beyond(_EXPANDS)
            del rule[last_start:]
            rule.extend(item * least)
            optional = 1 if most is None else most - least
            last = 0
            for i in range(optional):  # S'(i) ::= S S'(i - 1) | (S' ::= S S' | when unbounded)
                id = self._new_symbol(name)
                again = [(_REF, id if most is None else last)] if i or most is None else []
                self._add(id, item + again + [(_ALT, 0), (_END, 0)])
                last = id
            if optional:
                rule.append((_REF, last))
            prev_rules *= total

        while char := self._char(at):
            if char == '"' or char == "[":
                at += 1
                if char == "[" and self._char(at) == "^":
                    at += 1
                close = '"' if char == '"' else "]"
                last_start, prev_rules = len(rule), 1
                while self._char(at) != close:
                    at = self._escape(at)
                    rule.append((_OTHER, 0))
                    if char == "[" and self._char(at) == "-" and self._char(at + 1) != "]":
                        at = self._escape(at + 1)
                at = self._space(at + 1, nested)
            elif char == "<" or char == "!":
                at += char == "!"
                at = self._token(at)
                last_start, prev_rules = len(rule), 1
                rule.append((_OTHER, 0))
                at = self._space(at, nested)
            elif _NAME.match(char):
                end = self._name(at)
                last_start, prev_rules = len(rule), 1
                rule.append((_REF, self._symbol(self.src[at:end])))
                at = self._space(end, nested)
            elif char == "(":
                if depth >= _DEPTH:
                    raise Beyond(f"groups nested more than {_DEPTH} deep")
                before = len(self.symbols)
                id = self._new_symbol(name)
                at = self._alternates(self._space(at + 1, True), name, id, True, depth + 1)
                prev_rules = max(1, len(self.symbols) - before)
                last_start = len(rule)
                rule.append((_REF, id))
                if self._char(at) != ")":
                    raise GrammarError(f"expecting ')' at {self._rest(at)}")
                at = self._space(at + 1, nested)
            elif char == ".":
                last_start, prev_rules = len(rule), 1
                rule.append((_OTHER, 0))
                at = self._space(at + 1, nested)
            elif char in "*+?":
                at = self._space(at + 1, nested)
                repeat(*{"*": (0, None), "+": (1, None), "?": (0, 1)}[char])
            elif char == "{":
                least, at = self._int(self._space(at + 1, nested))
                at = self._space(at, nested)
                most: int | None = least
                if self._char(at) == ",":
                    at, most = self._space(at + 1, nested), None
                    if _DIGITS.match(self.src, at):
                        most, at = self._int(at)
                        at = self._space(at, nested)
                elif self._char(at) != "}":
                    raise GrammarError(f"expecting ',' at {self._rest(at)}")
                if self._char(at) != "}":
                    raise GrammarError(f"expecting '}}' at {self._rest(at)}")
                at = self._space(at + 1, nested)
                if least > _REPEAT_LIMIT:
                    raise GrammarError("number of repetitions exceeds sane defaults, please reduce the number of repetitions")
                repeat(least, None if most is not None and most > _REPEAT_LIMIT else most)
            else:
                break
        return at


def _alternatives(rule: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    alternative: list[tuple[int, int]] = []
    for element in rule:
        if element[0] in (_END, _ALT):
            yield alternative
            alternative = []
        else:
            alternative.append(element)


def _leftmost(alternative: list[tuple[int, int]], nullable: set[int]) -> Iterator[tuple[int, bool]]:
    """The rules an alternative may start with (its first, and the next while those may match
    nothing), each with whether more follows it."""
    for at, (kind, value) in enumerate(alternative):
        if kind != _REF:
            return
        yield value, at + 1 < len(alternative)
        if value not in nullable:
            return


def _components(edges: dict[int, list[int]]) -> dict[int, int]:
    """Tarjan's strongly connected components of a graph: node -> its component's root."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    component: dict[int, int] = {}
    stack: list[int] = []
    for root in edges:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        work = [(root, iter(edges[root]))]
        while work:
            node, following = work[-1]
            for next_node in following:
                if next_node not in index:
                    index[next_node] = low[next_node] = len(index)
                    stack.append(next_node)
                    work.append((next_node, iter(edges[next_node])))
                    break
                if next_node not in component:  # on the stack
                    low[node] = min(low[node], index[next_node])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    while (member := stack.pop()) != node:
                        component[member] = node
                    component[node] = node
    return component
