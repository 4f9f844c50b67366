//! Chat messages and the formats that turn a conversation into a prompt: a model's own Jinja
//! chat template (`chat_template` in `tokenizer_config.json`, rendered with minijinja the way
//! Hugging Face `transformers` renders it) or, without one, Mistral's v1 instruct format.
//!
//! Both produce [`Segment`]s: runs of plain text and control-token ids, which
//! [`Tokenizer::apply_chat`](crate::Tokenizer::apply_chat) encodes. Control tokens come only
//! from the format itself (the template's own text, or the structure of the Mistral format);
//! text a message carries is never searched for them, so a user who types `</s>` gets text.

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One turn of a conversation, as clients send it (`role` is `system`, `user`, `assistant`, or
/// whatever else the model's chat template accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A piece of a formatted prompt, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Plain text, encoded on its own with control tokens disabled.
    Text(String),
    /// A control token the format placed here.
    Control(u32),
}

/// A chat the template or the Mistral format cannot render.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("invalid chat: {0}")]
    Invalid(String),
    #[error("the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
    #[error("the chat template ran past its limit of {TEMPLATE_FUEL} instructions")]
    OutOfFuel,
    #[error("the chat template's output passed its limit of {MAX_RENDER_BYTES} bytes")]
    TooLong,
}

/// Instructions one render of a chat template may run: a template's loops over a conversation
/// take thousands; one that runs away (nested loops over large ranges) stops here, in well
/// under a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Bytes one rendered chat may have: far more than any model's context holds as text.
pub const MAX_RENDER_BYTES: usize = 16 << 20;

fn chat_error(message: impl Into<String>) -> ChatError {
    ChatError::Invalid(message.into())
}

/// Mistral's v1 instruct format, as `mistral-common` builds it:
/// `<s>[INST] user [/INST] answer</s>[INST] user2 [/INST]`, with a leading system message
/// prepended to the first user message followed by a blank line. Each user turn and each answer
/// is its own text segment: SentencePiece gives each its own leading `▁`, exactly as the
/// reference does.
pub(crate) fn mistral_v1(
    messages: &[ChatMessage],
    bos: u32,
    eos: u32,
) -> Result<Vec<Segment>, ChatError> {
    let (system, turns, offset) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest, 1),
        _ => (None, messages, 0),
    };
    if turns.is_empty() {
        return Err(chat_error(
            "the chat has no user message: expected at least one message with role \"user\"",
        ));
    }
    let mut segments = vec![Segment::Control(bos)];
    for (i, message) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if message.role != expected {
            let problem = match message.role.as_str() {
                "system" | "user" | "assistant" => "has role",
                _ => "has unknown role",
            };
            return Err(chat_error(format!(
                "message {} {problem} {:?}, expected {expected:?} (after an optional leading \
                 system message, roles must alternate user/assistant)",
                i + offset,
                message.role
            )));
        }
        if expected == "user" {
            let text = match system {
                Some(system) if i == 0 => {
                    format!("[INST] {system}\n\n{} [/INST]", message.content)
                }
                _ => format!("[INST] {} [/INST]", message.content),
            };
            segments.push(Segment::Text(text));
        } else {
            segments.push(Segment::Text(message.content.clone()));
            segments.push(Segment::Control(eos));
        }
    }
    if turns.len() % 2 == 0 {
        return Err(chat_error(format!(
            "message {} has role \"assistant\", expected the chat to end with a \"user\" message",
            turns.len() - 1 + offset
        )));
    }
    Ok(segments)
}

/// Marks the start and end of message content in a rendered template. Unicode noncharacters,
/// reserved for exactly this kind of internal use, so they are stripped from message content.
const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled Jinja chat template with the values templates expect besides `messages`.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; fails on a syntax error.
    pub(crate) fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // What transformers sets: block tags swallow their line, and Python string methods
        // (`.strip()`, `.startswith()`) work on values.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` and splits the result into segments: control tokens (longest first in
    /// `controls`) are recognised only in text the template itself produced.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        controls: &[(String, u32)],
    ) -> Result<Vec<Segment>, ChatError> {
        for (i, message) in messages.iter().enumerate() {
            // Roles are spliced into the prompt by many templates; a role like
            // "user<|im_end|>" must not smuggle in control tokens.
            let valid = !message.role.is_empty()
                && message
                    .role
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(chat_error(format!(
                    "message {i} has role {:?}, expected a name of ASCII letters, digits, '_' or '-'",
                    message.role
                )));
            }
        }
        let plain: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), strip_markers(&m.content)))
            .collect();
        let rendered = self.render_str(&plain)?;
        let marked: Vec<ChatMessage> = plain
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), mark(&m.content)))
            .collect();
        // The marked render is trusted only if it is the plain render plus markers: a template
        // that measures, compares or slices content renders differently, and then the markers
        // say nothing about where content went.
        if let Ok(marked) = self.render_str(&marked) {
            if strip_markers(&marked) == rendered {
                if let Some(segments) = split_marked(&marked, controls) {
                    return Ok(segments);
                }
            }
        }
        // Without markers, content cannot be told apart from template text, so refuse content
        // that would read as control tokens.
        for (i, message) in plain.iter().enumerate() {
            if let Some((token, _)) = controls
                .iter()
                .find(|(token, _)| message.content.contains(token.as_str()))
            {
                return Err(chat_error(format!(
                    "message {i} contains the control token text {token:?}, and this chat \
                     template rewrites message content, so it cannot be kept as plain text"
                )));
            }
        }
        let mut segments = Vec::new();
        split_controls(&rendered, controls, &mut segments);
        Ok(segments)
    }

    fn render_str(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        let mut out = Bounded::default();
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                add_generation_prompt => true,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| chat_error("the chat template wrote text that is not UTF-8")),
            Err(_) if out.full => Err(ChatError::TooLong),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatError::OutOfFuel),
            Err(e) => Err(ChatError::Render(e)),
        }
    }
}

/// A render's output, refusing to grow past [`MAX_RENDER_BYTES`].
#[derive(Default)]
struct Bounded {
    bytes: Vec<u8>,
    full: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDER_BYTES {
            self.full = true;
            return Err(std::io::Error::other("the output limit is reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `raise_exception(message)`, which Hugging Face templates call to reject a conversation.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn strip_markers(text: &str) -> String {
    text.replace([OPEN, CLOSE], "")
}

/// Wraps content in markers, leaving surrounding whitespace outside them so that a template's
/// `.strip()` / `| trim` still removes it.
fn mark(content: &str) -> String {
    let start = content.len() - content.trim_start().len();
    let end = start + content[start..].trim_end().len();
    format!(
        "{}{OPEN}{}{CLOSE}{}",
        &content[..start],
        &content[start..end],
        &content[end..]
    )
}

/// Splits a marked render into segments; `None` if the markers do not pair up.
fn split_marked(marked: &str, controls: &[(String, u32)]) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut rest = marked;
    while let Some(open) = rest.find([OPEN, CLOSE]) {
        if !rest[open..].starts_with(OPEN) {
            return None;
        }
        split_controls(&rest[..open], controls, &mut segments);
        let content = &rest[open + OPEN.len_utf8()..];
        let close = content.find([OPEN, CLOSE])?;
        if !content[close..].starts_with(CLOSE) {
            return None;
        }
        push_text(&mut segments, &content[..close]);
        rest = &content[close + CLOSE.len_utf8()..];
    }
    split_controls(rest, controls, &mut segments);
    Some(segments)
}

/// Appends template text, turning each control-token string in it into its id
/// (leftmost-longest, as `controls` is sorted longest first).
fn split_controls(text: &str, controls: &[(String, u32)], segments: &mut Vec<Segment>) {
    let mut start = 0;
    let mut at = 0;
    while let Some(c) = text[at..].chars().next() {
        match controls
            .iter()
            .find(|(token, _)| text[at..].starts_with(token.as_str()))
        {
            Some((token, id)) => {
                push_text(segments, &text[start..at]);
                segments.push(Segment::Control(*id));
                at += token.len();
                start = at;
            }
            None => at += c.len_utf8(),
        }
    }
    push_text(segments, &text[start..]);
}

/// Appends text, merging it into a preceding text segment: template text and content that
/// touch are tokenized as one run, as they would be in the rendered string.
fn push_text(segments: &mut Vec<Segment>, text: &str) {
    if text.is_empty() {
        return;
    }
    match segments.last_mut() {
        Some(Segment::Text(previous)) => previous.push_str(text),
        _ => segments.push(Segment::Text(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Vec<(String, u32)> {
        vec![("</s>".into(), 2), ("<s>".into(), 1)]
    }

    #[test]
    fn mark_keeps_whitespace_outside() {
        assert_eq!(mark("  hi there \n"), format!("  {OPEN}hi there{CLOSE} \n"));
        assert_eq!(mark("   "), format!("   {OPEN}{CLOSE}"));
        assert_eq!(mark(""), format!("{OPEN}{CLOSE}"));
    }

    #[test]
    fn split_marked_finds_controls_only_in_template_text() {
        let marked = format!("<s>[INST] {OPEN}</s> x <s>{CLOSE} [/INST]</s>");
        assert_eq!(
            split_marked(&marked, &controls()),
            Some(vec![
                Segment::Control(1),
                Segment::Text("[INST] </s> x <s> [/INST]".into()),
                Segment::Control(2),
            ])
        );
        assert_eq!(split_marked(&format!("{CLOSE}x"), &controls()), None);
        assert_eq!(split_marked(&format!("{OPEN}x"), &controls()), None);
        assert_eq!(split_marked(&format!("{OPEN}x{OPEN}"), &controls()), None);
    }

    /// Issue 18: a template with nested loops hung the request, and `'x' * 10**8` took
    /// gigabytes; each now ends with an error naming its limit.
    #[test]
    fn runaway_templates_stop_at_their_limits() {
        let render = |source: &str| {
            let t = ChatTemplate::new(source.into(), "<s>".into(), "</s>".into()).unwrap();
            t.render(&[ChatMessage::new("user", "hi")], &controls())
                .unwrap_err()
                .to_string()
        };
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(e.contains("limit of 5000000 instructions"), "{e}");
        let e = render("{{ 'x' * 10**8 }}");
        assert!(e.contains("limit of 16777216 bytes"), "{e}");
    }
}
