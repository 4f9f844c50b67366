//! CI without a GPU: every kernel module is compiled by NVRTC to PTX for sm_80 (A100) and sm_90
//! (H100), at the model shapes we serve, and assembled by `ptxas -v`. The test fails on any
//! compile error, any register spill or any local-memory (stack) use, and prints registers and
//! shared memory per kernel.
//!
//! NVRTC (`libnvrtc`, with `libnvrtc-builtins` beside it) must be on the library path and
//! `ptxas` on `PATH` (or in `$PTXAS`): `scripts/cuda-toolchain.sh` installs both from PyPI.
//! Without them this test FAILS rather than skips, so CI cannot go green without checking the
//! kernels.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use switchyard_kernels::{Module, Nvrtc, Spec, Target};

const ARCHS: [u32; 2] = [80, 90];

/// Model shapes: Mixtral/Mistral (d 128, 4 query heads per KV head), Llama-2-70B-like (d 128,
/// group 8), d 64 (small-mixtral), and the tiny test presets (d 16 and 32, group 2).
const SPECS: [(usize, usize); 5] = [(128, 4), (128, 8), (64, 2), (32, 2), (16, 2)];

/// One kernel's `ptxas -v` figures.
#[derive(Debug, Default, Clone)]
struct Usage {
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn ptxas() -> PathBuf {
    if let Some(p) = std::env::var_os("PTXAS") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ptxas"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "ptxas not found on PATH (nor $PTXAS). Run `source scripts/cuda-toolchain.sh` \
             (it installs nvidia-cuda-nvcc from PyPI), or run scripts/test.sh."
        )
    })
}

/// The number before `what` in a `ptxas -v` line ("…, 12 bytes spill stores, …").
fn number_before(line: &str, what: &str) -> Option<u32> {
    let end = line.find(what)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output into figures per entry function.
fn parse(log: &str) -> BTreeMap<String, Usage> {
    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(rest.trim().to_string());
            continue;
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
            continue;
        }
        let Some(name) = &current else { continue };
        let u = out.entry(name.clone()).or_default();
        if line.contains("stack frame") {
            u.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            u.registers = number_before(line, "registers").unwrap_or(0);
            u.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let nvrtc = Nvrtc::load().unwrap_or_else(|e| {
        panic!("{e}\nRun `source scripts/cuda-toolchain.sh` or scripts/test.sh.")
    });
    let ptxas = ptxas();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    println!(
        "NVRTC {}.{}; ptxas {}",
        nvrtc.version().0,
        nvrtc.version().1,
        ptxas.display()
    );
    println!(
        "{:<7} {:<26} {:<24} {:>5} {:>7} {:>6} {:>7}",
        "arch", "kernel", "shape", "regs", "smem B", "stack", "spills"
    );
    for arch in ARCHS {
        for module in Module::ALL {
            let specs: Vec<Spec> = if module.defines(&Spec::new(16, 1, 1).unwrap()).is_empty() {
                vec![Spec::new(16, 1, 1).unwrap()] // shape-independent: compile once
            } else {
                SPECS
                    .iter()
                    .map(|&(d, g)| Spec::new(d, g, 1).unwrap())
                    .collect()
            };
            for spec in specs {
                let shape = match module.defines(&spec).is_empty() {
                    true => "-".to_string(),
                    false => format!("d={} group={}", spec.head_dim, spec.group),
                };
                let ptx = match nvrtc.compile(
                    module.file_name(),
                    &module.source(),
                    &module.defines(&spec),
                    Target::Ptx(arch),
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        failures.push(format!("sm_{arch} {module} {shape}: {e}"));
                        continue;
                    }
                };
                let path = dir.path().join(format!("{module}-{arch}.ptx"));
                std::fs::write(&path, &ptx).unwrap();
                let out = Command::new(&ptxas)
                    .arg(format!("-arch=sm_{arch}"))
                    .arg("-v")
                    .arg("-o")
                    .arg(dir.path().join("out.cubin"))
                    .arg(&path)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
                let log = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if !out.status.success() {
                    failures.push(format!("sm_{arch} {module} {shape}: ptxas failed:\n{log}"));
                    continue;
                }
                let usage = parse(&log);
                for kernel in module.kernels() {
                    let Some(u) = usage.get(*kernel) else {
                        failures.push(format!("sm_{arch} {module}: no ptxas report for {kernel}"));
                        continue;
                    };
                    println!(
                        "sm_{:<4} {:<26} {:<24} {:>5} {:>7} {:>6} {:>3}/{:<3}",
                        arch,
                        kernel,
                        shape,
                        u.registers,
                        u.smem,
                        u.stack,
                        u.spill_stores,
                        u.spill_loads
                    );
                    if u.stack > 0 || u.spill_stores > 0 || u.spill_loads > 0 {
                        failures.push(format!(
                            "sm_{arch} {kernel} {shape}: {} bytes stack, {} / {} bytes spilled",
                            u.stack, u.spill_stores, u.spill_loads
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn ptxas_report_parses() {
    let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rms_norm' for 'sm_80'\n\
ptxas info    : Function properties for rms_norm\n\
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 18 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n";
    let u = &parse(log)["rms_norm"];
    assert_eq!(
        (u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads),
        (18, 128, 8, 4, 4)
    );
}
