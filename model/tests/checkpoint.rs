//! Loading model directories: whole and sharded, subsets touching only their tensors, and every
//! kind of broken checkpoint rejected with a message that names what is wrong.

use std::path::Path;

use switchyard_model::init::{preset, write_model_dir};
use switchyard_model::safetensors::{self, Dtype, OwnedTensor, SafetensorsFile};
use switchyard_model::{Checkpoint, Subset};

fn tiny(dtype: Dtype, shard: Option<usize>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(
        dir.path(),
        &preset("tiny-mixtral").unwrap(),
        1,
        dtype,
        shard,
    )
    .unwrap();
    dir
}

/// Rewrites `model.safetensors` after `edit` changed its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<OwnedTensor>)) {
    let path = dir.join("model.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let mut tensors: Vec<OwnedTensor> = file
        .tensors()
        .iter()
        .map(|(name, info)| OwnedTensor {
            name: name.clone(),
            dtype: info.float_dtype().unwrap(),
            shape: info.shape.clone(),
            data: file.bytes(info).to_vec(),
        })
        .collect();
    drop(file);
    edit(&mut tensors);
    safetensors::write(&path, &tensors.iter().collect::<Vec<_>>()).unwrap();
}

fn validate_err(dir: &Path) -> String {
    match Checkpoint::open(dir).and_then(|c| c.validate(&Subset::all(c.config()))) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("broken checkpoint accepted"),
    }
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn all_dtypes_and_sharding_load_the_same_model() {
    let f32_dir = tiny(Dtype::F32, None);
    let reference = Checkpoint::open(f32_dir.path()).unwrap();
    let q = reference.read_f32(Q0, &[64, 64]).unwrap();
    for (dtype, tol) in [(Dtype::BF16, 1e-2), (Dtype::F16, 1e-3)] {
        for shard in [None, Some(50_000)] {
            let dir = tiny(dtype, shard);
            let c = Checkpoint::open(dir.path()).unwrap();
            c.validate(&Subset::all(c.config())).unwrap();
            let other = c.read_f32(Q0, &[64, 64]).unwrap();
            let worst = q
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
                .fold(0.0, f32::max);
            assert!(worst < tol, "{dtype:?} {shard:?}: relative error {worst}");
            assert!(c.bytes_by_dtype().contains_key(dtype.name()));
        }
    }
}

#[test]
fn a_subset_needs_only_its_tensors() {
    let dir = tiny(Dtype::F32, None);
    // Remove everything a stage holding layer 1 with experts {0, 2} and the head does not need.
    rewrite(dir.path(), |t| {
        t.retain(|t| {
            !t.name.contains("layers.0.")
                && !t.name.contains("experts.1.")
                && !t.name.contains("experts.3.")
                && t.name != "model.embed_tokens.weight"
        })
    });
    let c = Checkpoint::open(dir.path()).unwrap();
    let subset = Subset {
        layers: 1..2,
        experts: Some([0, 2].into()),
        embedding: false,
        head: true,
    };
    c.validate(&subset).unwrap();
    // The whole model is not there: the first layer the file lacks is named (layers are
    // counted against the file before each tensor is checked).
    let e = c
        .validate(&Subset::all(c.config()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.input_layernorm.weight") && e.contains("missing"),
        "{e}"
    );
    let e = c
        .validate(&Subset {
            embedding: true,
            ..subset
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tiny(Dtype::F32, None);
    rewrite(dir.path(), |t| t.retain(|t| t.name != Q0));
    let e = validate_err(dir.path());
    assert!(
        e.contains(Q0) && e.contains("missing") && e.contains("[64, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = tiny(Dtype::F32, None);
    rewrite(dir.path(), |t| {
        let q = t.iter_mut().find(|t| t.name == Q0).unwrap();
        q.shape = vec![32, 128];
    });
    let e = validate_err(dir.path());
    assert!(
        e.contains(Q0) && e.contains("[32, 128]") && e.contains("expected [64, 64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = tiny(Dtype::F32, None);
    // Hand-write a file whose q_proj is I32: our writer only writes float dtypes.
    let path = dir.path().join("model.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, info) in file.tensors() {
        let dtype = if name == Q0 {
            "I32"
        } else {
            info.float_dtype().unwrap().name()
        };
        let bytes = file.bytes(info);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": info.shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    drop(file);
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    std::fs::write(&path, out).unwrap();
    let e = validate_err(dir.path());
    assert!(
        e.contains(Q0) && e.contains("I32") && e.contains("expected one of F32, F16, BF16"),
        "{e}"
    );
}

#[test]
fn truncated_file_is_named() {
    let dir = tiny(Dtype::BF16, None);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = validate_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn broken_directories_are_named() {
    let dir = tiny(Dtype::F32, Some(100_000));
    // A shard the index names is gone.
    let index = std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap();
    let shard = index
        .split('"')
        .find(|s| s.ends_with("safetensors"))
        .unwrap()
        .to_string();
    std::fs::remove_file(dir.path().join(&shard)).unwrap();
    let e = validate_err(dir.path());
    assert!(e.contains(&shard), "{e}");

    // No weights at all.
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    let e = validate_err(dir.path());
    assert!(e.contains("no model.safetensors"), "{e}");

    // No config.
    let empty = tempfile::tempdir().unwrap();
    let e = validate_err(empty.path());
    assert!(e.contains("config.json"), "{e}");

    // An architecture we do not run.
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["FalconForCausalLM"]}"#,
    )
    .unwrap();
    let e = validate_err(dir.path());
    assert!(
        e.contains("FalconForCausalLM") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
}

/// Issue 18: a shape whose element count overflows (2^58 × 64 × 4 bytes) wrapped to 0 bytes,
/// passed validation, and `generate` panicked.
#[test]
fn a_shape_whose_size_overflows_is_refused() {
    let dir = tiny(Dtype::F32, None);
    let path = dir.path().join("model.safetensors");
    let header = serde_json::json!({
        Q0: {"dtype": "F32", "shape": [1u64 << 58, 64], "data_offsets": [0, 0]},
    })
    .to_string();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    std::fs::write(&path, file).unwrap();
    let e = validate_err(dir.path());
    assert!(
        e.contains(Q0) && e.contains("has more bytes than a file can hold"),
        "{e}"
    );
}

/// Issue 18: a config claiming 10^9 layers or experts allocated gigabytes before any check.
/// Sizes past any model are refused when config.json is read; counts the file does not hold
/// are refused before the list of tensors is made from them.
#[test]
fn configs_claiming_more_than_the_file_holds_are_refused() {
    let dir = tiny(Dtype::F32, None);
    let config_path = dir.path().join("config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |field: &str, value: u64| {
        let mut c = config.clone();
        c[field] = value.into();
        std::fs::write(&config_path, c.to_string()).unwrap();
        validate_err(dir.path())
    };
    let e = with("num_hidden_layers", 1_000_000_000);
    assert!(
        e.contains("num_hidden_layers") && e.contains("at most 1024"),
        "{e}"
    );
    let e = with("num_local_experts", 1_000_000_000);
    assert!(
        e.contains("num_local_experts") && e.contains("at most 1024"),
        "{e}"
    );
    let e = with("num_hidden_layers", 1000);
    assert!(
        e.contains("model.layers.2.input_layernorm.weight") && e.contains("missing"),
        "{e}"
    );
    let e = with("num_local_experts", 1000);
    assert!(
        e.contains("block_sparse_moe.gate.weight") && e.contains("expected [1000, 64]"),
        "{e}"
    );
}

/// Issue 18: NaN and infinite weights were loaded as they were.
#[test]
fn non_finite_weights_are_reported_by_tensor() {
    for bad in [f32::NAN, f32::INFINITY] {
        let dir = tiny(Dtype::F32, None);
        rewrite(dir.path(), |t| {
            let q = t.iter_mut().find(|t| t.name == Q0).unwrap();
            q.data[40..44].copy_from_slice(&bad.to_le_bytes());
        });
        let c = Checkpoint::open(dir.path()).unwrap();
        let e = c.read_f32(Q0, &[64, 64]).unwrap_err().to_string();
        assert!(
            e.contains(Q0) && e.contains("at element 10") && e.contains("expected finite"),
            "{bad}: {e}"
        );
    }
}
