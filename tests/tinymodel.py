"""Test-only tiny random-weight GGUFs: a llama whose sampled output reads as words and ends at ".",
and a BERT encoder (embeddings only) over the same words."""

from __future__ import annotations

import os
import pathlib
import sys

import gguf
import numpy as np

__all__ = [
    "BYTE_TOKENS",
    "EOS",
    "PERIOD",
    "SPACE",
    "SPECIAL_TOKENS",
    "VOCAB",
    "WORDS",
    "write_tiny_encoder",
    "write_tiny_model",
]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
EOS = "</s>"
PERIOD = "."
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
SPACE = "\u2581"  # sentencepiece's word-boundary marker, "▁"

_PLAIN_WORDS = """
the a an and or but so then when while if because after before over under into onto
from with without about above below near far here there where what who why how which
this that these those it its they them their we us our you your he him his she her
i me my is are was were be been being am do does did done have has had will would can
could should may might must shall go goes went gone come comes came see saw seen look
looks looked find found give gave take took make made say said tell told know knew
think thought feel felt keep kept let put run ran walk walked sit sat stand stood
open opened close closed read wrote write play played work worked help helped want
wanted like liked love loved need needed live lived call called ask asked turn turned
cat dog bird fish cow horse sheep mouse fox bear wolf owl frog duck goat pig hen lion
tree leaf flower grass river lake sea hill mountain road path house door window room
table chair bed book letter garden field forest city town village farm bridge boat
ship train car wagon sun moon star sky cloud rain snow wind fire water stone sand
morning evening night day week year time world home school market king queen child
children man woman boy girl friend mother father sister brother teacher baker farmer
red blue green yellow white black brown small big little large old young new warm
cold happy sad quiet loud soft bright dark early late long short good kind brave
slow quick tall round one two three four five many few some all every each other
again always never often soon now today together away back down up out in on at by
to of for not very just only also still even too bread milk apple cake tea soup song
story dream light shadow picture hat coat shoe ball kite basket candle clock key
""".split()

# Word pieces: "▁word" for every plain word, plus bare punctuation.
WORDS = tuple(dict.fromkeys(SPACE + w for w in _PLAIN_WORDS)) + (PERIOD, ",")

VOCAB = SPECIAL_TOKENS + BYTE_TOKENS + (SPACE,) + WORDS

_UNK, _BOS, _EOS = 0, 1, 2
_FIRST_WORD = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 1

# Residual dimensions that no layer writes to (their rows of attn_output and
# ffn_down are zero), so the output layer reads exactly what the embedding put there.
_BIAS_DIM = 0  # constant in every embedding: favours word pieces over bytes/specials
_PERIOD_DIM = 1  # set only in "."'s embedding: maps to EOS, so "." ends the sentence

_WORD_BIAS = 10.0  # logit advantage of word pieces over bytes and special tokens
_PERIOD_BOOST = 3.0  # extra logit for "." so sentences end after a handful of words
_EOS_AFTER_PERIOD = 30.0


def write_tiny_model(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layer: int = 1,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    context_length: int = 32768,
    chat_template: str | None = None,
    pooling_type: gguf.PoolingType | None = None,
) -> pathlib.Path:
    """Write the model to `path` (deterministic for a given seed) and return the path; with
    `chat_template`, the model carries that Jinja template as tokenizer.chat_template, and with
    `pooling_type`, the pooling of an embedding model as llama.pooling_type."""
    path = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    n_vocab = len(VOCAB)
    period = VOCAB.index(PERIOD)

    def random(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    token_embd = random(n_vocab, n_embd, scale=1.0)
    token_embd[:, _BIAS_DIM] = 1.0
    token_embd[:, _PERIOD_DIM] = 0.0
    token_embd[period, _PERIOD_DIM] = 8.0

    output = random(n_vocab, n_embd, scale=0.3)
    output[:, _BIAS_DIM] = -_WORD_BIAS
    output[:, _PERIOD_DIM] = 0.0
    output[_FIRST_WORD:, _BIAS_DIM] = _WORD_BIAS
    output[period, _BIAS_DIM] += _PERIOD_BOOST
    output[_EOS, _PERIOD_DIM] = _EOS_AFTER_PERIOD

    writer = _writer(path, "llama", f"rbeed-tiny-seed{seed}", context_length, n_layer, n_embd, n_head, n_ff)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * len(BYTE_TOKENS)
        + [gguf.TokenType.NORMAL] * (1 + len(WORDS))
    )
    writer.add_unk_token_id(_UNK)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling_type is not None:
        writer.add_pooling_type(pooling_type)

    writer.add_tensor("token_embd.weight", token_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    layer_scale = 0.5 / np.sqrt(n_embd)
    for i in range(n_layer):
        attn_output = random(n_embd, n_embd, scale=layer_scale)
        ffn_down = random(n_embd, n_ff, scale=layer_scale)
        for projection in (attn_output, ffn_down):
            projection[[_BIAS_DIM, _PERIOD_DIM], :] = 0.0
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", random(n_embd, n_embd, scale=layer_scale))
        writer.add_tensor(f"{blk}.attn_k.weight", random(n_embd, n_embd, scale=layer_scale))
        writer.add_tensor(f"{blk}.attn_v.weight", random(n_embd, n_embd, scale=layer_scale))
        writer.add_tensor(f"{blk}.attn_output.weight", attn_output)
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", random(n_ff, n_embd, scale=layer_scale))
        writer.add_tensor(f"{blk}.ffn_up.weight", random(n_ff, n_embd, scale=layer_scale))
        writer.add_tensor(f"{blk}.ffn_down.weight", ffn_down)

    _finish(writer)
    return path


def _writer(path: pathlib.Path, arch: str, name: str, context_length: int, n_layer: int, n_embd: int, n_head: int,
            n_ff: int) -> gguf.GGUFWriter:  # fmt: skip
    """A writer with the header fields every architecture has."""
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    return writer


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# BERT's WordPiece vocabulary as llama.cpp keeps it: a word-initial piece is "▁word", a
# continuation ("##s" in the original) is bare.
ENCODER_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ENCODER_VOCAB = ENCODER_SPECIAL_TOKENS + WORDS[:-2] + (SPACE + PERIOD, SPACE + ",", "s", "ed", "ing", "ly")


def write_tiny_encoder(
    path: str | os.PathLike[str], *, seed: int = 0, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
    n_ff: int = 128, context_length: int = 512, pooling_type: gguf.PoolingType = gguf.PoolingType.MEAN,
) -> pathlib.Path:  # fmt: skip
    """Write a random-weight BERT (non-causal attention, as convert_hf_to_gguf.py writes one) that
    embeds ENCODER_VOCAB's pieces; return the path."""
    path = pathlib.Path(path)
    rng = np.random.default_rng(seed)
    scale = 0.5 / np.sqrt(n_embd)

    def random(*shape: int, scale: float = scale) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = _writer(path, "bert", f"rbeed-tiny-encoder-seed{seed}", context_length, n_layer, n_embd, n_head, n_ff)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling_type)

    writer.add_tokenizer_model("bert")
    writer.add_token_list(ENCODER_VOCAB)
    n_special = len(ENCODER_SPECIAL_TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * n_special + [gguf.TokenType.NORMAL] * (len(ENCODER_VOCAB) - n_special))
    writer.add_token_type_count(2)
    for add, token in ((writer.add_pad_token_id, "[PAD]"), (writer.add_unk_token_id, "[UNK]"),
                       (writer.add_bos_token_id, "[CLS]"), (writer.add_sep_token_id, "[SEP]"),
                       (writer.add_mask_token_id, "[MASK]")):  # fmt: skip
        add(ENCODER_VOCAB.index(token))
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)

    def norm(name: str) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(n_embd, dtype=np.float32))

    writer.add_tensor("token_embd.weight", random(len(ENCODER_VOCAB), n_embd, scale=1.0))
    writer.add_tensor("token_types.weight", random(2, n_embd))
    writer.add_tensor("position_embd.weight", random(context_length, n_embd))
    norm("token_embd_norm")
    for i in range(n_layer):
        blk = f"blk.{i}"
        for name, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_output", n_embd, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):  # fmt: skip
            writer.add_tensor(f"{blk}.{name}.weight", random(rows, cols))
            writer.add_tensor(f"{blk}.{name}.bias", random(rows))
        norm(f"{blk}.attn_output_norm")
        norm(f"{blk}.layer_output_norm")

    _finish(writer)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.gguf")
    written = write_tiny_model(sys.argv[1])
    print(f"{written} ({written.stat().st_size} bytes)")
