//! Tokenizers built from GGUF metadata, against references we did not write:
//! - `llama` (SentencePiece): a vocabulary-only GGUF of Mistral's real tokenizer.model, written
//!   by llama.cpp's gguf-py as its converter does, must encode exactly as mistral-common does
//!   (`tests/data/mistral-v1-tokenizer/vectors.json`) and as Mistral's Hugging Face
//!   `tokenizer.json` does.
//! - `gpt2` (byte-level BPE): SmolLM2-135M-Instruct's GGUF must give the ids and chat prompts
//!   Hugging Face transformers gives from the same file
//!   (`tests/data/smollm2-gguf-tokenizer/reference.json`).
//!
//! The vocabularies are read from the files with gguf-py at test time; scripts/test.sh makes
//! its venv (scripts/gguf-py-env.sh) and fetches the files (scripts/smollm2.sh,
//! scripts/mistral-spm.sh).
//! Bad metadata needs no files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::{env, fs};

use serde_json::Value;
use switchyard_model::{ChatMessage, GgufVocab, Tokenizer, TokenizerError};

fn env_path(var: &str, what: &str) -> PathBuf {
    let path = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run scripts/test.sh, which makes {what}, or set {var}")
    });
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(path)
}

/// Runs tests/gguf/vocab.py with gguf-py's venv and returns its standard output.
fn vocab_py(args: &[&Path]) -> String {
    let python = env_path(
        "SWITCHYARD_GGUF_PYTHON",
        "the gguf-py venv (scripts/gguf-py-env.sh)",
    );
    let output = Command::new(python)
        .arg(data("gguf/vocab.py"))
        .args(args)
        .output()
        .expect("run tests/gguf/vocab.py");
    assert!(
        output.status.success(),
        "tests/gguf/vocab.py {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The tokenizer metadata of a GGUF file, as gguf-py reads it.
fn dump(gguf: &Path) -> GgufVocab {
    serde_json::from_str(&vocab_py(&[Path::new("dump"), gguf])).expect("GgufVocab JSON")
}

/// The template Mixtral-8x7B-Instruct-v0.1 first shipped with (`tokenizer_config.json`,
/// December 2023).
const MIXTRAL_TEMPLATE_2023: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

/// Mistral's tokenizer.model as a vocabulary-only GGUF, with `template` as its chat template.
fn mistral_gguf_vocab(template: Option<&str>) -> GgufVocab {
    let model = env_path(
        "SWITCHYARD_MISTRAL_SPM",
        "Mistral's tokenizer.model (scripts/mistral-spm.sh)",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("mistral-vocab.gguf");
    let mut args = vec![Path::new("spm"), &model, &gguf];
    let template_path = dir.path().join("template.jinja");
    if let Some(template) = template {
        fs::write(&template_path, template).expect("write template");
        args.push(&template_path);
    }
    vocab_py(&args);
    dump(&gguf)
}

fn mistral_vocab() -> &'static GgufVocab {
    static VOCAB: OnceLock<GgufVocab> = OnceLock::new();
    VOCAB.get_or_init(|| mistral_gguf_vocab(None))
}

fn mistral() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf_vocab(mistral_vocab()).expect("SPM tokenizer"))
}

fn smollm2_vocab() -> &'static GgufVocab {
    static VOCAB: OnceLock<GgufVocab> = OnceLock::new();
    VOCAB.get_or_init(|| {
        dump(&env_path(
            "SWITCHYARD_SMOLLM2",
            "the SmolLM2 GGUF (scripts/smollm2.sh)",
        ))
    })
}

fn json_file(path: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(data(path)).expect("read reference")).expect("JSON")
}

fn ids_of(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("ids")
}

#[test]
fn spm_vocabulary_is_what_llama_cpp_writes() {
    let vocab = mistral_vocab();
    assert_eq!(vocab.model, "llama");
    assert_eq!(vocab.tokens.len(), 32000);
    assert_eq!(
        (vocab.bos_id, vocab.eos_id, vocab.unk_id),
        (Some(1), Some(2), Some(0))
    );
    assert!(
        vocab.merges.is_none(),
        "SentencePiece GGUFs carry scores, not merges"
    );
    assert_eq!(vocab.scores.as_ref().map(Vec::len), Some(32000));
    let tokenizer = mistral();
    assert_eq!(tokenizer.vocab_size(), 32000);
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (Some(1), Some(2)));
    assert!(tokenizer.adds_bos());
}

#[test]
fn spm_encodes_like_mistral_common() {
    let tokenizer = mistral();
    let vectors = json_file("data/mistral-v1-tokenizer/vectors.json");
    let cases = vectors["encode_with_bos"]
        .as_array()
        .expect("encode_with_bos");
    assert_eq!(cases.len(), 24);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let ids = ids_of(&case["ids"]);
        assert_eq!(tokenizer.encode(text, true).unwrap(), ids, "text {text:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn spm_chat_matches_mistral_common() {
    // The GGUF has no chat template, so chats take Mistral's v1 format, as from tokenizer.json.
    let tokenizer = mistral();
    let vectors = json_file("data/mistral-v1-tokenizer/vectors.json");
    let cases = vectors["chat"].as_array().expect("chat vectors");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        assert_eq!(
            tokenizer.apply_chat(&messages).unwrap(),
            ids_of(&case["ids"]),
            "chat {messages:?}"
        );
    }
}

#[test]
fn spm_chat_template_from_gguf() {
    let vocab = mistral_gguf_vocab(Some(MIXTRAL_TEMPLATE_2023));
    assert_eq!(vocab.chat_template.as_deref(), Some(MIXTRAL_TEMPLATE_2023));
    let tokenizer = Tokenizer::from_gguf_vocab(&vocab).expect("SPM tokenizer");
    // For one user turn this template renders exactly Mistral's v1 format: `{{ bos_token }}` is
    // the BOS id (once), the rest is text.
    let vectors = json_file("data/mistral-v1-tokenizer/vectors.json");
    let case = &vectors["chat"][0];
    let messages: Vec<ChatMessage> =
        serde_json::from_value(case["messages"].clone()).expect("messages");
    assert_eq!(messages.len(), 1);
    assert_eq!(
        tokenizer.apply_chat(&messages).unwrap(),
        ids_of(&case["ids"])
    );
    let two_turns = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello"),
        ChatMessage::new("user", "</s> stays text"),
    ];
    let ids = tokenizer.apply_chat(&two_turns).unwrap();
    let mut expected = vec![1];
    expected.extend(tokenizer.encode("[INST] Hi [/INST]Hello", false).unwrap());
    expected.push(2);
    expected.extend(
        tokenizer
            .encode("[INST] </s> stays text [/INST]", false)
            .unwrap(),
    );
    assert_eq!(ids, expected);
}

/// Beyond the 24 vectors: long texts and whitespace runs, where merges of equal score meet,
/// against Mistral's own Hugging Face `tokenizer.json`.
#[test]
fn spm_matches_mistrals_tokenizer_json() {
    let reference = Tokenizer::from_file(&data("data/mistral-v1-tokenizer/tokenizer.json"))
        .expect("tokenizer.json");
    let tokenizer = mistral();
    let mut texts: Vec<String> = [
        "Once upon a time, in a land far, far away, there lived a dragon named Ximena.",
        "     \n\n   \t  x  y   z    w     v      u       t        s",
        "ÀÉÎÕÜ àéîõü ñ ç ß Ø å æ œ — “quotes” ‘single’ … • € £ ¥ © ® ™",
        "日本語のテキストと中文文本和한국어 텍스트",
        "fn main() {\n    println!(\"{}\", 1 + 2 * 3 / 4 - 5 % 6);\n}\n",
        "https://example.com/path?query=value&other=1#fragment",
        "\u{1F600}\u{1F601}\u{1F602} \u{2764}\u{FE0F} \u{1F1EB}\u{1F1F7}",
        "mixed\u{00A0}spaces\u{2003}and\u{3000}ideographic",
        "▁literal▁markers▁ and <0x41> byte names",
    ]
    .map(String::from)
    .to_vec();
    texts.extend((1..=12).map(|n| format!("a{}b", " ".repeat(n))));
    texts.extend((1..=12).map(|n| format!("{}x{}", "\n".repeat(n), " ".repeat(n))));
    for text in &texts {
        let expected = reference.encode(text, true).unwrap();
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            expected,
            "text {text:?}"
        );
        // SentencePiece writes a space as `▁`, so a literal `▁` comes back as a space.
        assert_eq!(tokenizer.decode(&expected).unwrap(), text.replace('▁', " "));
    }
}

#[test]
fn byte_level_vocabulary_is_smollm2s() {
    let vocab = smollm2_vocab();
    assert_eq!(vocab.model, "gpt2");
    assert_eq!(vocab.pre.as_deref(), Some("smollm"));
    assert_eq!(vocab.tokens.len(), 49152);
    assert_eq!(vocab.add_bos, Some(false));
    let tokenizer = Tokenizer::from_gguf_vocab(vocab).expect("byte-level tokenizer");
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (Some(1), Some(2)));
    assert!(!tokenizer.adds_bos());
}

#[test]
fn byte_level_encodes_like_transformers() {
    let tokenizer = Tokenizer::from_gguf_vocab(smollm2_vocab()).expect("byte-level tokenizer");
    let reference = json_file("data/smollm2-gguf-tokenizer/reference.json");
    let cases = reference["encode"].as_array().expect("encode cases");
    assert_eq!(cases.len(), 19);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let hf = ids_of(&case["ids"]);
        let ids = tokenizer.encode(text, true).unwrap();
        if text.contains("<|im_start|>") {
            // transformers turns control-token text into the control token; a server must not.
            assert_eq!(hf[0], 1, "{hf:?}");
            assert!(!ids.contains(&1), "{text:?} gave {ids:?}");
            assert_eq!(ids[ids.len() - hf.len() + 1..], hf[1..]);
        } else {
            assert_eq!(ids, hf, "text {text:?}");
        }
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn byte_level_chat_template_matches_transformers() {
    let tokenizer = Tokenizer::from_gguf_vocab(smollm2_vocab()).expect("byte-level tokenizer");
    let reference = json_file("data/smollm2-gguf-tokenizer/reference.json");
    let cases = reference["chat"].as_array().expect("chat cases");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let ids = tokenizer.apply_chat(&messages).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "chat {messages:?}");
        // Special tokens are skipped when decoding, so the text is the render without them.
        let text = case["text"].as_str().expect("text");
        let plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(tokenizer.decode(&ids).unwrap(), plain);
    }
}

#[test]
fn byte_level_streams_what_it_decodes() {
    let tokenizer = Tokenizer::from_gguf_vocab(smollm2_vocab()).expect("byte-level tokenizer");
    let text = "naïve café — 東京 🚀 emoji 👩‍👩‍👧 family\n\tcode();";
    let ids = tokenizer.encode(text, false).unwrap();
    let mut decoder = tokenizer.incremental_decoder();
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&decoder.push(&tokenizer, id).unwrap());
    }
    streamed.push_str(&decoder.finish(&tokenizer).unwrap());
    assert_eq!(streamed, text);
}

/// A small valid SentencePiece vocabulary to break one field at a time.
fn tiny_spm() -> GgufVocab {
    let tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"]
        .map(String::from)
        .to_vec();
    GgufVocab {
        model: "llama".into(),
        scores: Some(vec![0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]),
        token_types: Some(vec![2, 3, 3, 1, 1, 1, 1, 1]),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        tokens,
        ..GgufVocab::default()
    }
}

/// A small valid byte-level vocabulary (`Ġ` is GPT-2's spelling of a space).
fn tiny_bpe() -> GgufVocab {
    GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt-2".into()),
        tokens: ["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġab"]
            .map(String::from)
            .to_vec(),
        token_types: Some(vec![3, 1, 1, 1, 1, 1]),
        merges: Some(vec!["a b".into(), "Ġ ab".into()]),
        eos_id: Some(0),
        ..GgufVocab::default()
    }
}

fn error_of(vocab: &GgufVocab) -> String {
    match Tokenizer::from_gguf_vocab(vocab) {
        Ok(_) => panic!("{vocab:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

fn assert_error(vocab: GgufVocab, expected: &[&str]) {
    let message = error_of(&vocab);
    for part in expected {
        assert!(message.contains(part), "{message:?} does not say {part:?}");
    }
}

#[test]
fn tiny_vocabularies_work() {
    let spm = Tokenizer::from_gguf_vocab(&tiny_spm()).unwrap();
    let ids = spm.encode("ab a", true).unwrap();
    assert_eq!(ids, [1, 6, 5, 6]);
    assert_eq!(spm.decode(&ids).unwrap(), "ab a");
    let bpe = Tokenizer::from_gguf_vocab(&tiny_bpe()).unwrap();
    let ids = bpe.encode("ab ab", true).unwrap();
    assert_eq!(
        ids,
        [4, 5],
        "no BOS: gpt2 vocabularies do not add one by default"
    );
    assert_eq!(bpe.decode(&ids).unwrap(), "ab ab");
}

#[test]
fn bad_metadata_is_a_clear_error() {
    assert_error(
        GgufVocab {
            model: "bert".into(),
            ..tiny_spm()
        },
        &["tokenizer.ggml.model", "\"bert\"", "\"llama\"", "\"gpt2\""],
    );
    assert_error(
        GgufVocab {
            tokens: Vec::new(),
            ..tiny_spm()
        },
        &["tokenizer.ggml.tokens is empty"],
    );
    assert_error(
        GgufVocab {
            bos_id: Some(8),
            ..tiny_spm()
        },
        &["tokenizer.ggml.bos_token_id is 8", "8 tokens"],
    );
    assert_error(
        GgufVocab {
            eos_id: Some(u32::MAX),
            ..tiny_bpe()
        },
        &["tokenizer.ggml.eos_token_id is 4294967295"],
    );
    assert_error(
        GgufVocab {
            unk_id: Some(100),
            ..tiny_spm()
        },
        &["tokenizer.ggml.unknown_token_id is 100"],
    );
    assert_error(
        GgufVocab {
            pad_id: Some(9),
            ..tiny_spm()
        },
        &["tokenizer.ggml.padding_token_id is 9"],
    );
    assert_error(
        GgufVocab {
            scores: Some(vec![0.0; 7]),
            ..tiny_spm()
        },
        &["tokenizer.ggml.scores has 7 entries", "(8)"],
    );
    assert_error(
        GgufVocab {
            scores: None,
            ..tiny_spm()
        },
        &["needs tokenizer.ggml.scores"],
    );
    assert_error(
        GgufVocab {
            token_types: Some(vec![1; 3]),
            ..tiny_spm()
        },
        &["tokenizer.ggml.token_type has 3 entries"],
    );
    assert_error(
        GgufVocab {
            token_types: Some(vec![2, 3, 3, 1, 1, 1, 1, 9]),
            ..tiny_spm()
        },
        &["token_type of token 7", "is 9", "expected 0 to 6"],
    );
    let mut duplicate = tiny_spm();
    duplicate.tokens[7] = "a".into();
    assert_error(duplicate, &["\"a\" twice", "ids 4 and 7"]);
    assert_error(
        GgufVocab {
            merges: Some(vec!["a b".into(), "Ġ c".into()]),
            ..tiny_bpe()
        },
        &["tokenizer.ggml.merges[1]", "\"c\"", "does not have"],
    );
    assert_error(
        GgufVocab {
            merges: Some(vec!["b a".into()]),
            ..tiny_bpe()
        },
        &["tokenizer.ggml.merges[0]", "\"ba\""],
    );
    assert_error(
        GgufVocab {
            merges: Some(vec!["ab".into()]),
            ..tiny_bpe()
        },
        &[
            "tokenizer.ggml.merges[0]",
            "two tokens separated by one space",
        ],
    );
    assert_error(
        GgufVocab {
            merges: None,
            ..tiny_bpe()
        },
        &["needs tokenizer.ggml.merges"],
    );
    assert_error(
        GgufVocab {
            pre: Some("brand-new".into()),
            ..tiny_bpe()
        },
        &["tokenizer.ggml.pre is \"brand-new\"", "smollm"],
    );
    let template = GgufVocab {
        chat_template: Some("{% for m in messages %}{{ m.content }".into()),
        ..tiny_bpe()
    };
    assert!(matches!(
        Tokenizer::from_gguf_vocab(&template),
        Err(TokenizerError::GgufTemplate(_))
    ));
    assert!(error_of(&template).contains("tokenizer.chat_template"));
}
