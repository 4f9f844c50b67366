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

# best_of: that many candidates per prompt, the n with the highest cumulative logprob returned.
# The candidates are the n = 3 choices of the same seed (choice i samples with seed + i).
sample = dict(model=model, prompt="Once", max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
three = client.completions.create(n=3, logprobs=0, **sample)
scores = {c.index: sum(c.logprobs.token_logprobs) for c in three.choices}
best = client.completions.create(n=1, best_of=3, **sample)
check(len(best.choices) == 1 and best.choices[0].index == 0, f"one choice: {best.choices}")
check(best.choices[0].logprobs is None, "logprobs only when asked")
top = max(scores, key=lambda i: (scores[i], -i))
check(best.choices[0].text == [c.text for c in three.choices if c.index == top][0],
      f"best_of returns the most likely candidate: {best.choices[0].text!r}, scores {scores}")
check(best.usage.completion_tokens == 18, f"every candidate counts in usage: {best.usage}")
two = client.completions.create(n=2, best_of=3, logprobs=0, **sample)
order = sorted(scores, key=lambda i: (-scores[i], i))[:2]
check([c.index for c in two.choices] == [0, 1], "the n best, numbered from 0")
check([c.text for c in two.choices] == [[c.text for c in three.choices if c.index == i][0] for i in order],
      "the n best, best first")
same = client.completions.create(n=2, best_of=2, **sample)
check(sorted(c.text for c in same.choices) == sorted(c.text for c in three.choices if c.index < 2),
      "best_of = n is plain n")

# The sampling extensions are accepted on both endpoints and do what they say.
biased = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=1,
                                   logit_bias={"77": 100}, extra_body={"ignore_eos": True})
check(len(set(biased.choices[0].logprobs.tokens)) == 1, f"a +100 bias wins every step: {biased.choices[0].logprobs}")
penalized = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, presence_penalty=1.5, frequency_penalty=0.5,
    extra_body={"repetition_penalty": 1.3, "min_tokens": 8, "stop_token_ids": [5], "bad_words": ["the"]})
check(penalized.usage.completion_tokens == 8, f"min_tokens: no early stop: {penalized.usage}")

# Errors: the right exception classes, with messages that say what was wrong.
for call, cls, needle in [
    (lambda: client.completions.create(model=model, prompt="x", temperature=3), openai.BadRequestError, "temperature"),
    (lambda: client.completions.create(model=model, prompt="x", presence_penalty=3), openai.BadRequestError,
     "presence_penalty is 3; expected -2 to 2"),
    (lambda: client.completions.create(model=model, prompt="x", frequency_penalty=-2.5), openai.BadRequestError,
     "frequency_penalty is -2.5"),
    (lambda: client.completions.create(model=model, prompt="x", extra_body={"repetition_penalty": 0}),
     openai.BadRequestError, "repetition_penalty is 0; expected a number > 0"),
    (lambda: client.completions.create(model=model, prompt="x", logit_bias={"5": 101}), openai.BadRequestError,
     "logit_bias of token 5 is 101; expected -100 to 100"),
    (lambda: client.completions.create(model=model, prompt="x", logit_bias={"x": 1}), openai.BadRequestError,
     "logit_bias key"),
    (lambda: client.completions.create(model=model, prompt="x", logit_bias={"1000000": 1}), openai.BadRequestError,
     "logit_bias names token 1000000"),
    (lambda: client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"min_tokens": 5}),
     openai.BadRequestError, "min_tokens is 5; expected at most max_tokens (4)"),
    (lambda: client.completions.create(model=model, prompt="x", extra_body={"stop_token_ids": [10**6]}),
     openai.BadRequestError, "stop_token_ids names token"),
    (lambda: client.completions.create(model=model, prompt="x", n=2, best_of=1), openai.BadRequestError,
     "best_of is 1; expected n (2) to 16"),
    (lambda: client.completions.create(model=model, prompt="x", best_of=2, stream=True), openai.BadRequestError,
     "cannot be streamed"),
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
