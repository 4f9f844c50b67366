//! The `plan` command: the flags made into a model, devices and a workload for
//! `switchyard_planner`, and its answer printed as a ranked table or JSON.

use anyhow::{bail, Result};
use switchyard_model::quantize::Scheme;
use switchyard_planner::time::Efficiency;
use switchyard_planner::{candidates, rank, table, Catalog, Kind, Model, Workload};

use crate::flags::PlanArgs;

pub fn run(a: &PlanArgs) -> Result<()> {
    if a.prompt > a.context {
        bail!(
            "--prompt {}: expected at most --context ({})",
            a.prompt,
            a.context
        );
    }
    if let Some(t) = a.target_tps {
        if !(t.is_finite() && t > 0.0) {
            bail!("--target-tps {t}: expected a positive number of tokens per second");
        }
    }
    let catalog = Catalog::builtin();
    let hardware = a
        .hardware
        .iter()
        .map(|h| catalog.parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let schemes = a
        .dtype
        .iter()
        .map(|d| match Scheme::from_name(d) {
            Some(s) => Ok(s),
            None => bail!("--dtype {d:?}: expected one of {}", Scheme::NAMES),
        })
        .collect::<Result<Vec<_>>>()?;
    let models = match schemes.is_empty() {
        true => vec![Model::resolve(&a.model)?],
        false => schemes
            .iter()
            .map(|s| Ok(Model::resolve(&a.model)?.stored_as(*s)))
            .collect::<Result<Vec<_>>>()?,
    };
    let work = Workload {
        context: a.context,
        concurrency: a.concurrency,
        prompt: a.prompt,
        target_tps: a.target_tps,
        block_size: a.block_size,
        step_tokens: a.max_step_tokens,
    };
    let mut all = Vec::new();
    for model in &models {
        for hw in &hardware {
            all.extend(candidates(model, hw, &work));
        }
    }
    rank(&mut all);

    let model = &models[0];
    let p = model.config.param_counts();
    let kinds: Vec<Kind> = hardware.iter().map(|h| h.device.kind).collect();
    let efficiency = |k: Kind| Efficiency::default_for(k);
    let mut notes = vec![
        "efficiency factors are stated defaults, not calibrated on this hardware".to_string(),
        "decode speed at half the context on average; TTFT for one prompt on an idle lane; cost counts decode only".to_string(),
    ];
    let stored_quantized = models
        .iter()
        .any(|m| m.storage_name() != "bf16" && !m.storage_name().contains("(BF16)"));
    if kinds.contains(&Kind::Gpu) && stored_quantized {
        notes.push("GPU workers hold every weight in bf16 (the CUDA backend's one weight type), whatever --dtype says; CPU hosts keep the stored type".into());
    }
    if a.json {
        let json = serde_json::json!({
            "model": {
                "name": model.name,
                "origin": model.origin,
                "parameters": {"total": p.total, "active_per_token": p.active_per_token},
                "config": model.config,
            },
            "workload": {
                "context": a.context,
                "concurrency": a.concurrency,
                "prompt": a.prompt,
                "target_tps": a.target_tps,
                "block_size": a.block_size,
                "max_step_tokens": a.max_step_tokens,
            },
            "efficiency": {
                "calibrated": false,
                "gpu": efficiency(Kind::Gpu),
                "cpu": efficiency(Kind::Cpu),
            },
            "hardware": hardware,
            "notes": notes,
            "candidates": all,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let count = |n: u64| match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n => format!("{:.0}M", n as f64 / 1e6),
    };
    let origin = match model.origin == model.name {
        true => String::new(),
        false => format!(" ({})", model.origin),
    };
    println!(
        "model     {}{origin}: {} parameters, {} active per token",
        model.name,
        count(p.total),
        count(p.active_per_token)
    );
    println!(
        "workload  {} streams, {} tokens of context each, {}-token prompts{}",
        a.concurrency,
        a.context,
        a.prompt,
        a.target_tps
            .map_or(String::new(), |t| format!(", target {t} tok/s per stream"))
    );
    for k in [Kind::Gpu, Kind::Cpu] {
        if kinds.contains(&k) {
            let e = efficiency(k);
            println!(
                "speeds    {}: {:.0}% of memory bandwidth, {:.0}% of FLOP/s, {:.0} µs per call (defaults, not calibrated)",
                match k {
                    Kind::Gpu => "GPU",
                    Kind::Cpu => "CPU",
                },
                e.bandwidth * 100.0,
                e.compute * 100.0,
                e.call_s * 1e6
            );
        }
    }
    println!();
    print!("{}", table(&all, a.top));
    if let Some(best) = all.iter().find(|c| c.does_not_fit.is_none()) {
        println!();
        println!(
            "best: {} {} ({}), {} cop{} of: switchyard serve {}",
            best.hardware,
            best.grid,
            best.held_as,
            best.copies,
            if best.copies == 1 { "y" } else { "ies" },
            best.serve
        );
    }
    for n in &notes[1..] {
        println!("note: {n}");
    }
    Ok(())
}

/// How the planner sizes workers, against the worker's own constants.
#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_planner::memory::WorkerMemory;
    use switchyard_worker::backend::Backend;
    use switchyard_worker::CpuBackend;

    #[test]
    fn the_planner_s_workers_keep_memory_as_the_worker_does() {
        let cpu = WorkerMemory::of(Kind::Cpu);
        assert_eq!(cpu.value_bytes, <CpuBackend as Backend>::VALUE_BYTES);
        assert!(cpu.keeps_stored_weights);
        let gpu = WorkerMemory::of(Kind::Gpu);
        assert_eq!(
            gpu.value_bytes,
            <switchyard_worker::cuda::CudaBackend as Backend>::VALUE_BYTES
        );
        assert!(!gpu.keeps_stored_weights);
    }
}
