//! The hardware catalog (`planner/hardware.json`, compiled in) and `--hardware` specs: a
//! catalog name with a count (`8xA10G`), optionally with fields overridden (`8xA10G,price=1.5`),
//! or a device described whole (`mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::units::{parse_bytes, parse_flops, parse_price, parse_rate, UnitError};

/// The catalog shipped with the planner.
const BUILTIN: &str = include_str!("../hardware.json");

/// The most devices one spec may ask for.
pub const MAX_DEVICES: usize = 4096;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HardwareError {
    #[error("hardware catalog: {0}")]
    Catalog(String),
    #[error("--hardware {spec:?}: {problem}")]
    Spec { spec: String, problem: String },
    #[error("--hardware {spec:?}: {source}")]
    Unit {
        spec: String,
        #[source]
        source: UnitError,
    },
}

/// What runs the model's kernels, which decides how a worker keeps weights and KV (see
/// [`crate::memory::WorkerMemory::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Gpu,
    Cpu,
}

/// How devices talk to each other: bandwidth each way and the latency of one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    pub name: String,
    /// Bytes per second, each way.
    pub bandwidth: f64,
    pub latency_s: f64,
    pub source: String,
}

/// One device (a GPU, or a CPU host) as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub name: String,
    pub kind: Kind,
    pub memory_bytes: u64,
    /// Memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Dense bf16 tensor FLOP/s (a CPU host: its f32 FMA peak).
    pub flops: f64,
    pub link: Link,
    /// USD per device-hour; `None` when a custom spec gives none.
    pub price: Option<f64>,
    pub source: String,
    pub price_source: Option<String>,
}

/// `count` devices of one kind: one `--hardware` value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hardware {
    pub count: usize,
    pub device: Device,
}

impl fmt::Display for Hardware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.count, self.device.name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkRow {
    name: String,
    bandwidth: String,
    latency_us: f64,
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceRow {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    kind: Kind,
    memory: String,
    bandwidth: String,
    flops: String,
    link: String,
    price: f64,
    source: String,
    price_source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    /// The file's description, for people.
    #[serde(rename = "about")]
    _about: serde::de::IgnoredAny,
    links: Vec<LinkRow>,
    devices: Vec<DeviceRow>,
}

/// The devices and links `--hardware` can name.
#[derive(Debug, Clone)]
pub struct Catalog {
    links: Vec<Link>,
    /// Each device with the names it answers to (its own first).
    devices: Vec<(Vec<String>, Device)>,
}

const KEYS: &str = "mem, bw, flops, link, price, kind or name";

impl Catalog {
    /// The catalog compiled into the planner (`planner/hardware.json`).
    pub fn builtin() -> Catalog {
        Catalog::from_json(BUILTIN).expect("planner/hardware.json is checked by the unit tests")
    }

    /// A catalog in `hardware.json`'s format; every figure is checked as a spec's would be.
    pub fn from_json(text: &str) -> Result<Catalog, HardwareError> {
        let bad = HardwareError::Catalog;
        let file: CatalogFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut links = Vec::new();
        for l in file.links {
            let bandwidth = parse_rate("bandwidth", &l.bandwidth)
                .map_err(|e| bad(format!("link {}: {e}", l.name)))?;
            if !(l.latency_us.is_finite() && l.latency_us >= 0.0) {
                return Err(bad(format!("link {}: latency_us must be ≥ 0", l.name)));
            }
            links.push(Link {
                name: l.name,
                bandwidth,
                latency_s: l.latency_us * 1e-6,
                source: l.source,
            });
        }
        let mut catalog = Catalog {
            links,
            devices: Vec::new(),
        };
        for d in file.devices {
            let err = |e: UnitError| bad(format!("device {}: {e}", d.name));
            let link = catalog
                .link(&d.link)
                .ok_or_else(|| bad(format!("device {}: unknown link {:?}", d.name, d.link)))?
                .clone();
            let device = Device {
                name: d.name.clone(),
                kind: d.kind,
                memory_bytes: parse_bytes("memory", &d.memory).map_err(err)?,
                bandwidth: parse_rate("bandwidth", &d.bandwidth).map_err(err)?,
                flops: parse_flops("flops", &d.flops).map_err(err)?,
                link,
                price: Some(d.price),
                source: d.source,
                price_source: Some(d.price_source),
            };
            let mut names = vec![d.name];
            names.extend(d.aliases);
            for n in &names {
                if catalog.device(n).is_some() {
                    return Err(bad(format!("the name {n:?} is given twice")));
                }
            }
            catalog.devices.push((names, device));
        }
        Ok(catalog)
    }

    /// A device by name or alias, case-insensitively.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices
            .iter()
            .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)))
            .map(|(_, d)| d)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().map(|(_, d)| d)
    }

    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(name))
    }

    fn device_names(&self) -> String {
        self.devices()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn link_names(&self) -> String {
        self.links
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parses one `--hardware` value: `[N x] NAME {,key=value}` or `[N x] key=value {,key=value}`
    /// (keys: mem, bw, flops, link, price, kind, name; a device described whole needs mem, bw
    /// and flops).
    pub fn parse(&self, spec: &str) -> Result<Hardware, HardwareError> {
        let problem = |p: String| HardwareError::Spec {
            spec: spec.to_string(),
            problem: p,
        };
        let unit = |source: UnitError| HardwareError::Unit {
            spec: spec.to_string(),
            source,
        };
        if spec.trim().is_empty() {
            return Err(problem(format!(
                "empty; expected a catalog name with a count (e.g. 8xA10G) or a device described whole (e.g. mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2); catalog: {}",
                self.device_names()
            )));
        }
        let mut parts = spec.split(',').map(str::trim);
        let first = parts.next().unwrap_or_default();
        // `8xA10G`: a count before the first `x`, when all of it is digits.
        let (count, first) = match first.split_once(['x', 'X', '×']) {
            Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                let count = n
                    .parse::<usize>()
                    .ok()
                    .filter(|c| (1..=MAX_DEVICES).contains(c))
                    .ok_or_else(|| {
                        problem(format!(
                            "device count {n}: expected 1 to {MAX_DEVICES} (e.g. 8xA10G)"
                        ))
                    })?;
                (count, rest.trim())
            }
            _ => (1, first),
        };
        let mut fields: Vec<(&str, &str)> = Vec::new();
        let mut base = None;
        for (i, part) in std::iter::once(first).chain(parts).enumerate() {
            match part.split_once('=') {
                Some((k, v)) => {
                    let k = k.trim();
                    if fields.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(k)) {
                        return Err(problem(format!("{k}= is given twice")));
                    }
                    fields.push((k, v.trim()));
                }
                None if i == 0 && !part.is_empty() => {
                    base = Some(self.device(part).ok_or_else(|| {
                        problem(format!(
                            "unknown device {part:?}; expected one of {} (with a count, e.g. 8xA10G) or a device described whole, e.g. mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2",
                            self.device_names()
                        ))
                    })?);
                }
                None => {
                    return Err(problem(format!(
                        "{part:?} is not key=value; expected a device name first, then any of {KEYS} as key=value"
                    )))
                }
            }
        }
        let get = |key: &str, alias: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key) || k.eq_ignore_ascii_case(alias))
                .map(|(_, v)| *v)
        };
        for (k, _) in &fields {
            let known = [
                "mem",
                "memory",
                "bw",
                "bandwidth",
                "flops",
                "link",
                "price",
                "kind",
                "name",
            ];
            if !known.iter().any(|n| n.eq_ignore_ascii_case(k)) {
                return Err(problem(format!("unknown key {k:?}; expected {KEYS}")));
            }
        }
        let mut device = match base {
            Some(d) => d.clone(),
            None => {
                let missing: Vec<&str> = [("mem", "memory"), ("bw", "bandwidth"), ("flops", "")]
                    .into_iter()
                    .filter(|(k, a)| get(k, a).is_none())
                    .map(|(k, _)| k)
                    .collect();
                if !missing.is_empty() {
                    return Err(problem(format!(
                        "a device described whole needs mem=, bw= and flops= ({} missing); e.g. mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2, or a catalog name: {}",
                        missing.join(", "),
                        self.device_names()
                    )));
                }
                Device {
                    name: "custom".into(),
                    kind: Kind::Gpu,
                    memory_bytes: 0,
                    bandwidth: 0.0,
                    flops: 0.0,
                    link: self.link("pcie4").expect("the catalog has pcie4").clone(),
                    price: None,
                    source: format!("given on the command line: {spec}"),
                    price_source: None,
                }
            }
        };
        if let Some(v) = get("mem", "memory") {
            device.memory_bytes = parse_bytes("mem", v).map_err(unit)?;
        }
        if let Some(v) = get("bw", "bandwidth") {
            device.bandwidth = parse_rate("bw", v).map_err(unit)?;
        }
        if let Some(v) = get("flops", "") {
            device.flops = parse_flops("flops", v).map_err(unit)?;
        }
        if let Some(v) = get("link", "") {
            device.link = self
                .link(v)
                .ok_or_else(|| {
                    problem(format!(
                        "unknown link {v:?}; expected one of {}",
                        self.link_names()
                    ))
                })?
                .clone();
        }
        if let Some(v) = get("price", "") {
            device.price = Some(parse_price("price", v).map_err(unit)?);
            device.price_source = Some("given on the command line".into());
        }
        if let Some(v) = get("kind", "") {
            device.kind = match v.to_ascii_lowercase().as_str() {
                "gpu" => Kind::Gpu,
                "cpu" => Kind::Cpu,
                _ => return Err(problem(format!("kind {v:?}: expected gpu or cpu"))),
            };
        }
        if let Some(v) = get("name", "") {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(problem(format!(
                    "name {v:?}: expected a name without spaces"
                )));
            }
            device.name = v.to_string();
        }
        Ok(Hardware { count, device })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_covers_the_issue_s_devices_with_sources() {
        let c = Catalog::builtin();
        for name in [
            "A10G",
            "L4",
            "RTX4090",
            "A100-40GB",
            "A100-80GB",
            "H100",
            "H200",
            "cpu-2core",
            "epyc-64core",
        ] {
            let d = c.device(name).unwrap_or_else(|| panic!("{name}"));
            assert!(d.source.len() > 20, "{name}: {}", d.source);
            assert!(d.price.unwrap() > 0.0 && d.price_source.is_some(), "{name}");
        }
        let h100 = c.device("h100-sxm").unwrap();
        assert_eq!(h100.memory_bytes, 80_000_000_000);
        assert_eq!(h100.bandwidth, 3.35e12);
        assert_eq!(h100.flops, 989e12);
        assert_eq!(h100.link.name, "nvlink4");
        assert_eq!(c.device("A10G").unwrap().memory_bytes, 24_000_000_000);
        assert_eq!(c.device("4090").unwrap().name, "RTX4090");
        assert_eq!(c.device("epyc-64").unwrap().kind, Kind::Cpu);
    }

    #[test]
    fn specs_name_count_and_overrides() {
        let c = Catalog::builtin();
        let h = c.parse("8xA10G").unwrap();
        assert_eq!((h.count, h.device.name.as_str()), (8, "A10G"));
        assert_eq!(h.to_string(), "8xA10G");
        assert_eq!(c.parse("2XH100").unwrap().count, 2);
        assert_eq!(c.parse("H200").unwrap().count, 1);
        let h = c.parse("4xRTX4090, price=0.4").unwrap();
        assert_eq!(h.device.price, Some(0.4));
        assert_eq!(h.device.memory_bytes, 24_000_000_000);
        let h = c
            .parse("mem=24GiB,bw=600GB/s,flops=125T,link=pcie4,price=1.2")
            .unwrap();
        assert_eq!(h.count, 1);
        assert_eq!(h.device.memory_bytes, 24 << 30);
        assert_eq!(h.device.bandwidth, 600e9);
        assert_eq!(h.device.flops, 125e12);
        assert_eq!(h.device.price, Some(1.2));
        assert_eq!(h.device.kind, Kind::Gpu);
        let h = c
            .parse("2xmem=64GiB,bw=50GB/s,flops=1T,kind=cpu,name=box")
            .unwrap();
        assert_eq!((h.count, h.device.kind), (2, Kind::Cpu));
        assert_eq!(h.to_string(), "2xbox");
        assert_eq!(h.device.price, None);
    }

    #[test]
    fn bad_specs_say_what_was_wrong_and_what_was_expected() {
        let c = Catalog::builtin();
        let e = |s: &str| c.parse(s).unwrap_err().to_string();
        assert!(e("8xB200").contains("unknown device \"B200\"; expected one of A10G"));
        assert!(e("0xA10G").contains("device count 0: expected 1 to 4096"));
        assert!(e("mem=24GiB,bw=600GB/s").contains("(flops missing)"));
        assert!(e("mem=24GiB,flops=1T").contains("(bw missing)"));
        assert!(e("A10G,mem=lots").contains("mem \"lots\": expected a number with a unit"));
        assert!(e("A10G,bw=600GB").contains("expected bytes per second"));
        assert!(e("A10G,link=carrier-pigeon")
            .contains("unknown link \"carrier-pigeon\"; expected one of nvlink4"));
        assert!(e("A10G,colour=red").contains("unknown key \"colour\""));
        assert!(e("A10G,price=1,price=2").contains("price= is given twice"));
        assert!(e("A10G,H100").contains("is not key=value"));
        assert!(e("A10G,kind=tpu").contains("expected gpu or cpu"));
        assert!(e("").contains("empty; expected a catalog name"));
    }

    #[test]
    fn a_broken_catalog_is_refused() {
        let e = Catalog::from_json(r#"{"about": "", "links": [], "devices": [{"name": "X", "kind": "gpu", "memory": "1GB", "bandwidth": "1GB/s", "flops": "1T", "link": "none", "price": 1, "source": "", "price_source": ""}]}"#).unwrap_err();
        assert!(e.to_string().contains("unknown link \"none\""), "{e}");
        assert!(Catalog::from_json("{").is_err());
    }
}
