"""The test model: small, deterministic, and its samples read as words that end at "."."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import llama_cpp
import pytest

import tinymodel

PLAIN_WORDS = {piece.removeprefix(tinymodel.SPACE) for piece in tinymodel.WORDS}


@pytest.fixture(scope="module")
def llm(tiny_model: pathlib.Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(tiny_model), n_ctx=256, n_threads=1, verbose=False)


def stream(llm: llama_cpp.Llama, prompt: str, **params) -> tuple[list[str], str]:
    pieces, finish = [], None
    for chunk in llm.create_completion(prompt, stream=True, **params):
        choice = chunk["choices"][0]
        pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    return [p for p in pieces if p], finish


def test_file_is_small_and_deterministic_per_seed(tmp_path, tiny_model):
    assert 300_000 < tiny_model.stat().st_size < 600_000
    again = tinymodel.write_tiny_model(tmp_path / "again.gguf")
    other = tinymodel.write_tiny_model(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == tiny_model.read_bytes()
    assert other.read_bytes() != tiny_model.read_bytes()


def test_cli_writes_the_model(tmp_path, tiny_model):
    out = tmp_path / "cli.gguf"
    script = pathlib.Path(tinymodel.__file__)
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == tiny_model.read_bytes()


def test_vocabulary_and_token_types(llm):
    assert llm.n_vocab() == len(tinymodel.VOCAB)
    assert llm.token_eos() == tinymodel.VOCAB.index(tinymodel.EOS)
    assert llm.token_bos() == tinymodel.VOCAB.index("<s>")
    # byte tokens decode to their byte, control tokens to nothing
    assert llm.detokenize([tinymodel.VOCAB.index("<0xE2>")]) == b"\xe2"
    assert llm.detokenize([llm.token_bos(), llm.token_eos()]) == b""
    assert llm.detokenize([tinymodel.VOCAB.index("\u2581cat")]) == b" cat"


def test_samples_are_words_ending_in_a_period(llm):
    finishes = set()
    for seed in range(10):
        pieces, finish = stream(llm, "Once upon a time", max_tokens=100, seed=seed)
        finishes.add(finish)
        text = "".join(pieces)
        assert all(piece.startswith(" ") or piece in (".", ",") for piece in pieces)
        assert set(text.removesuffix(".").replace(",", "").split()) <= PLAIN_WORDS
        assert (finish == "stop") == text.endswith(".")
        assert text.count(".") <= 1
    assert finishes == {"stop"}  # sentences end after a handful of words

    pieces, finish = stream(llm, "the cat sat.", max_tokens=100, seed=0)
    assert (pieces, finish) == ([], "stop")  # EOS right after a period


def test_same_seed_same_text_and_greedy_is_deterministic(llm):
    first = stream(llm, "Once upon a time", max_tokens=40, seed=3)
    assert stream(llm, "Once upon a time", max_tokens=40, seed=3) == first
    assert stream(llm, "Once upon a time", max_tokens=40, seed=4) != first
    greedy = stream(llm, "Once upon a time", max_tokens=40, temperature=0.0, seed=1)
    assert stream(llm, "Once upon a time", max_tokens=40, temperature=0.0, seed=2) == greedy
