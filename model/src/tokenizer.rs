//! The tokenizer: loading a Hugging Face `tokenizer.json` (plus `tokenizer_config.json` for
//! BOS/EOS and the chat template), encoding user text without ever turning it into control
//! tokens, decoding, streaming detokenization, chat formatting, and a synthetic
//! SentencePiece-style tokenizer for random-weight models.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::chat::{self, ChatError, ChatMessage, ChatTemplate, Segment};
use crate::checkpoint::Checkpoint;
use crate::gguf_vocab::GgufVocab;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{origin} is not a valid tokenizer: {message}")]
    Parse { origin: String, message: String },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("the chat template in {} does not compile: {message}", path.display())]
    TemplateSyntax { path: PathBuf, message: String },
    #[error("the GGUF tokenizer metadata is not usable: {0}")]
    GgufVocab(String),
    #[error("the GGUF chat template (tokenizer.chat_template) does not compile: {0}")]
    GgufTemplate(String),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("the tokenizer has no {0} token, which the Mistral chat format needs")]
    MissingToken(&'static str),
    #[error("token id {id} is outside the vocabulary ({vocab_size} tokens)")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// Names a tokenizer given as a string rather than a file, in error messages.
const INLINE_ORIGIN: &str = "the tokenizer JSON string";

/// Names a tokenizer built from GGUF metadata, in error messages.
const GGUF_ORIGIN: &str = "the tokenizer built from GGUF metadata";

/// A loaded tokenizer. Thread-safe; share it behind an `Arc`.
pub struct Tokenizer {
    /// Special-token splitting disabled: text is always text.
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// Whether prompts start with BOS (GGUF's `add_bos_token`; Hugging Face files always do).
    add_bos: bool,
    vocab_size: usize,
    /// Special added tokens: skipped when decoding.
    special_ids: HashSet<u32>,
    /// Special added tokens by content, longest first, for finding them in template text.
    controls: Vec<(String, u32)>,
    template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`
    /// (`chat_template`, `bos_token`, `eos_token`; tokens may be strings or `{"content": …}`
    /// objects). Without a configured BOS/EOS, `<s>`/`</s>` are used if the vocabulary has them.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        match fs::read_to_string(&config_path) {
            Ok(text) => tokenizer.configure(&config_path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TokenizerError::Read {
                    path: config_path,
                    source,
                })
            }
        }
        Ok(tokenizer)
    }

    /// The tokenizer of an opened model: a GGUF file's metadata, or the directory's
    /// `tokenizer.json` (with `tokenizer_config.json`); `None` when it has neither.
    pub fn for_checkpoint(checkpoint: &Checkpoint) -> Result<Option<Self>, TokenizerError> {
        if let Some(metadata) = checkpoint.metadata() {
            return GgufVocab::from_metadata(metadata)?
                .map(|vocab| Self::from_gguf_vocab(&vocab))
                .transpose();
        }
        let dir = checkpoint.dir();
        match dir.join("tokenizer.json").exists() {
            true => Self::from_dir(dir).map(Some),
            false => Ok(None),
        }
    }

    /// Loads a `tokenizer.json` alone: no chat template, so chats use the Mistral v1 format.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self, TokenizerError> {
        let json = fs::read_to_string(tokenizer_json).map_err(|source| TokenizerError::Read {
            path: tokenizer_json.to_owned(),
            source,
        })?;
        Self::parse(&json, tokenizer_json.display().to_string())
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Self, TokenizerError> {
        Self::parse(json, INLINE_ORIGIN.to_owned())
    }

    fn parse(json: &str, origin: String) -> Result<Self, TokenizerError> {
        let parse_error = |e: &dyn std::fmt::Display| TokenizerError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        };
        let mut inner: tokenizers::Tokenizer = json.parse().map_err(|e| parse_error(&e))?;
        inner.set_encode_special_tokens(true);
        // Some tokenizer.json files carry training-time truncation/padding, which would
        // silently cut or pad prompts.
        inner.with_truncation(None).map_err(|e| parse_error(&e))?;
        inner.with_padding(None);
        let mut controls: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special && !token.content.is_empty())
            .map(|(id, token)| (token.content, id))
            .collect();
        controls.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(Self {
            bos_id: inner.token_to_id("<s>"),
            eos_id: inner.token_to_id("</s>"),
            add_bos: true,
            vocab_size: inner.get_vocab_size(true),
            special_ids: controls.iter().map(|(_, id)| *id).collect(),
            controls,
            template: None,
            inner,
        })
    }

    /// Builds the tokenizer a GGUF file's metadata describes (see [`GgufVocab`]): SentencePiece
    /// (`llama`) or byte-level BPE (`gpt2`), BOS/EOS from their ids, whether prompts start with
    /// BOS, and the chat template. Metadata that does not make a tokenizer (ids outside the
    /// vocabulary, lengths that disagree, a merge of unknown tokens, an unknown model or
    /// pre-tokenizer) is an error naming the key.
    pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Self, TokenizerError> {
        let json = vocab.tokenizer_json()?;
        let mut tokenizer = Self::parse(&json.to_string(), GGUF_ORIGIN.to_owned())?;
        tokenizer.bos_id = vocab.bos_id;
        tokenizer.eos_id = vocab.eos_id;
        tokenizer.add_bos = vocab.adds_bos() && vocab.bos_id.is_some();
        if let Some(source) = &vocab.chat_template {
            let token_text = |id: Option<u32>| {
                id.and_then(|id| vocab.tokens.get(id as usize))
                    .cloned()
                    .unwrap_or_default()
            };
            let template = ChatTemplate::new(
                source.clone(),
                token_text(vocab.bos_id),
                token_text(vocab.eos_id),
            )
            .map_err(|e| TokenizerError::GgufTemplate(e.to_string()))?;
            tokenizer.template = Some(template);
        }
        Ok(tokenizer)
    }

    /// Applies `tokenizer_config.json`: BOS/EOS overrides and the chat template.
    fn configure(&mut self, path: &Path, text: &str) -> Result<(), TokenizerError> {
        let config_error = |message: String| TokenizerError::Config {
            path: path.to_owned(),
            message,
        };
        let config: Value =
            serde_json::from_str(text).map_err(|e| config_error(format!("not valid JSON: {e}")))?;
        let Value::Object(config) = config else {
            return Err(config_error("expected a JSON object".into()));
        };
        let resolve = |field: &str| -> Result<Option<(String, u32)>, TokenizerError> {
            let Some(content) = token_field(&config, field).map_err(&config_error)? else {
                return Ok(None);
            };
            match self.inner.token_to_id(&content) {
                Some(id) => Ok(Some((content, id))),
                None => Err(config_error(format!(
                    "{field} {content:?} is not in the tokenizer's vocabulary"
                ))),
            }
        };
        let bos = resolve("bos_token")?;
        let eos = resolve("eos_token")?;
        if let Some((_, id)) = &bos {
            self.bos_id = Some(*id);
        }
        if let Some((_, id)) = &eos {
            self.eos_id = Some(*id);
        }
        let Some(source) = template_source(&config).map_err(&config_error)? else {
            return Ok(());
        };
        // Templates see token strings; fall back to the vocabulary's text for the ids in use.
        let token_text = |configured: Option<(String, u32)>, id: Option<u32>| {
            configured
                .map(|(content, _)| content)
                .or_else(|| id.and_then(|id| self.inner.id_to_token(id)))
                .unwrap_or_default()
        };
        let bos_token = token_text(bos, self.bos_id);
        let eos_token = token_text(eos, self.eos_id);
        let template = ChatTemplate::new(source, bos_token, eos_token).map_err(|e| {
            TokenizerError::TemplateSyntax {
                path: path.to_owned(),
                message: e.to_string(),
            }
        })?;
        self.template = Some(template);
        Ok(())
    }

    /// Encodes user text. Text such as `<s>`, `</s>` or `[INST]` stays text: it never becomes
    /// control-token ids. With `add_bos` (the text starts a prompt), the BOS id is prepended if
    /// the tokenizer has one and its model expects it ([`Self::adds_bos`]).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes, skipping special tokens. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.decode_known(ids)
    }

    /// One token's text as it appears in decoded output, leading space included (SentencePiece's
    /// `▁` is a space, a byte-fallback `<0x0A>` its byte): what logprob listings show.
    pub fn token_text(&self, id: u32) -> Result<String, TokenizerError> {
        self.check_id(id)?;
        let piece = self.inner.id_to_token(id).unwrap_or_default();
        if let Some(hex) = piece
            .strip_prefix("<0x")
            .and_then(|rest| rest.strip_suffix('>'))
        {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                return Ok(String::from_utf8_lossy(&[byte]).into_owned());
            }
        }
        if piece.contains('\u{2581}') {
            return Ok(piece.replace('\u{2581}', " "));
        }
        // Special tokens (`<s>`) decode to nothing; their listing shows them.
        let text = self.decode_known(&[id])?;
        Ok(if text.is_empty() { piece } else { text })
    }

    fn decode_known(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    fn check_id(&self, id: u32) -> Result<(), TokenizerError> {
        match self.inner.id_to_token(id) {
            Some(_) => Ok(()),
            None => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            }),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether prompts start with BOS: always for `tokenizer.json` models, as the GGUF
    /// metadata says for GGUF ones (ChatML models such as SmolLM2 have none).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Formats a chat with the chat template or, without one, Mistral's v1 instruct format, and
    /// returns the prompt's token ids, BOS included if the model expects it (once, even if the
    /// template emits it).
    pub fn apply_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        let segments = match &self.template {
            Some(template) => template.render(messages, &self.controls)?,
            None => chat::mistral_v1(
                messages,
                self.bos_id.ok_or(TokenizerError::MissingToken("BOS"))?,
                self.eos_id.ok_or(TokenizerError::MissingToken("EOS"))?,
            )?,
        };
        let mut ids = Vec::new();
        if let Some(bos) = self.bos_id.filter(|_| self.add_bos) {
            if segments.first() != Some(&Segment::Control(bos)) {
                ids.push(bos);
            }
        }
        for segment in segments {
            match segment {
                Segment::Text(text) => ids.extend(self.encode(&text, false)?),
                Segment::Control(id) => ids.push(id),
            }
        }
        Ok(ids)
    }

    /// A detokenizer for streaming this tokenizer's output.
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::default()
    }
}

/// Summarised: the vocabulary is too big to print.
impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("chat_template", &self.template.is_some())
            .finish_non_exhaustive()
    }
}

/// `field` of `tokenizer_config.json` as a token string: a string, an AddedToken object
/// (`{"content": …}`), or absent/null.
fn token_field(config: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(content)) => Ok(Some(content.clone())),
        Some(Value::Object(token)) => match token.get("content") {
            Some(Value::String(content)) => Ok(Some(content.clone())),
            _ => Err(format!(
                "{field} is an object without a \"content\" string; expected a string or \
                 {{\"content\": \"…\"}}"
            )),
        },
        Some(_) => Err(format!(
            "{field} must be a string or {{\"content\": \"…\"}}, not {}",
            config.get(field).map_or("", json_kind)
        )),
    }
}

/// The `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}`
/// from which the one named "default" is used.
fn template_source(config: &Map<String, Value>) -> Result<Option<String>, String> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(templates)) => {
            let mut names = Vec::new();
            for entry in templates {
                let name = entry.get("name").and_then(Value::as_str);
                let source = entry.get("template").and_then(Value::as_str);
                match (name, source) {
                    (Some("default"), Some(source)) => return Ok(Some(source.to_owned())),
                    (Some(name), Some(_)) => names.push(format!("{name:?}")),
                    _ => {
                        return Err(
                            "chat_template list entries must be {\"name\": …, \"template\": …} \
                             strings"
                                .into(),
                        )
                    }
                }
            }
            Err(format!(
                "chat_template has no template named \"default\" (found {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        }
        Some(other) => Err(format!(
            "chat_template must be a string or a list of {{name, template}}, not {}",
            json_kind(other)
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Past this many tokens without a clean end, held-back bytes can no longer become valid
/// UTF-8 (a character is at most 4 bytes), so they are emitted as they decode.
const MAX_HELD: usize = 4;

/// Streams text deltas as tokens arrive. Never emits a partial UTF-8 character (byte-fallback
/// tokens like `<0xF0>` arrive one byte at a time) and keeps SentencePiece's leading-space
/// handling right: like vLLM and TGI, it decodes a window of already-emitted tokens plus the
/// new ones and emits the difference. For valid text the deltas add up to
/// [`Tokenizer::decode`] of the whole sequence; invalid byte sequences come out as `�`.
/// It holds no reference to its tokenizer (each call takes it), so it can live in long-lived
/// per-request state.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// Non-special ids since the start of the last emitted batch.
    window: Vec<u32>,
    /// How many ids of `window` have been emitted.
    read: usize,
    text: String,
}

impl IncrementalDecoder {
    /// Takes the next token and returns the text it completes, maybe empty.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        tokenizer.check_id(id)?;
        // Decoding skips special tokens anyway; keeping them out of the window keeps its first
        // token a real one, whose leading space the decoder strips consistently.
        if tokenizer.special_ids.contains(&id) {
            return Ok(String::new());
        }
        self.window.push(id);
        self.emit(tokenizer, false)
    }

    /// Flushes anything held back (an incomplete character comes out as `�`).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        self.emit(tokenizer, true)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn emit(&mut self, tokenizer: &Tokenizer, flush: bool) -> Result<String, TokenizerError> {
        if self.read == self.window.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode_known(&self.window[..self.read])?;
        let full = tokenizer.decode_known(&self.window)?;
        let held = self.window.len() - self.read;
        let delta = text_after(&prefix, &full);
        let settled = !delta.is_empty() && !delta.ends_with('\u{FFFD}');
        if !(settled || flush || held >= MAX_HELD) {
            return Ok(String::new());
        }
        let delta = delta.to_owned();
        self.window.drain(..self.read);
        self.read = self.window.len();
        self.text.push_str(&delta);
        Ok(delta)
    }
}

/// The part of `full` after `prefix`; if later tokens rewrote the prefix (only possible for
/// invalid byte sequences), the part after what they share.
fn text_after<'f>(prefix: &str, full: &'f str) -> &'f str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let shared = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    // `shared` is a char boundary of `full` too: both agree on every char before it.
    full.get(shared..).unwrap_or_default()
}

/// The smallest vocabulary [`synthetic_tokenizer_json`] builds: 3 special tokens, 256 byte
/// tokens and `▁`.
pub const SYNTHETIC_MIN_VOCAB: usize = 260;

/// Characters after `▁`, most useful first, so that small vocabularies keep the common ones
/// (the rest of printable ASCII follows).
const SYNTHETIC_CHARS: &str =
    "etaoinshrdlcumwfgypbvkjxqz.,'-?!TAISHWCBMPDRFLNEGOJYUKVQXZ0123456789";

/// Text the synthetic merges are learned from.
const SYNTHETIC_CORPUS: &str = "\
The morning train left the station on time, and most of the people on board were going to \
work in the city. A woman by the window was reading a book about the history of the river, \
while the man next to her looked at the fields and the houses that went past. When the train \
stopped at the next town, a group of children got on with their teacher. They were going to \
visit the museum, and they talked about what they would see there: old ships, maps of the \
world, and pictures of the people who had lived in the valley a long time ago.
There is nothing more important than a good question. If you want to understand how something \
works, you should start by asking what it does, why it was made, and who uses it. Then you \
can look at the parts one by one and think about how they fit together. Most problems are \
easier than they first appear, because each part is simple when it is seen on its own.
In the small village at the edge of the forest, the days were long and quiet. Every evening \
the old baker would open his door and share the last of his bread with anyone who came by. \
People said that his bread was the best in the country, and many travellers came from far \
away just to taste it. He never asked for much in return, only that they tell him a story \
about the places they had been and the things they had learned on the way.
Computers can read and write text, answer questions, and help people with their work. A \
language model learns from a large amount of text which words are likely to follow each \
other. It does not think the way a person does, but it can often give a useful answer. The \
quality of the answer depends on the data, the size of the model, and the care that was \
taken when it was trained. It is always a good idea to check the facts before you believe \
them, and to ask for help when something is not clear.
The weather changed quickly in the afternoon. Dark clouds came over the hills, the wind grew \
stronger, and soon it began to rain. The farmers brought their animals into the barns and \
closed the gates. By night the storm had passed, and the sky was clear again, full of stars. \
The next day the water in the river was high, but nobody was hurt, and life in the valley \
went on as it always had.
Thank you for your message. I have read your letter and I think your plan is a very good \
one. We should meet next week to talk about the details, the cost, and the time we will \
need. Please let me know which day is best for you, and whether you would like to bring \
anyone with you. I look forward to hearing from you soon.";

/// A working `tokenizer.json` (Hugging Face format) for random-weight models of any vocab size
/// (sizes below [`SYNTHETIC_MIN_VOCAB`] are raised to it): SentencePiece-style BPE like
/// Mistral's. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`; 3..=258 are the byte-fallback tokens
/// `<0x00>`..`<0xFF>`; then `▁` and printable ASCII; then merges learned from a small built-in
/// English text (most frequent pair first), and `<extra_N>` placeholders (never produced by
/// encoding) if the text runs out of merges. Normalizer, decoder and post-processor are
/// Mistral's. The output depends only on `vocab_size`.
pub fn synthetic_tokenizer_json(vocab_size: usize) -> String {
    let vocab_size = vocab_size.max(SYNTHETIC_MIN_VOCAB);
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.push("▁".to_owned());
    let mut seen = HashSet::new();
    for c in SYNTHETIC_CHARS.chars().chain('!'..='~') {
        if tokens.len() == vocab_size {
            break;
        }
        if seen.insert(c) {
            tokens.push(c.to_string());
        }
    }
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let merges = learn_merges(&mut tokens, &mut known, vocab_size);
    let mut extra = 0;
    while tokens.len() < vocab_size {
        tokens.push(format!("<extra_{extra}>"));
        extra += 1;
    }
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), json!(id)))
        .collect();
    let added: Vec<Value> = tokens[..3]
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    })
    .to_string()
}

/// Learns BPE merges from [`SYNTHETIC_CORPUS`] until `tokens` reaches `vocab_size` or no pair
/// occurs twice. Ties go to the smallest pair, so the result is deterministic.
fn learn_merges(
    tokens: &mut Vec<String>,
    known: &mut HashSet<String>,
    vocab_size: usize,
) -> Vec<[String; 2]> {
    let mut word_counts: BTreeMap<String, usize> = BTreeMap::new();
    for word in SYNTHETIC_CORPUS.split_whitespace() {
        *word_counts.entry(format!("▁{word}")).or_default() += 1;
    }
    // A symbol is `None` where a character is missing from the vocabulary: it will be encoded
    // as bytes, so nothing merges across it.
    let mut words: Vec<(Vec<Option<String>>, usize)> = word_counts
        .into_iter()
        .map(|(word, count)| {
            let symbols = word
                .chars()
                .map(|c| Some(c.to_string()).filter(|s| known.contains(s)))
                .collect();
            (symbols, count)
        })
        .collect();
    let mut merges = Vec::new();
    while tokens.len() < vocab_size {
        let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, count) in &words {
            for pair in symbols.windows(2) {
                if let [Some(a), Some(b)] = pair {
                    *pairs.entry((a.as_str(), b.as_str())).or_default() += count;
                }
            }
        }
        let mut best: Option<((&str, &str), usize)> = None;
        for (pair, count) in pairs {
            if best.is_none_or(|(_, best_count)| count > best_count) {
                best = Some((pair, count));
            }
        }
        let Some(((a, b), count)) = best else { break };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_owned(), b.to_owned());
        let merged = format!("{a}{b}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i].as_deref() == Some(a.as_str())
                    && symbols[i + 1].as_deref() == Some(b.as_str())
                {
                    symbols[i] = Some(merged.clone());
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        if known.insert(merged.clone()) {
            tokens.push(merged);
        }
        merges.push([a, b]);
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_after_handles_rewritten_prefixes() {
        assert_eq!(text_after("Hello", "Hello world"), " world");
        assert_eq!(
            text_after("é", "\u{FFFD}\u{FFFD}\u{FFFD}x"),
            "\u{FFFD}\u{FFFD}\u{FFFD}x"
        );
        assert_eq!(text_after("abc", "ab"), "");
        assert_eq!(text_after("abé", "abc"), "c");
    }

    #[test]
    fn synthetic_vocab_has_no_duplicates() {
        for size in [SYNTHETIC_MIN_VOCAB, 300, 1000] {
            let json: Value =
                serde_json::from_str(&synthetic_tokenizer_json(size)).expect("valid JSON");
            let vocab = json["model"]["vocab"].as_object().expect("vocab object");
            assert_eq!(vocab.len(), size);
            let ids: HashSet<u64> = vocab.values().filter_map(Value::as_u64).collect();
            assert_eq!(ids.len(), size);
        }
    }
}
