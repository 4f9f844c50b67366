"""GGUF tokenizer metadata through llama.cpp's own Python package (gguf-py), for the tests in
model/tests/gguf_tokenizer.rs.

  vocab.py dump FILE.gguf
      The tokenizer.* metadata as JSON, one field per switchyard_model::GgufVocab field.
  vocab.py spm TOKENIZER.model OUT.gguf [CHAT_TEMPLATE_FILE]
      A vocabulary-only GGUF of a SentencePiece model, written as llama.cpp's converter writes
      one (gguf.vocab.SentencePieceVocab for pieces, scores and types; BOS/EOS/UNK ids from the
      model; BOS added, EOS not, as Mistral's tokenizer_config.json says).
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import gguf.vocab
import sentencepiece

KEYS = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "scores": "tokenizer.ggml.scores",
    "token_types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "unk_id": "tokenizer.ggml.unknown_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "add_space_prefix": "tokenizer.ggml.add_space_prefix",
    "chat_template": "tokenizer.chat_template",
}


def value(field):
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        return [value_at(field, i) for i in field.data]
    return value_at(field, field.data[0])


def value_at(field, index):
    part = field.parts[index]
    kind = field.types[-1]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if kind == gguf.GGUFValueType.BOOL:
        return bool(part[0])
    if kind in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        return float(part[0])
    return int(part[0])


def dump(path):
    reader = gguf.GGUFReader(path)
    out = {name: value(reader.fields[key]) for name, key in KEYS.items() if key in reader.fields}
    json.dump(out, sys.stdout, ensure_ascii=False)


def spm(model_path, out_path, template_path=None):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_path, Path(tmp) / "tokenizer.model")
        vocab = gguf.vocab.SentencePieceVocab(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if template_path is not None:
        writer.add_chat_template(Path(template_path).read_text())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"dump": dump, "spm": spm}[command](*args)
