// TEMPORARY STUB by the lead so the rest compiles; helper-1 owns this file and replaces it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
