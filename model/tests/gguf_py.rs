//! Our GGUF reader and writer against gguf-py (the llama.cpp project's `gguf` package): files
//! gguf-py's GGUFWriter writes read back as it wrote them, and files we write read in gguf-py's
//! GGUFReader as we wrote them. `scripts/test.sh` makes the venv (scripts/gguf-py-env.sh).

use std::process::Command;

use serde_json::Value;
use switchyard_model::gguf::{write, GgufArray, GgufFile, GgufMetadata, GgufValue, TensorDesc};
use switchyard_model::{HostWeight, WeightType};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gguf_py.py");

fn python(args: &[&str]) -> String {
    let python = std::env::var("SWITCHYARD_GGUF_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SWITCHYARD_GGUF_PYTHON is not set: these tests need gguf-py as their reference; \
             run scripts/test.sh or `source scripts/gguf-py-env.sh`"
        )
    });
    let out = Command::new(python)
        .arg(SCRIPT)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_py.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn we_read_what_gguf_py_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, json) = (dir.path().join("py.gguf"), dir.path().join("py.json"));
    python(&["write", path.to_str().unwrap(), json.to_str().unwrap()]);
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let m = f.metadata();
    let want = [
        ("general.architecture", GgufValue::String("llama".into())),
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-5)),
        ("t.u16", GgufValue::U16(60000)),
        ("t.i16", GgufValue::I16(-30000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-7)),
        ("t.u64", GgufValue::U64(1 << 40)),
        ("t.i64", GgufValue::I64(-(1 << 40))),
        ("t.f32", GgufValue::F32(1e-5)),
        ("t.f64", GgufValue::F64(0.1)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.str", GgufValue::String("héllo ▁world".into())),
        (
            "t.strs",
            GgufValue::Array(GgufArray::String(vec![
                "a".into(),
                "Ġb".into(),
                "<|im_end|>".into(),
            ])),
        ),
        ("t.ints", GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))),
        (
            "t.floats",
            GgufValue::Array(GgufArray::F32(vec![0.5, -1.25])),
        ),
        (
            "t.nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::I32(vec![1, 2]),
                GgufArray::I32(vec![3]),
            ])),
        ),
    ];
    for (key, value) in &want {
        assert_eq!(m.get(key), Some(value), "{key}");
    }
    assert_eq!(m.len(), want.len(), "{m:?}");

    for (name, t) in expected["tensors"].as_object().unwrap() {
        let info = f.tensor(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(info.shape(), shape, "{name}");
        assert_eq!(info.ty.name(), t["type"].as_str().unwrap(), "{name}");
        assert_eq!(hex(f.bytes(info)), t["bytes"].as_str().unwrap(), "{name}");
    }
    // gguf-py's dequantization of its own Q8_0 blocks, value for value.
    let info = f.tensor("c.weight").unwrap();
    let w = HostWeight::new(
        info.ty,
        info.shape()[..2].iter().product(),
        info.dims[0],
        f.weight_bytes(info.range.clone()),
    )
    .unwrap();
    let py: Vec<f32> =
        serde_json::from_value(expected["tensors"]["c.weight"]["f32"].clone()).unwrap();
    assert_eq!(w.to_f32(), py);
}

#[test]
fn gguf_py_reads_what_we_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    let mut m = GgufMetadata::new();
    m.insert("general.architecture", GgufValue::String("llama".into()));
    m.insert("llama.block_count", GgufValue::U32(30));
    m.insert("t.i16", GgufValue::I16(-3));
    m.insert("t.u64", GgufValue::U64(u64::MAX));
    m.insert("t.f64", GgufValue::F64(-2.5));
    m.insert("t.bool", GgufValue::Bool(false));
    m.insert(
        "tokenizer.ggml.tokens",
        GgufValue::Array(GgufArray::String(vec!["<s>".into(), "▁the".into()])),
    );
    m.insert(
        "t.scores",
        GgufValue::Array(GgufArray::F32(vec![0.0, -1.5])),
    );
    m.insert(
        "t.nested",
        GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U8(vec![7, 8]),
            GgufArray::U8(vec![9]),
        ])),
    );
    let values: Vec<f32> = (0..4 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut q8 = Vec::new();
    switchyard_model::quant::quantize_row(WeightType::Q8_0, &values, &mut q8);
    let f32_bytes: Vec<u8> = values[..15].iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensors = [
        (
            TensorDesc {
                name: "w.f32".into(),
                shape: vec![3, 5],
                ty: WeightType::F32,
            },
            f32_bytes.as_slice(),
        ),
        (
            TensorDesc {
                name: "w.q8".into(),
                shape: vec![2, 2, 64],
                ty: WeightType::Q8_0,
            },
            q8.as_slice(),
        ),
    ];
    write(&path, &m, &tensors).unwrap();

    let read: Value = serde_json::from_str(&python(&["read", path.to_str().unwrap()])).unwrap();
    let meta = &read["metadata"];
    let check = |key: &str, types: Value, value: Value| {
        assert_eq!(meta[key]["types"], types, "{key}");
        assert_eq!(meta[key]["value"], value, "{key}");
    };
    check(
        "general.architecture",
        serde_json::json!(["STRING"]),
        "llama".into(),
    );
    check(
        "llama.block_count",
        serde_json::json!(["UINT32"]),
        30.into(),
    );
    check("t.i16", serde_json::json!(["INT16"]), (-3).into());
    check("t.u64", serde_json::json!(["UINT64"]), u64::MAX.into());
    check("t.f64", serde_json::json!(["FLOAT64"]), (-2.5).into());
    check("t.bool", serde_json::json!(["BOOL"]), false.into());
    check(
        "tokenizer.ggml.tokens",
        serde_json::json!(["ARRAY", "STRING"]),
        serde_json::json!(["<s>", "▁the"]),
    );
    check(
        "t.scores",
        serde_json::json!(["ARRAY", "FLOAT32"]),
        serde_json::json!([0.0, -1.5]),
    );
    // gguf-py flattens nested arrays' contents.
    check(
        "t.nested",
        serde_json::json!(["ARRAY", "ARRAY", "UINT8"]),
        serde_json::json!([7, 8, 9]),
    );
    assert_eq!(meta.as_object().unwrap().len(), 9);
    for (desc, bytes) in &tensors {
        let t = &read["tensors"][&desc.name];
        assert_eq!(t["type"], desc.ty.name());
        assert_eq!(t["bytes"], hex(bytes));
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(shape, desc.shape);
    }
}
