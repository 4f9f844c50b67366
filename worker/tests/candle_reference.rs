//! Our CPU forward pass against candle-transformers' Mixtral, Mistral and Llama on the same
//! weights: prefill, then token-by-token decode, max |Δlogit| ≤ 1e-4 in f32. candle keeps
//! window+1 keys and ignores the window while decoding, so sequences stay shorter than any
//! window here (the Hugging Face fixtures cover sliding windows).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, mixtral};
use switchyard_model::config::{Arch, ModelConfig};
use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::Dtype;
use switchyard_scheduler::step::LogitsWanted;
use switchyard_worker::{CpuBackend, Engine, EngineConfig};

const PROMPT: [u32; 11] = [1, 17, 300, 5, 99, 400, 23, 23, 7, 250, 111];
const DECODE_STEPS: usize = 8;

/// The fields candle's configs deserialize from, filled from ours.
fn candle_json(c: &ModelConfig) -> serde_json::Value {
    let mut j = c.to_hf_json();
    let o = j.as_object_mut().unwrap();
    o.insert("use_flash_attn".into(), false.into());
    // candle's Mixtral wants a number; a window longer than every sequence here never applies.
    o.insert(
        "sliding_window".into(),
        c.sliding_window.unwrap_or(4096).into(),
    );
    j
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// candle's side of the comparison: one forward of `ids` at `offset`, last-position logits.
trait CandleModel {
    fn last_logits(&mut self, ids: &[u32], offset: usize) -> Vec<f32>;
}

struct CandleMixtral(mixtral::Model);
struct CandleMistral(mistral::Model);
struct CandleLlama(llama::Llama, llama::Cache);

fn to_vec(logits: Tensor) -> Vec<f32> {
    logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

impl CandleModel for CandleMixtral {
    fn last_logits(&mut self, ids: &[u32], offset: usize) -> Vec<f32> {
        to_vec(self.0.forward(&input(ids), offset).unwrap())
    }
}
impl CandleModel for CandleMistral {
    fn last_logits(&mut self, ids: &[u32], offset: usize) -> Vec<f32> {
        to_vec(self.0.forward(&input(ids), offset).unwrap())
    }
}
impl CandleModel for CandleLlama {
    fn last_logits(&mut self, ids: &[u32], offset: usize) -> Vec<f32> {
        to_vec(self.0.forward(&input(ids), offset, &mut self.1).unwrap())
    }
}

fn compare(config: ModelConfig) {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &config, 11, Dtype::F32, None).unwrap();
    let weights = dir.path().join("model.safetensors");
    // SAFETY: the file is ours and not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu).unwrap()
    };
    let json = candle_json(&config).to_string();
    let mut theirs: Box<dyn CandleModel> = match config.arch {
        Arch::Mixtral => {
            let cfg: mixtral::Config = serde_json::from_str(&json).unwrap();
            Box::new(CandleMixtral(mixtral::Model::new(&cfg, vb).unwrap()))
        }
        Arch::Mistral => {
            let cfg: mistral::Config = serde_json::from_str(&json).unwrap();
            Box::new(CandleMistral(mistral::Model::new(&cfg, vb).unwrap()))
        }
        Arch::Llama => {
            let cfg: llama::LlamaConfig = serde_json::from_str(&json).unwrap();
            let cfg = cfg.into_config(false);
            let cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            Box::new(CandleLlama(llama::Llama::load(vb, &cfg).unwrap(), cache))
        }
    };
    let engine_config = EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    };
    let mut ours = Engine::load(CpuBackend::default(), dir.path(), engine_config).unwrap();

    let mut worst = 0.0f32;
    let theirs_prefill = theirs.last_logits(&PROMPT, 0);
    let ours_prefill = ours
        .step_chunks(&[(1, &PROMPT, 0, LogitsWanted::Last)])
        .unwrap()
        .remove(0);
    worst = worst.max(max_abs_diff(&ours_prefill, &theirs_prefill));
    let mut next = switchyard_scheduler::sampling::argmax(&theirs_prefill);
    for pos in PROMPT.len()..PROMPT.len() + DECODE_STEPS {
        let theirs_step = theirs.last_logits(&[next], pos);
        let ours_step = ours
            .step_chunks(&[(1, &[next], pos, LogitsWanted::Last)])
            .unwrap()
            .remove(0);
        worst = worst.max(max_abs_diff(&ours_step, &theirs_step));
        next = switchyard_scheduler::sampling::argmax(&theirs_step);
    }
    println!(
        "{:?}: max |Δlogit| vs candle-transformers = {worst:e}",
        config.arch
    );
    assert!(worst <= 1e-4, "{:?}: max |Δlogit| {worst}", config.arch);
    // Logits are not all near zero: the comparison means something.
    assert!(theirs_prefill.iter().any(|l| l.abs() > 0.5));
}

#[test]
fn mixtral_matches_candle() {
    let mut c = preset("tiny-mixtral").unwrap();
    // Top-2 of 8 experts, so routing has real choices to get wrong.
    c.moe = Some(switchyard_model::MoeConfig {
        num_experts: 8,
        top_k: 2,
    });
    compare(c);
}

#[test]
fn mistral_matches_candle() {
    let mut c = preset("tiny-mistral").unwrap();
    c.sliding_window = None;
    // head_dim differs from hidden / heads (candle's Mistral reads head_dim).
    c.head_dim = 32;
    compare(c);
}

#[test]
fn llama_matches_candle() {
    let mut c = preset("tiny-llama").unwrap();
    // candle's Llama derives head_dim from hidden / heads.
    c.head_dim = c.hidden_size / c.num_heads;
    compare(c);
}
