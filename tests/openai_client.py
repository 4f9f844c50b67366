"""The official `openai` package against a running `switchyard serve` (run by tests/http.rs).

usage: openai_client.py BASE_URL SMALL_QUEUE_BASE_URL PROMPT_IDS

Asserts what a client sees (models, completions, chat, streaming, logprobs, echo, errors) and
prints, as its last line, the JSON of an lm-eval-harness log-likelihood request's logprobs for
the Rust side to compare with `switchyard generate --prompt-logprobs`.
"""

import json
import sys

import openai

base, small_base, prompt_ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# Models.
models = client.models.list().data
check(len(models) == 1, f"one model, got {models}")
model = models[0].id

# Completions, greedy: the same request twice gives the same text; usage is counted.
a = client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
b = client.completions.create(model=model, prompt="Hello there", max_tokens=8, temperature=0)
check(a.choices[0].text == b.choices[0].text, "greedy completions are deterministic")
check(a.usage.completion_tokens == 8 or a.choices[0].finish_reason == "stop", f"usage {a.usage}")
check(a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens, "total tokens")

# Streaming gives the same text, then a usage chunk.
chunks = list(
    client.completions.create(
        model=model,
        prompt="Hello there",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].text for c in chunks if c.choices)
check(text == a.choices[0].text, f"streamed {text!r} vs whole {a.choices[0].text!r}")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == a.usage.completion_tokens,
      f"last chunk carries usage: {chunks[-1]}")
check([c.choices[0].finish_reason for c in chunks if c.choices][-1] == a.choices[0].finish_reason,
      "finish reason streamed")

# n choices, several prompts, seeds.
many = client.completions.create(
    model=model, prompt=["one", "two"], n=2, max_tokens=4, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
)
check(sorted(c.index for c in many.choices) == [0, 1, 2, 3], "n × prompts choices")
check(many.usage.completion_tokens == 16, f"4 choices × 4 tokens: {many.usage}")
again = client.completions.create(
    model=model, prompt=["one", "two"], n=2, max_tokens=4, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
)
check([c.text for c in many.choices] == [c.text for c in again.choices], "same seed, same samples")

# Logprobs with alternatives: one entry per token; the chosen token is among the alternatives.
lp = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True}).choices[0].logprobs
check(len(lp.tokens) == 5 and len(lp.token_logprobs) == 5, f"five logprobs: {lp}")
for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    check(l <= 0 and len(top) >= 3, f"logprob {l}, top {top}")
    # Greedy: the chosen token is the most likely one.
    check(abs(max(top.values()) - l) < 1e-5, f"greedy picks the top token: {tok} {l} {top}")

# Echo: the prompt comes back before the completion.
echo = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, echo=True)
check(echo.choices[0].text.startswith("Hello"), f"echo: {echo.choices[0].text!r}")

# Chat, whole and streamed, with logprobs.
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                      logprobs=True, top_logprobs=2)
choice = chat.choices[0]
check(choice.message.role == "assistant", "assistant message")
check(len(choice.logprobs.content) == chat.usage.completion_tokens, "one logprob per chat token")
check(all(len(t.top_logprobs) == 2 for t in choice.logprobs.content), "two alternatives each")
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True)
streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
check(streamed == choice.message.content, f"streamed chat {streamed!r} vs {choice.message.content!r}")

# Errors: the right exception classes, with messages that say what was wrong.
for call, cls, needle in [
    (lambda: client.completions.create(model=model, prompt="x", temperature=3), openai.BadRequestError, "temperature"),
    (lambda: client.completions.create(model=model, prompt="x", presence_penalty=1), openai.BadRequestError,
     "presence_penalty"),
    (lambda: client.completions.create(model="nope", prompt="x"), openai.NotFoundError, "nope"),
    (lambda: client.completions.create(model=model, prompt="x", max_tokens=10**6), openai.BadRequestError, "context"),
    (lambda: client.chat.completions.create(model=model, messages=[]), openai.BadRequestError, "messages"),
]:
    try:
        call()
        raise AssertionError(f"expected {cls.__name__}")
    except cls as e:
        check(needle in str(e), f"{cls.__name__} message {e} mentions {needle}")

# A full queue is a 429 (RateLimitError), not a hang: the small server runs one sequence and
# queues one; long streams hold them while more arrive.
small = openai.OpenAI(base_url=small_base, api_key="unused", max_retries=0, timeout=60)
held, refused = [], 0
for _ in range(5):
    try:
        held.append(small.completions.create(model=model, prompt="long", max_tokens=300, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True}))
    except openai.RateLimitError as e:
        check("queue is full" in str(e), f"429 says why: {e}")
        refused += 1
check(refused >= 1, "a full queue refuses with 429")
for s in held:
    s.close()

# lm-eval-harness's log-likelihood request: echo, logprobs, max_tokens 0, token ids.
ll = client.completions.create(model=model, prompt=prompt_ids, max_tokens=0, temperature=0, logprobs=1, echo=True)
c = ll.choices[0]
check(c.logprobs.token_logprobs[0] is None, "the first prompt token has no logprob")
check(len(c.logprobs.token_logprobs) == len(prompt_ids), "one entry per prompt token")
check(ll.usage.completion_tokens == 0, f"no tokens generated: {ll.usage}")
print(json.dumps({"token_logprobs": c.logprobs.token_logprobs, "top_logprobs": c.logprobs.top_logprobs}))
