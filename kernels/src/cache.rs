//! The on-disk cache of compiled kernels. A compiled module is stored under a key hashing
//! everything that determines its bytes — the source text, the options (with the model-shape
//! `-D`s), the target architecture and the NVRTC version — so an edit to a kernel, a new model
//! shape or a new GPU each compile once and every later start loads the file.

use std::path::{Path, PathBuf};

use crate::compile::{Nvrtc, Target};
use crate::source::{Module, Spec};
use crate::KernelError;

/// FNV-1a, 64 bits: stable across Rust versions and platforms (unlike `DefaultHasher`), which
/// a key written to disk needs.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a compiled module is stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub module: Module,
    pub target: Target,
    pub hash: u64,
}

impl CacheKey {
    pub fn new(
        module: Module,
        source: &str,
        options: &[String],
        target: Target,
        nvrtc: (i32, i32),
    ) -> Self {
        let version = format!("nvrtc {}.{}", nvrtc.0, nvrtc.1);
        let target_s = format!("{target:?}");
        let opts = options.join("\u{1f}");
        let hash = fnv1a(&[
            source.as_bytes(),
            opts.as_bytes(),
            target_s.as_bytes(),
            version.as_bytes(),
        ]);
        CacheKey {
            module,
            target,
            hash,
        }
    }

    /// File name: readable prefix, then the hash.
    pub fn file_name(&self) -> String {
        let stem = self.module.file_name().trim_end_matches(".cu");
        match self.target {
            Target::Ptx(a) => format!("{stem}-compute_{a}-{:016x}.ptx", self.hash),
            Target::Cubin(a) => format!("{stem}-sm_{a}-{:016x}.cubin", self.hash),
        }
    }
}

/// A directory of compiled modules.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskCache { dir: dir.into() }
    }

    /// `$SWITCHYARD_KERNEL_CACHE`, else `$XDG_CACHE_HOME/switchyard/kernels`, else
    /// `~/.cache/switchyard/kernels`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("SWITCHYARD_KERNEL_CACHE") {
            return PathBuf::from(d);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("switchyard").join("kernels")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(key.file_name())).ok()
    }

    /// Stores `bytes` atomically (write to a temporary name, then rename), so a reader in
    /// another process never sees half a file.
    pub fn put(&self, key: &CacheKey, bytes: &[u8]) -> Result<(), KernelError> {
        let io = |e: std::io::Error| KernelError::Cache(format!("{}: {e}", self.dir.display()));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self
            .dir
            .join(format!(".{}.{}", key.file_name(), std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(key.file_name())).map_err(io)
    }

    /// The compiled module for `spec` and `target`, from the cache or compiled now (and stored;
    /// a cache that cannot be written only costs the next start a compilation).
    pub fn compile(
        &self,
        nvrtc: &Nvrtc,
        module: Module,
        spec: &Spec,
        target: Target,
    ) -> Result<Vec<u8>, KernelError> {
        let source = module.source();
        let options = module.defines(spec);
        let key = CacheKey::new(module, &source, &options, target, nvrtc.version());
        if let Some(bytes) = self.get(&key) {
            return Ok(bytes);
        }
        let bytes = nvrtc.compile(module.file_name(), &source, &options, target)?;
        if let Err(e) = self.put(&key, &bytes) {
            tracing::warn!("kernel cache not written: {e}");
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str, opts: &[&str], target: Target, v: (i32, i32)) -> CacheKey {
        let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        CacheKey::new(Module::Moe, src, &opts, target, v)
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = key("a", &["-DX=1"], Target::Cubin(90), (13, 0));
        assert_eq!(base, key("a", &["-DX=1"], Target::Cubin(90), (13, 0)));
        for other in [
            key("b", &["-DX=1"], Target::Cubin(90), (13, 0)),
            key("a", &["-DX=2"], Target::Cubin(90), (13, 0)),
            key("a", &["-DX=1"], Target::Cubin(80), (13, 0)),
            key("a", &["-DX=1"], Target::Ptx(90), (13, 0)),
            key("a", &["-DX=1"], Target::Cubin(90), (12, 8)),
            key("a", &[], Target::Cubin(90), (13, 0)),
        ] {
            assert_ne!(base.hash, other.hash, "{other:?}");
        }
        // Concatenation is not ambiguous.
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn file_names_say_what_they_hold() {
        let k = key("a", &[], Target::Cubin(90), (13, 0));
        assert!(k.file_name().starts_with("moe-sm_90-"), "{}", k.file_name());
        assert!(k.file_name().ends_with(".cubin"));
        let k = key("a", &[], Target::Ptx(80), (13, 0));
        assert!(k.file_name().starts_with("moe-compute_80-"));
    }

    #[test]
    fn put_then_get_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().join("nested"));
        let k = key("src", &[], Target::Cubin(80), (13, 0));
        assert_eq!(cache.get(&k), None);
        cache.put(&k, b"\x7fELF bytes").unwrap();
        assert_eq!(cache.get(&k).as_deref(), Some(&b"\x7fELF bytes"[..]));
        // Nothing but the entry itself is left behind.
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
