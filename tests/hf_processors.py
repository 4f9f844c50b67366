"""Hugging Face transformers' own logits processors as the reference for Switchyard's sampling
extensions: an extension of ../shared/tools/hf-reference's `generate` (greedy, f32, eager) with
the processors `generate` builds from its arguments, run by tests/fixtures/hf-processors/make.sh
in hf-reference's venv.

  python hf_processors.py --model DIR --cases CASES.json

CASES.json is a list of {"name", "prompt": [ids], "max_tokens", and any of "repetition_penalty",
"presence_penalty", "frequency_penalty", "logit_bias": {"id": bias}, "min_tokens",
"stop_token_ids": [ids], "bad_word_ids": [[ids]]}. Prints the cases with "token_ids" and
"logprobs" (the chosen tokens' log-softmax of the raw logits, as Switchyard reports them) added.

How each maps onto transformers:
  repetition_penalty -> RepetitionPenaltyLogitsProcessor (prompt and output, as in HF)
  logit_bias         -> SequenceBiasLogitsProcessor over single-token sequences
  bad_word_ids       -> NoBadWordsLogitsProcessor
  min_tokens         -> MinNewTokensLengthLogitsProcessor over EOS and stop_token_ids
  stop_token_ids     -> extra EOS ids (generation ends on them, the token kept)
  presence/frequency -> PresenceFrequencyPenalty below (OpenAI's formula; transformers has none),
                        passed as a custom processor, which generate applies after its own
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI: logit -= presence * (count > 0) + frequency * count, over generated tokens."""

    def __init__(self, presence, frequency, prompt_len):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids, scores):
        # A new tensor, as transformers' own processors return: generate's `output_logits` is
        # the tensor passed in, which must stay the raw logits.
        scores = scores.clone()
        for b in range(scores.shape[0]):
            out = input_ids[b, self.prompt_len:]
            if out.numel() == 0:
                continue
            ids, counts = torch.unique(out, return_counts=True)
            scores[b, ids] -= self.presence + self.frequency * counts.to(scores.dtype)
        return scores


def run(model, case):
    prompt = case["prompt"]
    eos = [int(model.config.eos_token_id)] + case.get("stop_token_ids", [])
    kw = dict(max_new_tokens=case["max_tokens"], do_sample=False, num_beams=1,
              return_dict_in_generate=True, output_logits=True, eos_token_id=eos, pad_token_id=0)
    if case.get("repetition_penalty", 1.0) != 1.0:
        kw["repetition_penalty"] = case["repetition_penalty"]
    if case.get("logit_bias"):
        kw["sequence_bias"] = {(int(t),): float(b) for t, b in case["logit_bias"].items()}
    if case.get("bad_word_ids"):
        kw["bad_words_ids"] = case["bad_word_ids"]
    if case.get("min_tokens", 0) > 0:
        kw["min_new_tokens"] = case["min_tokens"]
    presence, frequency = case.get("presence_penalty", 0.0), case.get("frequency_penalty", 0.0)
    if presence or frequency:
        kw["logits_processor"] = LogitsProcessorList(
            [PresenceFrequencyPenalty(presence, frequency, len(prompt))])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), **kw)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(l[0].float(), dim=-1)[t]) for l, t in zip(out.logits, tokens)]
    return dict(case, token_ids=tokens, logprobs=logprobs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--cases", required=True)
    a = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    cases = json.load(open(a.cases))
    print(json.dumps([run(model, c) for c in cases]))


if __name__ == "__main__":
    main()
