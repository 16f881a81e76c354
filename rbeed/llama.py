"""The worker's Llama: llama-cpp-python's, sampling under a grammar as llama.cpp's own server does.

Imported by the worker process only, once CUDA_VISIBLE_DEVICES is set: it loads libllama.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import llama_cpp
import numpy
from llama_cpp._internals import LlamaSampler, LlamaTokenDataArray

from rbeed import gbnf, wire


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama whose generate() takes `grammar` as GBNF text, and samples under it
    through a _GrammarChecked; adds `logit_bias` (set before generate()) to the logits first; and
    has its penalties count the `prompt` (set before generate()) as well as the text generated."""

    logit_bias: dict[int, float] | None = None  # token id -> what to add to its logit; ids < n_vocab()
    prompt: list[int] = []  # the prompt's tokens, which the penalties count as llama-server's do

    def _init_sampler(self, grammar: str | None = None, **params: Any) -> Any:
        chain = super()._init_sampler(**params)
        penalized = (params.get("repeat_penalty", 1.0) != 1.0 or params.get("frequency_penalty", 0.0) != 0.0
                     or params.get("presence_penalty", 0.0) != 0.0)  # fmt: skip
        if penalized and self.last_n_tokens_size > 0:  # the other samplers in the chain take no notice
            for token in self.prompt[-self.last_n_tokens_size :]:
                llama_cpp.llama_sampler_accept(chain.sampler, token)
        if self.logit_bias:
            chain = _biased(chain, self.n_vocab(), self.logit_bias)
        if grammar is None:
            return chain
        # The daemon checks the ids from the catalog; again here, as llama.cpp aborts on one past the vocabulary.
        if why := wire.unknown_token("grammar", gbnf.token_ids(grammar), self.n_vocab(), "the model's"):
            raise gbnf.GrammarError(why)
        parsed = llama_cpp.llama_sampler_init_grammar(self._model.vocab, grammar.encode(), b"root")
        if not parsed:  # LlamaSampler.add_grammar would put NULL in its chain: a segfault at the first token
            raise gbnf.GrammarError("the output's grammar does not parse (is each <token> in it one of the model's?); "
                                    "the worker's log says why")  # llama.cpp wrote it
        checker = LlamaSampler()
        llama_cpp.llama_sampler_chain_add(checker.sampler, parsed)  # the chain owns it from here
        return _GrammarChecked(chain, checker, self.n_vocab())


def _biased(chain: LlamaSampler, n_vocab: int, logit_bias: dict[int, float]) -> LlamaSampler:
    """`chain` behind llama.cpp's logit-bias sampler, which comes first, as in llama-server's chain:
    before the penalties and top-k (generate() has no logit_bias; create_completion's is per token
    Python over the whole vocabulary)."""
    biased = LlamaSampler()
    biased.add_logit_bias(n_vocab, logit_bias)
    while llama_cpp.llama_sampler_chain_n(chain.sampler):  # removed, a sampler is the new chain's to free
        llama_cpp.llama_sampler_chain_add(biased.sampler, llama_cpp.llama_sampler_chain_remove(chain.sampler, 0))
    return biased


class _GrammarChecked:
    """Samples a token as if there were no grammar, then asks the grammar about that one token;
    only when the grammar refuses it are all the logits filtered through the grammar and the
    token sampled again (llama.cpp's common_sampler_sample).

    llama-cpp-python puts the grammar in the chain, where it filters the whole vocabulary at
    every token: gemma3's 262,144 cost ~50 ms a token, a fifth of the free decode rate.
    """

    def __init__(self, chain: LlamaSampler, grammar: LlamaSampler, n_vocab: int):
        self.chain, self.grammar, self.n_vocab = chain, grammar, n_vocab
        self.candidates = LlamaTokenDataArray(n_vocab=n_vocab)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.one_array = llama_cpp.llama_token_data_array(data=self.one, size=1, selected=-1, sorted=False)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        logits = numpy.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
        token = self._pick(logits, self.chain)
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 1.0, 0.0
        self.one_array.size, self.one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self.grammar.sampler, ctypes.byref(self.one_array))
        if self.one[0].logit == -math.inf:
            token = self._pick(logits, self.grammar, self.chain)
        self.chain.accept(token)
        self.grammar.accept(token)
        return token

    def _pick(self, logits: numpy.ndarray, *samplers: LlamaSampler) -> int:
        """The token that `samplers`, applied in turn to all the logits, select."""
        candidates = self.candidates
        candidates.copy_logits(logits)
        for sampler in samplers:
            llama_cpp.llama_sampler_apply(sampler.sampler, ctypes.byref(candidates.candidates))
            # Sampled anyway, a token the grammar refuses makes its accept() throw: llama.cpp aborts.
            if sampler is self.grammar and not numpy.isfinite(candidates.candidates_data.logit).any():
                raise gbnf.GrammarError("the grammar allows no token here: it matches nothing (an empty range, "
                                        "such as [z-a]?) or nothing the model's vocabulary can write")  # fmt: skip
        return int(candidates.candidates_data.id[candidates.candidates.selected])
