"""GGUF metadata of a model file, read in a short-lived child process (`python -m rbeed.ggufinfo FILE`).

The header is parsed here with the gguf package's own type definitions, not its GGUFReader:
that reader builds numpy views for every vocabulary string and took 15 s on gemma3 270M
(262,144 tokens); skipping the arrays takes a fraction of a second. Running in a child keeps
gguf and numpy (tens of MiB) out of the daemon, and a malformed file cannot hurt it.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys


# The key this reader gained last: a catalog record without it was read by an older rbeed.
NEWEST_KEY = "causal"

# llama.cpp's enum llama_pooling_type: how an embedding model makes one vector of its tokens'.
_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


def read(path: str) -> dict:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as T, LlamaFileType

    scalar = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
              T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}  # fmt: skip
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0

        def take(fmt: str):
            nonlocal offset
            if offset + struct.calcsize(fmt) > len(data):
                raise ValueError(f"truncated: the header runs past the end of the file ({len(data)} bytes)")
            (value,) = struct.unpack_from(fmt, data, offset)
            offset += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal offset
            length = take("<Q")
            offset += length
            return data[offset - length : offset].decode("utf-8", errors="replace")

        def value(kind: int):
            nonlocal offset
            if kind == T.STRING:
                return string()
            if kind == T.ARRAY:
                item_kind, count = take("<I"), take("<Q")
                if item_kind in scalar:  # fixed size: skip in one step
                    offset += struct.calcsize(scalar[item_kind]) * count
                else:
                    for _ in range(count):
                        value(item_kind)
                return count  # an array reads as its length: the vocabulary's is all that is wanted
            return take(scalar[T(kind)])

        if data[:4] != b"GGUF":
            raise ValueError(f"not a GGUF file (magic {bytes(data[:4])!r})")
        offset = 4
        version = take("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        tensor_count, kv_count = take("<Q"), take("<Q")
        fields = {}
        for _ in range(kv_count):
            key = string()
            fields[key] = value(take("<I"))
        parameters = data_size = 0
        for _ in range(tensor_count):
            string()
            dims = take("<I")
            count = 1
            for _ in range(dims):
                count *= take("<Q")
            kind, data_offset = take("<I"), take("<Q")
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            data_size = max(data_size, data_offset + count // block * block_bytes)
            parameters += count
        # A cut-off download or copy still has a whole header: check that the tensor data fits.
        alignment = _count(fields, "general.alignment") or 32
        data_end = -(-offset // alignment) * alignment + data_size
        if data_end > len(data):
            raise ValueError(f"truncated: the tensor data ends at byte {data_end}, the file has {len(data)} bytes")

    architecture = _text(fields, "general.architecture", 64)
    file_type = _count(fields, "general.file_type", 0)
    pooling = _count(fields, f"{architecture}.pooling_type", 0)
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = None
    return {
        "name": _text(fields, "general.name", 256),
        "architecture": architecture,
        "parameters": parameters,
        "file_type": file_type,
        "quantization": quantization,
        "context_length": _count(fields, f"{architecture}.context_length"),
        "embedding_length": _count(fields, f"{architecture}.embedding_length"),
        "vocab_size": _count(fields, "tokenizer.ggml.tokens"),  # token ids run from 0 to this less 1
        "chat_template": "tokenizer.chat_template" in fields,
        # False for an encoder (BERT and its kind), whose attention looks both ways: it makes embeddings only.
        "causal": fields.get(f"{architecture}.attention.causal") is not False,
        "pooling": None if pooling is None else _POOLING.get(pooling, str(pooling)),  # set: an embedding model
        "gguf_version": version,
    }


# What the catalog keeps of a value, only of the type the daemon computes with: a file can put a
# string where a number belongs, or a name of 40 MB.
def _count(fields: dict, key: str, least: int = 1) -> int | None:
    value = fields.get(key)
    return value if type(value) is int and value >= least else None


def _text(fields: dict, key: str, limit: int) -> str | None:
    value = fields.get(key)
    return value[:limit] if isinstance(value, str) else None


EXIT_UNREADABLE = 2  # the file could not be read (or memory ran out): not the file's fault


def main() -> int:
    try:
        print(json.dumps(read(sys.argv[1])))
    except (OSError, MemoryError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    except Exception as exc:  # any parse failure is reported as one line, never a traceback
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
