//! A tokenizer described by GGUF metadata (`tokenizer.ggml.*`), as llama.cpp's converters write
//! it, turned into a Hugging Face `tokenizer.json` that the `tokenizers` crate loads.
//!
//! Two kinds are understood, named by `tokenizer.ggml.model`:
//! - `llama`: SentencePiece BPE (Llama, Mistral, Mixtral). The file holds pieces and their
//!   scores but no merges; SentencePiece merges the adjacent pair whose joined piece scores
//!   highest, which is BPE with merges ranked by that score. Byte fallback (`<0x0A>`), `▁` for
//!   spaces, and a `▁` put before the text unless `tokenizer.ggml.add_space_prefix` is false.
//! - `gpt2`: byte-level BPE with the file's merges, the text split first by the regexes llama.cpp
//!   uses for `tokenizer.ggml.pre`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::gguf::GgufMetadata;
use crate::tokenizer::TokenizerError;

/// The tokenizer metadata of a GGUF file, field for field as the file stores it. Whoever reads
/// the file fills this from these keys (absent keys stay `None`):
///
/// | field | GGUF key | GGUF type |
/// | --- | --- | --- |
/// | `model` | `tokenizer.ggml.model` | string |
/// | `pre` | `tokenizer.ggml.pre` | string |
/// | `tokens` | `tokenizer.ggml.tokens` | array of string |
/// | `scores` | `tokenizer.ggml.scores` | array of f32 |
/// | `token_types` | `tokenizer.ggml.token_type` | array of i32 |
/// | `merges` | `tokenizer.ggml.merges` | array of string (`"left right"`) |
/// | `bos_id` | `tokenizer.ggml.bos_token_id` | u32 |
/// | `eos_id` | `tokenizer.ggml.eos_token_id` | u32 |
/// | `unk_id` | `tokenizer.ggml.unknown_token_id` | u32 |
/// | `pad_id` | `tokenizer.ggml.padding_token_id` | u32 |
/// | `add_bos` | `tokenizer.ggml.add_bos_token` | bool |
/// | `add_eos` | `tokenizer.ggml.add_eos_token` | bool |
/// | `add_space_prefix` | `tokenizer.ggml.add_space_prefix` | bool |
/// | `chat_template` | `tokenizer.chat_template` | string |
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GgufVocab {
    /// `llama` or `gpt2`.
    pub model: String,
    /// `gpt2` only: which split precedes BPE (absent: llama.cpp's `default`).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    /// One of the `TOKEN_*` values per token.
    pub token_types: Option<Vec<i32>>,
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// Checked to be a token, otherwise unused: prompts are never padded.
    pub pad_id: Option<u32>,
    /// Whether a prompt starts with BOS; llama.cpp's default when absent is yes for `llama`
    /// and no for `gpt2`.
    pub add_bos: Option<bool>,
    /// Not applied: an EOS after a prompt would tell the model the text is over.
    pub add_eos: Option<bool>,
    /// `llama` only: whether SentencePiece's `▁` goes before the text (default yes).
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub const TOKEN_UNDEFINED: i32 = 0;
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

/// The GPT-2 split: contractions, letters, digits, other symbols, each with one leading space,
/// and whitespace runs (leaving a run's last space to the word after it).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split: case-insensitive contractions, numbers in groups of up to three, newlines
/// apart.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2's split: like Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a `gpt2` vocabulary's text is split before BPE, by `tokenizer.ggml.pre`: the regexes
/// llama.cpp applies in turn (each splits the pieces the previous one made, keeping the text
/// between matches), and whether merges are skipped for words already in the vocabulary.
fn gpt2_pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "gpt-2" | "mpt" | "olmo" | "jais" | "trillion" => (vec![GPT2_SPLIT], false),
        // Single digits first (how StarCoder and SmolLM were trained), then GPT-2's split.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" | "dbrx" => {
            (vec![LLAMA3_SPLIT], true)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => (vec![QWEN2_SPLIT], false),
        // llama.cpp's fallback for files written before `tokenizer.ggml.pre` existed.
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_SPLIT,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        _ => return None,
    })
}

const GPT2_PRE_NAMES: &str = "gpt-2, mpt, olmo, jais, trillion, starcoder, refact, command-r, \
    smollm, codeshell, exaone, minerva-7b, llama3, llama-v3, llama-bpe, falcon3, pixtral, \
    smaug-bpe, dbrx, qwen2, stablelm2, deepseek-r1-qwen, megrez, default";

fn invalid(message: String) -> TokenizerError {
    TokenizerError::GgufVocab(message)
}

impl GgufVocab {
    /// The `tokenizer.*` keys of a GGUF file; `Ok(None)` when it has no tokenizer.
    pub fn from_metadata(m: &GgufMetadata) -> Result<Option<Self>, TokenizerError> {
        let bad = |e: crate::gguf::GgufError| TokenizerError::GgufVocab(e.to_string());
        let Some(model) = m.get_str("tokenizer.ggml.model").map_err(bad)? else {
            return Ok(None);
        };
        let key = |name: &str| format!("tokenizer.ggml.{name}");
        let id = |name: &str| m.get_u32(&key(&format!("{name}_token_id"))).map_err(bad);
        Ok(Some(GgufVocab {
            model: model.to_string(),
            pre: m.get_str(&key("pre")).map_err(bad)?.map(str::to_string),
            tokens: m
                .get_str_array(&key("tokens"))
                .map_err(bad)?
                .map(<[String]>::to_vec)
                .unwrap_or_default(),
            scores: m
                .get_f32_array(&key("scores"))
                .map_err(bad)?
                .map(<[f32]>::to_vec),
            token_types: m
                .get_i32_array(&key("token_type"))
                .map_err(bad)?
                .map(<[i32]>::to_vec),
            merges: m
                .get_str_array(&key("merges"))
                .map_err(bad)?
                .map(<[String]>::to_vec),
            bos_id: id("bos")?,
            eos_id: id("eos")?,
            unk_id: id("unknown")?,
            pad_id: id("padding")?,
            add_bos: m.get_bool(&key("add_bos_token")).map_err(bad)?,
            add_eos: m.get_bool(&key("add_eos_token")).map_err(bad)?,
            add_space_prefix: m.get_bool(&key("add_space_prefix")).map_err(bad)?,
            chat_template: m
                .get_str("tokenizer.chat_template")
                .map_err(bad)?
                .map(str::to_string),
        }))
    }

    /// The type of token `id`: the file's, or for files without types, normal except for the
    /// unknown token and SentencePiece's `<s>`/`</s>`-style control ids.
    fn token_type(&self, id: usize) -> i32 {
        match &self.token_types {
            Some(types) => types[id],
            None if Some(id as u64) == self.unk_id.map(u64::from) => TOKEN_UNKNOWN,
            None if [self.bos_id, self.eos_id]
                .iter()
                .flatten()
                .any(|&special| u64::from(special) == id as u64) =>
            {
                TOKEN_CONTROL
            }
            None => TOKEN_NORMAL,
        }
    }

    /// Checks what every kind of vocabulary needs: lengths agree, ids are tokens, types are
    /// known, tokens are unique.
    fn check(&self) -> Result<HashMap<&str, u32>, TokenizerError> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(invalid("tokenizer.ggml.tokens is empty".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(invalid(format!(
                "tokenizer.ggml.tokens has {n} tokens, more than token ids (u32) can number"
            )));
        }
        if let Some(scores) = &self.scores {
            if scores.len() != n {
                return Err(invalid(format!(
                    "tokenizer.ggml.scores has {} entries, expected one per token ({n})",
                    scores.len()
                )));
            }
        }
        if let Some(types) = &self.token_types {
            if types.len() != n {
                return Err(invalid(format!(
                    "tokenizer.ggml.token_type has {} entries, expected one per token ({n})",
                    types.len()
                )));
            }
            if let Some((id, ty)) = types
                .iter()
                .enumerate()
                .find(|(_, ty)| !(TOKEN_UNDEFINED..=TOKEN_BYTE).contains(*ty))
            {
                return Err(invalid(format!(
                    "tokenizer.ggml.token_type of token {id} ({:?}) is {ty}, expected 0 to 6",
                    self.tokens[id]
                )));
            }
        }
        for (key, id) in [
            ("bos_token_id", self.bos_id),
            ("eos_token_id", self.eos_id),
            ("unknown_token_id", self.unk_id),
            ("padding_token_id", self.pad_id),
        ] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(invalid(format!(
                        "tokenizer.ggml.{key} is {id}, outside the {n} tokens of \
                         tokenizer.ggml.tokens"
                    )));
                }
            }
        }
        let mut ids = HashMap::with_capacity(n);
        for (id, token) in self.tokens.iter().enumerate() {
            if let Some(first) = ids.insert(token.as_str(), id as u32) {
                return Err(invalid(format!(
                    "tokenizer.ggml.tokens holds {token:?} twice (ids {first} and {id}); \
                     every token must be distinct"
                )));
            }
        }
        Ok(ids)
    }

    /// The Hugging Face `tokenizer.json` this vocabulary describes.
    pub(crate) fn tokenizer_json(&self) -> Result<Value, TokenizerError> {
        let ids = self.check()?;
        let mut tokenizer = match self.model.as_str() {
            "llama" => self.sentencepiece(&ids)?,
            "gpt2" => self.byte_level(&ids)?,
            other => {
                return Err(invalid(format!(
                    "tokenizer.ggml.model is {other:?}; supported: \"llama\" (SentencePiece) \
                     and \"gpt2\" (byte-level BPE)"
                )))
            }
        };
        tokenizer["version"] = json!("1.0");
        tokenizer["truncation"] = Value::Null;
        tokenizer["padding"] = Value::Null;
        tokenizer["post_processor"] = Value::Null;
        tokenizer["added_tokens"] = Value::Array(self.added_tokens());
        Ok(tokenizer)
    }

    /// Control and unknown tokens are special (never produced from user text, skipped when
    /// decoding); user-defined ones are matched whole in text, as llama.cpp does.
    fn added_tokens(&self) -> Vec<Value> {
        (0..self.tokens.len())
            .filter_map(|id| {
                let special = match self.token_type(id) {
                    TOKEN_UNKNOWN | TOKEN_CONTROL => true,
                    TOKEN_USER_DEFINED => false,
                    _ => return None,
                };
                Some(json!({
                    "id": id, "content": self.tokens[id], "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }))
            })
            .collect()
    }

    fn vocab_map(&self) -> Map<String, Value> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), json!(id)))
            .collect()
    }

    /// The file's merges, each checked to join two tokens into a third.
    fn file_merges(
        &self,
        merges: &[String],
        ids: &HashMap<&str, u32>,
    ) -> Result<Vec<[String; 2]>, TokenizerError> {
        merges
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                let mut parts = merge.split(' ');
                let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(invalid(format!(
                        "tokenizer.ggml.merges[{i}] is {merge:?}, expected two tokens \
                         separated by one space"
                    )));
                };
                for part in [left, right, &format!("{left}{right}")] {
                    if !ids.contains_key(part) {
                        return Err(invalid(format!(
                            "tokenizer.ggml.merges[{i}] ({merge:?}) needs the token {part:?}, \
                             which tokenizer.ggml.tokens does not have"
                        )));
                    }
                }
                Ok([left.to_owned(), right.to_owned()])
            })
            .collect()
    }

    /// SentencePiece's merges, recovered from the scores: every split of a piece into two
    /// pieces is a merge, ranked by the joined piece's score (highest first). Control, unknown,
    /// unused and byte tokens never come out of merging text, so they take no part.
    fn score_merges(&self, ids: &HashMap<&str, u32>) -> Result<Vec<[String; 2]>, TokenizerError> {
        let Some(scores) = &self.scores else {
            return Err(invalid(
                "a \"llama\" (SentencePiece) vocabulary without tokenizer.ggml.merges needs \
                 tokenizer.ggml.scores to rank its merges"
                    .into(),
            ));
        };
        let mergeable = |id: u32| {
            matches!(
                self.token_type(id as usize),
                TOKEN_NORMAL | TOKEN_USER_DEFINED | TOKEN_UNDEFINED
            )
        };
        struct Merge<'v> {
            score: f32,
            left: &'v str,
            right: &'v str,
            key: (u32, u32, u32),
        }
        let mut merges = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            let id = id as u32;
            if !mergeable(id) {
                continue;
            }
            for (split, _) in token.char_indices().skip(1) {
                let (left, right) = token.split_at(split);
                if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                    if mergeable(l) && mergeable(r) {
                        merges.push(Merge {
                            score: scores[id as usize],
                            left,
                            right,
                            key: (id, l, r),
                        });
                    }
                }
            }
        }
        // Ties (SentencePiece's user-defined whitespace pieces share one score) go to the
        // longer left piece, then the longer right one, as Hugging Face's converter orders them.
        merges.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| b.left.chars().count().cmp(&a.left.chars().count()))
                .then_with(|| b.right.chars().count().cmp(&a.right.chars().count()))
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(merges
            .into_iter()
            .map(|m| [m.left.to_owned(), m.right.to_owned()])
            .collect())
    }

    fn sentencepiece(&self, ids: &HashMap<&str, u32>) -> Result<Value, TokenizerError> {
        let merges = match &self.merges {
            Some(merges) => self.file_merges(merges, ids)?,
            None => self.score_merges(ids)?,
        };
        let unk = self
            .unk_id
            .map(|id| id as usize)
            .or_else(|| (0..self.tokens.len()).find(|&id| self.token_type(id) == TOKEN_UNKNOWN))
            .map(|id| self.tokens[id].clone());
        let prefix = self.add_space_prefix.unwrap_or(true);
        let replace_space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"}, replace_space]})
        } else {
            replace_space
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": self.vocab_map(), "merges": merges,
            },
        }))
    }

    fn byte_level(&self, ids: &HashMap<&str, u32>) -> Result<Value, TokenizerError> {
        let Some(merges) = &self.merges else {
            return Err(invalid(
                "a \"gpt2\" (byte-level BPE) vocabulary needs tokenizer.ggml.merges".into(),
            ));
        };
        let merges = self.file_merges(merges, ids)?;
        let pre = self.pre.as_deref().unwrap_or("default");
        let Some((splits, ignore_merges)) = gpt2_pre_tokenizer(pre) else {
            return Err(invalid(format!(
                "tokenizer.ggml.pre is {pre:?}, a pre-tokenizer this build does not know; \
                 known: {GPT2_PRE_NAMES}"
            )));
        };
        let mut pre_tokenizers: Vec<Value> = splits
            .into_iter()
            .map(|regex| {
                json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
                       "invert": false})
            })
            .collect();
        pre_tokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false,
                                   "trim_offsets": true, "use_regex": false}));
        Ok(json!({
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": false},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": self.vocab_map(), "merges": merges,
            },
        }))
    }

    /// Whether prompts start with BOS: the file's flag, or llama.cpp's default.
    pub(crate) fn adds_bos(&self) -> bool {
        self.add_bos.unwrap_or(self.model == "llama")
    }
}
