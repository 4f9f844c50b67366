//! CI without a GPU: every kernel module is compiled by NVRTC to PTX for sm_80 (A100) and sm_90
//! (H100), at every model shape `Spec::new` accepts, and assembled by `ptxas -v` (which also
//! refuses more than 48 KB of static shared memory). The test fails on any
//! compile error, any register spill or any local-memory (stack) use, and prints registers and
//! shared memory per kernel.
//!
//! NVRTC (`libnvrtc`, with `libnvrtc-builtins` beside it) must be on the library path and
//! `ptxas` on `PATH` (or in `$PTXAS`): `scripts/cuda-toolchain.sh` installs both from PyPI.
//! Without them this test FAILS rather than skips, so CI cannot go green without checking the
//! kernels.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard_kernels::{Module, Nvrtc, Spec, Target};

const ARCHS: [u32; 2] = [80, 90];

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

/// Each kernel's figures from one run, or why the module failed to compile or assemble.
type Report = Result<BTreeMap<String, Usage>, String>;

/// One NVRTC + `ptxas -v` run: a module at one architecture and one set of `-D`s.
struct Job {
    arch: u32,
    module: Module,
    spec: Spec,
}

impl Job {
    fn shape(&self) -> String {
        match self.module.defines(&self.spec).is_empty() {
            true => "-".to_string(),
            false => format!("d={} group={}", self.spec.head_dim, self.spec.group),
        }
    }

    fn run(&self, nvrtc: &Nvrtc, ptxas: &Path, dir: &Path) -> Report {
        let (arch, module) = (self.arch, self.module);
        let ptx = nvrtc
            .compile(
                module.file_name(),
                &module.source(),
                &module.defines(&self.spec),
                Target::Ptx(arch),
            )
            .map_err(|e| e.to_string())?;
        let stem = format!("{module}-{arch}-{}-{}", self.spec.head_dim, self.spec.group);
        let path = dir.join(format!("{stem}.ptx"));
        std::fs::write(&path, &ptx).unwrap();
        let out = Command::new(ptxas)
            .arg(format!("-arch=sm_{arch}"))
            .arg("-v")
            .arg("-o")
            .arg(dir.join(format!("{stem}.cubin")))
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.display()));
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match out.status.success() {
            true => Ok(parse(&log)),
            false => Err(format!("ptxas failed:\n{log}")),
        }
    }
}

/// Every module at every architecture, the shape-dependent ones at every shape `Spec::new`
/// accepts (a module compiled once per distinct set of `-D`s): whatever a worker may be asked
/// to compile is compiled here.
fn jobs() -> Vec<Job> {
    let mut jobs = Vec::new();
    for arch in ARCHS {
        for module in Module::ALL {
            let mut seen = HashSet::new();
            for spec in Spec::all() {
                if seen.insert(module.defines(&spec)) {
                    jobs.push(Job { arch, module, spec });
                }
            }
        }
    }
    jobs
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let nvrtc = Nvrtc::load().unwrap_or_else(|e| {
        panic!("{e}\nRun `source scripts/cuda-toolchain.sh` or scripts/test.sh.")
    });
    let ptxas = ptxas();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "NVRTC {}.{}; ptxas {}",
        nvrtc.version().0,
        nvrtc.version().1,
        ptxas.display()
    );
    let jobs = jobs();
    // The runs are independent processes and compilations: one per core.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Report)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break done };
                        done.push((i, job.run(&nvrtc, &ptxas, dir.path())));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);

    println!(
        "{:<7} {:<26} {:<24} {:>5} {:>7} {:>6} {:>7}",
        "arch", "kernel", "shape", "regs", "smem B", "stack", "spills"
    );
    let mut failures = Vec::new();
    for (i, result) in results {
        let job = &jobs[i];
        let (arch, module, shape) = (job.arch, job.module, job.shape());
        let usage = match result {
            Ok(u) => u,
            Err(e) => {
                failures.push(format!("sm_{arch} {module} {shape}: {e}"));
                continue;
            }
        };
        for kernel in module.kernels() {
            let Some(u) = usage.get(*kernel) else {
                failures.push(format!("sm_{arch} {module}: no ptxas report for {kernel}"));
                continue;
            };
            println!(
                "sm_{:<4} {:<26} {:<24} {:>5} {:>7} {:>6} {:>3}/{:<3}",
                arch, kernel, shape, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
            );
            if u.stack > 0 || u.spill_stores > 0 || u.spill_loads > 0 {
                failures.push(format!(
                    "sm_{arch} {kernel} {shape}: {} bytes stack, {} / {} bytes spilled",
                    u.stack, u.spill_stores, u.spill_loads
                ));
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
