//! The CUDA C++ sources, grouped into modules (one NVRTC program each), and the compile-time
//! constants some of them are specialised with. Sources are embedded in the binary, so a worker
//! needs no files besides `libnvrtc` at run time.

use std::fmt;

use crate::geometry::decode_lanes;

const COMMON: &str = include_str!("../cuda/common.cuh");

/// One NVRTC program: a `.cu` file with `common.cuh` prepended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Elementwise,
    AttentionPrefill,
    AttentionDecode,
    Moe,
    MoeGemm,
    QuantGemv,
}

impl Module {
    /// Every module: what CI compiles and assembles.
    pub const ALL: [Module; 6] = [
        Module::Elementwise,
        Module::AttentionPrefill,
        Module::AttentionDecode,
        Module::Moe,
        Module::MoeGemm,
        Module::QuantGemv,
    ];

    /// The modules a GPU backend launches, compiled and loaded when it starts. `QuantGemv` is
    /// not among them until the CUDA backend keeps quantized weights.
    pub const SERVING: [Module; 5] = [
        Module::Elementwise,
        Module::AttentionPrefill,
        Module::AttentionDecode,
        Module::Moe,
        Module::MoeGemm,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Module::Elementwise => "elementwise.cu",
            Module::AttentionPrefill => "attention_prefill.cu",
            Module::AttentionDecode => "attention_decode.cu",
            Module::Moe => "moe.cu",
            Module::MoeGemm => "moe_gemm.cu",
            Module::QuantGemv => "quant_gemv.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::Elementwise => include_str!("../cuda/elementwise.cu"),
            Module::AttentionPrefill => include_str!("../cuda/attention_prefill.cu"),
            Module::AttentionDecode => include_str!("../cuda/attention_decode.cu"),
            Module::Moe => include_str!("../cuda/moe.cu"),
            Module::MoeGemm => include_str!("../cuda/moe_gemm.cu"),
            Module::QuantGemv => include_str!("../cuda/quant_gemv.cu"),
        }
    }

    /// The `extern "C"` kernels the module defines (what the loader looks up).
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            Module::Elementwise => &[
                "embed_gather",
                "rms_norm",
                "rope",
                "kv_append",
                "cast_f32_bf16",
                "gather_rows_f32",
                "gather_rows_bf16",
                "silu_mul",
                "add_f32",
            ],
            Module::AttentionPrefill => &["attention_prefill"],
            Module::AttentionDecode => &["attention_decode", "attention_decode_reduce"],
            Module::Moe => &["moe_router", "moe_sort", "moe_combine"],
            Module::MoeGemm => &[
                "moe_gate_up_gemv",
                "moe_down_gemv",
                "moe_gate_up_mma",
                "moe_down_mma",
            ],
            Module::QuantGemv => &[
                "gemv_q8_0",
                "moe_gate_up_gemv_q8_0",
                "moe_down_gemv_q8_0",
                "gemv_q4_k",
                "moe_gate_up_gemv_q4_k",
                "moe_down_gemv_q4_k",
            ],
        }
    }

    /// The full program text NVRTC compiles.
    pub fn source(self) -> String {
        format!(
            "// ---- common.cuh ----\n{COMMON}\n// ---- {} ----\n{}",
            self.file_name(),
            self.body()
        )
    }

    /// The `-D` options the module needs for a model of shape `spec`.
    pub fn defines(self, spec: &Spec) -> Vec<String> {
        match self {
            Module::AttentionPrefill => vec![format!("-DHEAD_DIM={}", spec.head_dim)],
            Module::AttentionDecode => vec![
                format!("-DHEAD_DIM={}", spec.head_dim),
                format!("-DGROUP={}", spec.group),
            ],
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_name())
    }
}

/// The model shape the attention kernels are specialised for: register arrays and tile loops
/// are sized at compile time, which NVRTC makes free (we compile for the model we serve).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spec {
    pub head_dim: usize,
    /// Query heads per KV head (GQA).
    pub group: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("head_dim {0} is not supported by the CUDA kernels (a multiple of 16, at most 256)")]
    HeadDim(usize),
    #[error("{heads} query heads over {kv_heads} KV heads: the CUDA decode kernel handles 1 to 8 query heads per KV head")]
    Group { heads: usize, kv_heads: usize },
    #[error("head_dim {head_dim} with {group} query heads per KV head: at this head_dim the CUDA decode kernel holds 2 chunks of each row per lane and handles at most {max_group} query heads per KV head (head_dim 16, 32, 64, 128 and 256 handle up to 8)")]
    DecodeRegisters {
        head_dim: usize,
        group: usize,
        max_group: usize,
    },
}

/// The most query heads per KV head the decode kernel keeps in registers, in q and output
/// values per lane (`GROUP · CH ≤ 8` in attention_decode.cu).
const DECODE_LANE_HEADS: usize = 8;

impl Spec {
    /// Checks a model shape against what the kernels can be compiled for.
    pub fn new(head_dim: usize, heads: usize, kv_heads: usize) -> Result<Spec, SpecError> {
        if head_dim == 0 || !head_dim.is_multiple_of(16) || head_dim > 256 {
            return Err(SpecError::HeadDim(head_dim));
        }
        let group_err = SpecError::Group { heads, kv_heads };
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(group_err);
        }
        let group = heads / kv_heads;
        if !(1..=8).contains(&group) {
            return Err(group_err);
        }
        let max_group = DECODE_LANE_HEADS / decode_lanes(head_dim).chunks_per_lane;
        if group > max_group {
            return Err(SpecError::DecodeRegisters {
                head_dim,
                group,
                max_group,
            });
        }
        Ok(Spec { head_dim, group })
    }

    /// Every shape [`Spec::new`] accepts: what the kernels must compile for.
    pub fn all() -> impl Iterator<Item = Spec> {
        (16..=256)
            .step_by(16)
            .flat_map(|d| (1..=8).filter_map(move |g| Spec::new(d, g, 1).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_name_is_defined_in_its_source() {
        for m in Module::ALL {
            let src = m.source();
            for k in m.kernels() {
                let needle = format!("{k}(");
                assert!(
                    src.contains(&needle),
                    "{m}: no definition of kernel {k} found"
                );
            }
        }
    }

    #[test]
    fn specs_are_checked() {
        assert_eq!(
            Spec::new(128, 32, 8),
            Ok(Spec {
                head_dim: 128,
                group: 4
            })
        );
        assert_eq!(
            Spec::new(16, 4, 2),
            Ok(Spec {
                head_dim: 16,
                group: 2
            })
        );
        assert_eq!(Spec::new(72, 8, 8), Err(SpecError::HeadDim(72)));
        assert!(Spec::new(128, 64, 4).is_err());
        assert!(Spec::new(128, 6, 4).is_err());
        // Head dims whose rows take two chunks per lane: up to 4 query heads per KV head.
        for d in [48, 80, 96, 112, 144, 160, 176, 192, 208, 224, 240] {
            assert!(Spec::new(d, 4, 1).is_ok(), "{d}");
            let e = Spec::new(d, 8, 1).unwrap_err();
            assert_eq!(
                e,
                SpecError::DecodeRegisters {
                    head_dim: d,
                    group: 8,
                    max_group: 4
                }
            );
            assert!(
                e.to_string().contains("at most 4 query heads per KV head"),
                "{e}"
            );
        }
        for d in [16, 32, 64, 128, 256] {
            assert!(Spec::new(d, 64, 8).is_ok(), "{d}");
        }
        assert_eq!(Spec::all().count(), 5 * 8 + 11 * 4);
    }
}
