//! Any text as config.json: refused with a reason, or a config whose sizes (parameter counts,
//! KV bytes) compute without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_model::safetensors::Dtype;
use switchyard_model::{ModelConfig, Subset};

fuzz_target!(|text: &str| {
    if let Ok(c) = ModelConfig::from_json_str(text) {
        let _ = c.param_counts();
        let _ = c.subset_params(&Subset::all(&c));
        let _ = c.kv_bytes_per_token(Dtype::F32);
        assert!(c.rope_theta.is_finite() && c.rope_theta > 0.0);
    }
});
