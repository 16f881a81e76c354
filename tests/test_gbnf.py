"""GBNF checked in the daemon: the grammars llama.cpp takes and refuses (checked against it), and
rbeed's bounds on those that would crash or hang a worker."""

from __future__ import annotations

import os
import random
import re
import resource
import subprocess
import sys

import llama_cpp
import pytest

from rbeed import gbnf
from rbeed.grammar import gbnf as from_format

from test_infer import PERSON


@pytest.fixture(scope="module")
def takes(tiny_model):
    """Whether llama.cpp makes a grammar sampler of a text, with the tiny model's vocabulary."""
    model = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)

    def takes(text: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(model._model.vocab, text.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    return takes


TAKEN = [
    'root ::= "yes" | "no"',
    'root ::= [a-z]+ ("," [a-z]+){0,3} "."',
    'root ::= a  # a comment\r\na ::= "x" |\n  "y"\n\n',
    r'root ::= "\x41\u00e9\U0001F600\t\n\r\\\"\[\]\-" [^"\\] [\]-] .',
    'root ::= <[5]> !<[7]>+ "a"{0} "b"{2,} "c"{ 1 , 3 }',  # names tokens 5 and 7
    'root ::= ("a" | "b"?)+',  # a rule starting itself last in line: llama.cpp takes it
    'root ::= item{2000}\nitem ::= [0-9]',
    from_format("json"),
    from_format(PERSON),
]

REFUSED = [
    ("root ::= foo", "Undefined rule identifier 'foo'"),
    ('root ::= "a', "unexpected end of input"),
    ("root ::= [a-", "unexpected end of input"),
    ('rot ::= "a"', "the grammar has no rule named root"),
    ("# nothing but a comment\n", "the grammar has no rules"),
    ('root ::= root "a" | "b"', "left recursion detected for nonterminal root"),
    ('root ::= e "a" | "b"\ne ::= "" | root', "left recursion detected for nonterminal"),
    (r'root ::= "\q"', "unknown escape at '\\\\q\"'"),
    (r'root ::= "\x4"', "expecting 2 hex chars at"),
    ('root ::= "a" )', "expecting newline or end at"),
    ('root = "a"', "expecting ::= at"),
    ("root ::= *", "expecting preceding item to */+/?/{"),
    ('root ::= "a"{x}', "expecting an int at"),
    ('root ::= "a"{1;', "expecting ',' at"),
    ('root ::= "a"{1,2', "expecting '}' at"),
    ('root ::= ("a"', "expecting ')' at"),
    ("root ::= <[x]>", "expecting integer at"),
    ("root ::= <[5>", "expecting ']' at"),
    ('root ::= "a"{2001}', "number of repetitions exceeds sane defaults"),
    ('root ::= ("a"{1,50}){1,50}', "exceeds sane defaults"),
]


@pytest.mark.parametrize("text", TAKEN)
def test_grammars_llama_cpp_takes_are_taken(takes, text):
    assert gbnf.check(text) == ([5, 7] if "<[" in text else [])  # the token ids named, for the vocabulary check
    assert takes(text)


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_grammars_llama_cpp_refuses_are_refused_saying_why(takes, text, message):
    with pytest.raises(gbnf.GrammarError) as refused:
        gbnf.check(text)
    assert message in str(refused.value) and not isinstance(refused.value, gbnf.Beyond)
    assert not takes(text)


def random_grammar(rng: random.Random) -> str:
    """Rules built of GBNF's every construct, some with a character dropped or added."""
    atoms = ['"ab"', r'"\n"', r'"\x41"', '""', "[a-z]", r'[^"\\]', "[a-]", r"[\]x]", ".", "<[5]>", "!<[7]>", '"é"']
    repeats = ["*", "+", "?", "{2}", "{1,3}", "{2,}", "{0}", "{ 1 , 2 }", "{40,50}"]
    names = ["root", *rng.sample(["a", "b-c", "x1", "ws"], rng.randint(0, 3))]

    def expression(depth: int) -> str:
        roll = rng.random()
        if depth > 3 or roll < 0.35:
            text = rng.choice(atoms + names)
        elif roll < 0.6:
            text = " ".join(expression(depth + 1) for _ in range(rng.randint(1, 3)))
        else:
            text = "(" + rng.choice([" | ", "\n  | "]).join(expression(depth + 1) for _ in range(rng.randint(1, 3))) + ")"
        return text + rng.choice(repeats) if rng.random() < 0.3 else text

    text = "\n".join(f"{name} ::= " + " | ".join(expression(0) for _ in range(rng.randint(1, 3))) for name in names)
    for _ in range(rng.choice([0, 0, 1, 2])):
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(["", *'"[]()|*+?{},\\-\n :=#<>!.^0a']) + text[at + 1 :]
    return text


def test_random_grammars_are_taken_and_refused_as_llama_cpp_takes_and_refuses_them(takes):
    taken = refused = 0
    for seed in range(600):
        text = random_grammar(random.Random(seed))
        if re.search(r"<(?!\[)", text):
            continue  # a <token> by its text: the model's vocabulary decides, in the worker
        try:
            gbnf.check(text)
        except gbnf.Beyond:
            continue  # llama.cpp could crash on it
        except gbnf.GrammarError as exc:
            assert not takes(text), (text, exc)
            refused += 1
        else:
            assert takes(text), text
            taken += 1
    assert taken > 60 and refused > 300  # both kinds, in numbers


@pytest.mark.parametrize(("text", "message"), [
    ('root ::= "a"{3,1}', "repetition {3,1}: the most is fewer than the least"),  # llama.cpp allocates without end
    ("root ::= " + "(" * 201 + '"a"' + ")" * 201, "groups nested more than 200 deep"),
    ('root ::= "' + "x" * 200 + '"{2000}', "the grammar expands to more than 65536 elements"),
    ('root ::= e root "b" | "c"\ne ::= "a"*', "left recursion at rule root, through rules that may match nothing"),
    ("root ::= r0\n" + "".join(f"r{i} ::= r{i + 1} | r{i + 1} \"x\"\n" for i in range(40)) + 'r40 ::= "y"',
     "or by too many paths"),  # llama.cpp's own check would walk 2**40 paths
    ('root ::= "' + "x" * gbnf.LARGEST + '"', f"more than the {gbnf.LARGEST} rbeed takes"),
    ('root ::= "a\0"', "NUL"),
])  # fmt: skip
def test_grammars_that_would_crash_or_hang_llama_cpp_are_refused_with_rbeeds_bounds(text, message):
    with pytest.raises(gbnf.Beyond, match=re.escape(message)):
        gbnf.check(text)


def test_llama_cpp_crashes_on_the_left_recursion_its_own_check_misses(tiny_model):
    """Why that bound is there: llama.cpp builds parse stacks for it until its memory runs out."""
    script = ("import sys, llama_cpp\n"
              "model = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)\n"
              "llama_cpp.llama_sampler_init_grammar(model._model.vocab, sys.argv[2].encode(), b'root')\n"
              "print('survived')\n")  # fmt: skip

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    grammar = 'root ::= e root "b" | "c"\ne ::= "a"*'
    ran = subprocess.run([sys.executable, "-c", script, str(tiny_model), grammar], capture_output=True, text=True,
                         timeout=120, preexec_fn=limit_memory, env=os.environ | {"GGML_NO_BACKTRACE": "1"})  # fmt: skip
    assert ran.returncode != 0 and "survived" not in ran.stdout, ran.stderr[-2000:]
