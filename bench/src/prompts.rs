//! The prompts of a run: synthetic texts of exact token lengths, or a dataset's prompts. Lengths
//! are counted the way the server counts them (BOS, and the chat template for chats), with the
//! model's tokenizer or, for a gRPC target without one, the server's own `Tokenize` RPC.

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::Value;
use switchyard_model::{ChatMessage, Tokenizer};
use switchyard_net::api_client::ApiInferenceClient;
use switchyard_proto::code_name;
use switchyard_proto::v1 as pb;

use crate::client::Prompt;
use crate::config::{Api, LenDist};
use crate::BenchError;

/// Counts a prompt's tokens exactly as the server will.
pub enum Counter {
    Local(Box<Tokenizer>),
    Remote(ApiInferenceClient),
}

impl Counter {
    pub async fn count(&mut self, api: Api, text: &str) -> Result<usize, BenchError> {
        let messages = || {
            vec![ChatMessage {
                role: "user".into(),
                content: text.to_string(),
            }]
        };
        match self {
            Counter::Local(t) => {
                let ids = match api {
                    Api::Completions => t.encode(text, true),
                    Api::Chat => t.apply_chat(&messages()),
                };
                ids.map(|ids| ids.len())
                    .map_err(|e| BenchError::Prompt(format!("cannot tokenize a prompt: {e}")))
            }
            Counter::Remote(client) => {
                let request = match api {
                    Api::Completions => pb::TokenizeRequest {
                        prompt: Some(text.to_string()),
                        messages: Vec::new(),
                    },
                    Api::Chat => pb::TokenizeRequest {
                        prompt: None,
                        messages: messages()
                            .into_iter()
                            .map(|m| pb::ChatMessage {
                                role: m.role,
                                content: m.content,
                            })
                            .collect(),
                    },
                };
                let response = client.tokenize(request).await.map_err(|s| {
                    BenchError::Prompt(format!(
                        "the server's Tokenize failed ({}: {}); pass --tokenizer",
                        code_name(s.code()),
                        s.message()
                    ))
                })?;
                Ok(response.into_inner().token_ids.len())
            }
        }
    }
}

/// Words that are whole tokens in most English vocabularies (and in the demo models' synthetic
/// tokenizer, whose merges come from text using them): prompts are random runs of them.
const WORDS: &[&str] = &[
    "a",
    "I",
    "the",
    "and",
    "of",
    "to",
    "in",
    "was",
    "his",
    "that",
    "it",
    "for",
    "with",
    "on",
    "at",
    "by",
    "from",
    "as",
    "is",
    "are",
    "be",
    "been",
    "had",
    "have",
    "not",
    "but",
    "or",
    "all",
    "any",
    "one",
    "two",
    "many",
    "much",
    "some",
    "other",
    "each",
    "only",
    "just",
    "very",
    "good",
    "best",
    "old",
    "long",
    "high",
    "large",
    "small",
    "next",
    "last",
    "full",
    "dark",
    "clear",
    "quiet",
    "useful",
    "likely",
    "quickly",
    "soon",
    "again",
    "always",
    "never",
    "often",
    "before",
    "after",
    "about",
    "over",
    "into",
    "when",
    "which",
    "who",
    "they",
    "them",
    "their",
    "you",
    "your",
    "we",
    "he",
    "him",
    "life",
    "day",
    "days",
    "night",
    "time",
    "week",
    "way",
    "place",
    "places",
    "people",
    "person",
    "village",
    "forest",
    "edge",
    "door",
    "bread",
    "baker",
    "country",
    "story",
    "things",
    "water",
    "river",
    "valley",
    "hills",
    "wind",
    "rain",
    "storm",
    "sky",
    "stars",
    "clouds",
    "weather",
    "afternoon",
    "evening",
    "farmers",
    "animals",
    "gates",
    "letter",
    "message",
    "plan",
    "details",
    "cost",
    "help",
    "work",
    "text",
    "words",
    "language",
    "model",
    "data",
    "size",
    "care",
    "facts",
    "idea",
    "answer",
    "questions",
    "computers",
    "read",
    "write",
    "open",
    "share",
    "came",
    "said",
    "asked",
    "tell",
    "learned",
    "learns",
    "think",
    "give",
    "check",
    "believe",
    "ask",
    "know",
    "like",
    "bring",
    "look",
    "meet",
    "talk",
    "need",
    "let",
    "went",
    "changed",
    "grew",
    "began",
    "brought",
    "closed",
    "passed",
    "hurt",
    "taste",
    "follow",
    "trained",
    "depends",
];

/// Builds prompt texts of exact token lengths from random runs of [`WORDS`].
pub struct Synthesizer {
    counter: Counter,
    api: Api,
    /// Tokens of an empty prompt: BOS, and the chat template's own.
    overhead: usize,
    /// Tokens each word adds (within a run of words), measured once.
    word_tokens: HashMap<&'static str, usize>,
    /// Words to close a gap with, the last that added exactly one token first.
    fillers: Vec<&'static str>,
}

impl Synthesizer {
    pub async fn new(mut counter: Counter, api: Api) -> Result<Self, BenchError> {
        let overhead = counter.count(api, "").await?;
        let base = counter.count(api, "the").await?;
        let mut word_tokens = HashMap::new();
        for w in WORDS {
            let n = counter.count(api, &format!("the {w}")).await?;
            word_tokens.insert(*w, n.saturating_sub(base).max(1));
        }
        // Any word may close a gap (after an empty text, the template's spacing can make a
        // one-token word add none): those likeliest to add one token come first.
        let mut fillers = WORDS.to_vec();
        fillers.sort_by_key(|w| (word_tokens[w], w.len()));
        Ok(Synthesizer {
            counter,
            api,
            overhead,
            word_tokens,
            fillers,
        })
    }

    /// The tokens every prompt has before any text (BOS, the chat template).
    pub fn overhead(&self) -> usize {
        self.overhead
    }

    pub fn counter(&mut self) -> &mut Counter {
        &mut self.counter
    }

    /// A text of exactly `target` tokens. The predicted number of words is checked with the
    /// tokenizer; where words merge differently in a run, a search over the run's prefixes
    /// and then one-token words close the gap.
    pub async fn text(&mut self, target: usize, rng: &mut StdRng) -> Result<String, BenchError> {
        if target < self.overhead {
            return Err(BenchError::Prompt(format!(
                "an input length of {target} tokens is shorter than the {} tokens every prompt has \
                 (BOS{}); ask for at least {}",
                self.overhead,
                if self.api == Api::Chat { " and the chat template" } else { "" },
                self.overhead
            )));
        }
        let words: Vec<&'static str> = (0..target - self.overhead)
            .map(|_| WORDS[rng.random_range(..WORDS.len())])
            .collect();
        // Largest prefix of `words` predicted to fit, then the true count of it.
        let mut predicted = self.overhead;
        let mut k = 0;
        while k < words.len() && predicted + self.word_tokens[words[k]] <= target {
            predicted += self.word_tokens[words[k]];
            k += 1;
        }
        let mut n = self.count(&words[..k]).await?;
        if n > target {
            // Tokens are monotone in the prefix length: bisect for the longest that fits.
            let (mut lo, mut hi) = (0, k);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self.count(&words[..mid]).await? <= target {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            k = lo;
            n = self.count(&words[..k]).await?;
        }
        let mut text = words[..k].join(" ");
        while n < target {
            let mut closed = false;
            for i in 0..self.fillers.len() {
                let candidate = match text.is_empty() {
                    true => self.fillers[i].to_string(),
                    false => format!("{text} {}", self.fillers[i]),
                };
                if self.counter.count(self.api, &candidate).await? == n + 1 {
                    // Keep what worked first for the next gap.
                    self.fillers[..=i].rotate_right(1);
                    text = candidate;
                    n += 1;
                    closed = true;
                    break;
                }
            }
            if !closed {
                return Err(BenchError::Prompt(format!(
                    "cannot make a prompt of exactly {target} tokens with this tokenizer \
                     (no word adds a single token after {n}); use --dataset"
                )));
            }
        }
        Ok(text)
    }

    async fn count(&mut self, words: &[&str]) -> Result<usize, BenchError> {
        self.counter.count(self.api, &words.join(" ")).await
    }
}

/// A prompt read from a dataset file, with the length of its reference answer if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub text: String,
    pub reply: Option<String>,
    pub output_tokens: Option<usize>,
}

/// Reads a ShareGPT-style JSON file (a list of `{"conversations": [{"from": "human", "value"},
/// {"from": "gpt", "value"}]}`: the first human turn is the prompt, the reply after it sets
/// the output length) or JSONL with one prompt per line (a JSON string, or an object with
/// `prompt` and optionally `output_len`/`max_tokens`).
pub fn read_dataset(path: &Path) -> Result<Vec<Entry>, BenchError> {
    let bad = |reason: String| BenchError::Dataset {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let trimmed = text.trim_start();
    let entries = if trimmed.starts_with('[') {
        let items: Vec<Value> =
            serde_json::from_str(trimmed).map_err(|e| bad(format!("not a JSON list: {e}")))?;
        let mut entries = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(entry) = sharegpt_entry(item).map_err(|e| bad(format!("item {i}: {e}")))? {
                entries.push(entry);
            }
        }
        entries
    } else {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| bad(format!("line {}: not JSON ({e})", i + 1)))?;
            let entry = match &v {
                Value::String(s) => Entry {
                    text: s.clone(),
                    reply: None,
                    output_tokens: None,
                },
                Value::Object(o) if o.contains_key("conversations") => {
                    match sharegpt_entry(&v).map_err(|e| bad(format!("line {}: {e}", i + 1)))? {
                        Some(e) => e,
                        None => continue,
                    }
                }
                Value::Object(o) => Entry {
                    text: o
                        .get("prompt")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            bad(format!("line {}: expected a \"prompt\" string", i + 1))
                        })?
                        .to_string(),
                    reply: None,
                    output_tokens: o
                        .get("output_len")
                        .or_else(|| o.get("max_tokens"))
                        .and_then(Value::as_u64)
                        .map(|n| n as usize),
                },
                _ => {
                    return Err(bad(format!(
                        "line {}: expected a string or an object with \"prompt\"",
                        i + 1
                    )))
                }
            };
            entries.push(entry);
        }
        entries
    };
    let entries: Vec<Entry> = entries.into_iter().filter(|e| !e.text.is_empty()).collect();
    if entries.is_empty() {
        return Err(bad("it holds no prompt".into()));
    }
    Ok(entries)
}

/// The first human turn and the reply after it; `None` for a conversation with no human turn.
fn sharegpt_entry(item: &Value) -> Result<Option<Entry>, String> {
    let turns = item["conversations"]
        .as_array()
        .ok_or("expected {\"conversations\": [{\"from\", \"value\"}, …]}")?;
    let Some(i) = turns.iter().position(|t| t["from"] == "human") else {
        return Ok(None);
    };
    let value = |t: &Value| t["value"].as_str().map(str::to_string);
    let text = value(&turns[i]).ok_or("a turn without a \"value\" string")?;
    Ok(Some(Entry {
        text,
        reply: turns.get(i + 1).and_then(value),
        output_tokens: None,
    }))
}

/// `n` prompts: synthetic (input lengths from `input_len`) or from `dataset` (shuffled, reused
/// in turn when `n` is larger); output lengths from `output_len`, else the dataset's own, else
/// the default.
pub async fn make(
    synth: &mut Synthesizer,
    n: usize,
    input_len: LenDist,
    output_len: Option<LenDist>,
    dataset: Option<&[Entry]>,
    rng: &mut StdRng,
) -> Result<Vec<Prompt>, BenchError> {
    let mut prompts = Vec::with_capacity(n);
    let mut order: Vec<usize> = (0..dataset.map_or(0, <[Entry]>::len)).collect();
    order.shuffle(rng);
    let api = synth.api;
    let least = synth.overhead();
    if let (None, LenDist::Fixed { len: lo } | LenDist::Uniform { lo, .. }) = (dataset, input_len) {
        if lo < least {
            return Err(BenchError::Prompt(format!(
                "--input-len asks for {lo} tokens, fewer than the {least} every prompt has (BOS{}); ask for at least {least}",
                if api == Api::Chat { " and the chat template" } else { "" },
            )));
        }
    }
    for i in 0..n {
        let prompt = match dataset {
            None => {
                // A normal distribution's low tail is raised to the least a prompt can have.
                let target = input_len.sample(rng).max(least);
                let output_tokens = output_len.unwrap_or(crate::config::DEFAULT_LEN).sample(rng);
                Prompt {
                    text: synth.text(target, rng).await?,
                    input_tokens: target,
                    output_tokens,
                }
            }
            Some(entries) => {
                let e = &entries[order[i % order.len()]];
                let input_tokens = synth.counter().count(api, &e.text).await?;
                let output_tokens = match (output_len, e.output_tokens, &e.reply) {
                    (Some(d), _, _) => d.sample(rng),
                    (None, Some(n), _) => n.max(1),
                    (None, None, Some(reply)) => {
                        let with_bos = synth.counter().count(Api::Completions, reply).await?;
                        let bos = synth.counter().count(Api::Completions, "").await?;
                        (with_bos - bos).max(1)
                    }
                    (None, None, None) => crate::config::DEFAULT_LEN.sample(rng),
                };
                Prompt {
                    text: e.text.clone(),
                    input_tokens,
                    output_tokens,
                }
            }
        };
        prompts.push(prompt);
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use switchyard_model::tokenizer::synthetic_tokenizer_json;

    fn synth_counter(vocab: usize) -> Counter {
        Counter::Local(Box::new(
            Tokenizer::from_json_str(&synthetic_tokenizer_json(vocab)).unwrap(),
        ))
    }

    /// Small vocabularies split words into pieces; big ones keep them whole: both must give
    /// exact lengths, for completions and chats.
    #[tokio::test]
    async fn synthetic_prompts_have_exact_lengths() {
        for vocab in [512, 32000] {
            for api in [Api::Completions, Api::Chat] {
                let mut synth = Synthesizer::new(synth_counter(vocab), api).await.unwrap();
                let overhead = synth.overhead();
                let mut rng = StdRng::seed_from_u64(7);
                for target in (overhead..overhead + 40).chain([300, 1000]) {
                    let text = synth.text(target, &mut rng).await.unwrap();
                    let n = synth.counter().count(api, &text).await.unwrap();
                    assert_eq!(n, target, "vocab {vocab} {api:?}: {text:?}");
                }
                let err = synth.text(overhead.saturating_sub(1), &mut rng).await;
                if overhead > 0 {
                    assert!(err.unwrap_err().to_string().contains("shorter than"));
                }
            }
        }
    }

    #[test]
    fn datasets() {
        let dir = tempfile::tempdir().unwrap();
        let sharegpt = dir.path().join("sg.json");
        std::fs::write(
            &sharegpt,
            r#"[{"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello friend"}]},
                {"conversations": [{"from": "gpt", "value": "orphan"}]},
                {"conversations": [{"from": "human", "value": "Alone"}]}]"#,
        )
        .unwrap();
        let entries = read_dataset(&sharegpt).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].reply.as_deref(), Some("Hello friend"));
        assert_eq!(entries[1].reply, None);
        let jsonl = dir.path().join("p.jsonl");
        std::fs::write(
            &jsonl,
            "\"plain\"\n{\"prompt\": \"with len\", \"output_len\": 9}\n\n",
        )
        .unwrap();
        let entries = read_dataset(&jsonl).unwrap();
        assert_eq!(entries[1].output_tokens, Some(9));
        std::fs::write(&jsonl, "{\"text\": 1}\n").unwrap();
        let err = read_dataset(&jsonl).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("\"prompt\""),
            "{err}"
        );
        std::fs::write(&jsonl, "[]").unwrap();
        assert!(read_dataset(&jsonl)
            .unwrap_err()
            .to_string()
            .contains("no prompt"));
    }
}
