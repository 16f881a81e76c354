"""rbeed.ggufinfo against gguf's own GGUFReader, on real GGUF files, and on files that are not GGUF."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

import tinymodel
from rbeed import ggufinfo
from support import ROOT


def reference(path) -> dict:
    """What gguf.GGUFReader (slow, complete) says about the fields ggufinfo reports."""
    reader = gguf.GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    return {
        "architecture": architecture,
        "name": reader.fields["general.name"].contents(),
        "parameters": sum(int(tensor.n_elements) for tensor in reader.tensors),
        "file_type": reader.fields["general.file_type"].contents(),
        "context_length": reader.fields[f"{architecture}.context_length"].contents(),
        "embedding_length": reader.fields[f"{architecture}.embedding_length"].contents()
        if f"{architecture}.embedding_length" in reader.fields else None,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
        "chat_template": "tokenizer.chat_template" in reader.fields,
        "pooling": {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}[reader.fields[pooling].contents()]
        if (pooling := f"{architecture}.pooling_type") in reader.fields else None,
        "gguf_version": reader.fields["GGUF.version"].contents(),
    }


def run_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbeed.ggufinfo", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def templated_model(tmp_path_factory):
    """A small Q8_0 qwen2 GGUF with a chat template and arrays of every kind ggufinfo skips."""
    path = tmp_path_factory.mktemp("gguf") / "templated.gguf"
    writer = gguf.GGUFWriter(path, arch="qwen2")
    writer.add_name("templated")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(4096)
    writer.add_embedding_length(32)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_token_list(["<s>", "a", "b"])  # array of strings
    writer.add_token_scores([0.0, -1.0, -2.0])  # array of float32
    writer.add_array("test.nested", [[1, 2], [3]])  # array of arrays
    writer.add_bool("test.flag", True)
    writer.add_uint64("test.big", 2**40)
    writer.add_tensor("a.weight", np.zeros((4, 32), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones(96, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_model_agrees_with_gguf_reader(tiny_model):
    info = ggufinfo.read(str(tiny_model))
    expected = reference(tiny_model)
    assert {key: info[key] for key in expected} == expected
    assert info["architecture"] == "llama"
    assert (info["context_length"], info["embedding_length"]) == (32768, 64)
    assert info["parameters"] > 100_000
    assert (info["file_type"], info["quantization"]) == (gguf.LlamaFileType.ALL_F32, "ALL_F32")
    assert info["chat_template"] is False
    assert info["pooling"] is None  # a generative model
    assert info["vocab_size"] == len(tinymodel.VOCAB)


def test_chat_template_and_nested_arrays_agree_with_gguf_reader(templated_model):
    info = ggufinfo.read(str(templated_model))
    expected = reference(templated_model)
    assert {key: info[key] for key in expected} == expected
    assert (info["architecture"], info["name"], info["context_length"]) == ("qwen2", "templated", 4096)
    assert info["parameters"] == 4 * 32 + 96
    assert info["embedding_length"] == 32
    assert info["quantization"] == "Q8_0"
    assert info["chat_template"] is True
    assert info["vocab_size"] == 3


def test_values_of_the_wrong_type_or_size_are_left_out(tmp_path):
    # The daemon computes with these: a string context_length was a TypeError in every job
    # that checked n_ctx, a 40 MB name went out with every model_list.
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("n" * 10_000)
    writer.add_string("llama.context_length", "4096")
    writer.add_int32("llama.embedding_length", -1)
    writer.add_bool("general.file_type", True)
    writer.add_string("tokenizer.ggml.tokens", "abc")
    writer.add_string("llama.attention.causal", "no")
    writer.add_tensor("a.weight", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = ggufinfo.read(str(path))
    assert info["name"] == "n" * 256
    assert [info[key] for key in ("context_length", "embedding_length", "file_type", "quantization", "vocab_size")] == [None] * 5
    assert info["causal"] is True


@pytest.mark.parametrize("kind", [gguf.PoolingType.MEAN, gguf.PoolingType.CLS, gguf.PoolingType.LAST])
def test_an_embedding_models_pooling_is_named(tmp_path, kind):
    path = tinymodel.write_tiny_model(tmp_path / "embedder.gguf", pooling_type=kind)
    info = ggufinfo.read(str(path))
    expected = reference(path)
    assert {key: info[key] for key in expected} == expected
    assert info["pooling"] == kind.name.lower()


def test_command_prints_one_json_object(tiny_model):
    done = run_cli(tiny_model)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ggufinfo.read(str(tiny_model))


def gguf_header(version: int = 3, tensors: int = 0, kvs: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


GARBAGE = {  # content, what the one-line reason says
    "empty": (b"", "empty file"),
    "html": (b"<!DOCTYPE html><html><body>Not Found</body></html>\n" * 20, "not a GGUF file"),
    "old version": (gguf_header(version=1), "version 1 is not supported"),
    "key past the end": (gguf_header(kvs=1) + struct.pack("<Q", 1000) + b"general.architecture", "truncated"),
    "unknown value type": (gguf_header(kvs=1) + struct.pack("<QsI", 1, b"k", 99) + bytes(16), "99"),
    "tensor info past the end": (gguf_header(tensors=1) + struct.pack("<Q8sI", 8, b"a.weight", 2), "truncated"),
}


@pytest.mark.parametrize(("content", "reason"), GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_rejected_with_its_reason(tmp_path, content, reason):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        ggufinfo.read(str(path))


def test_command_reports_garbage_in_one_line_without_traceback(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(GARBAGE["key past the end"][0])
    done = run_cli(path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("ValueError: truncated: ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_file_that_cannot_be_read_is_told_from_one_that_is_no_gguf(tmp_path):
    # Exit 2: the daemon answers 500 (its side), not 400 (the file's fault) as for exit 1.
    done = run_cli(tmp_path)  # a directory
    assert (done.returncode, done.stdout) == (ggufinfo.EXIT_UNREADABLE, "")
    assert done.stderr.startswith("IsADirectoryError: ") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cut", [lambda size: 1000, lambda size: size // 2, lambda size: size - 1],
                         ids=["in the vocabulary", "in the tensor data", "last byte missing"])  # fmt: skip
def test_truncated_model_is_rejected(tmp_path, tiny_model, cut):
    content = tiny_model.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(content[: cut(len(content))])
    with pytest.raises(ValueError, match="^truncated: "):
        ggufinfo.read(str(path))


def test_trailing_bytes_after_the_tensor_data_are_accepted(tmp_path, tiny_model):
    path = tmp_path / "padded.gguf"
    path.write_bytes(tiny_model.read_bytes() + bytes(4096))
    assert ggufinfo.read(str(path)) == ggufinfo.read(str(tiny_model))
