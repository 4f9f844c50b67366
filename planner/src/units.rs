//! Quantities as people write them: `24GiB`, `600GB/s`, `125T`, `1.2`. Decimal prefixes are
//! powers of 1000 (GB, T), binary ones powers of 1024 (GiB), as datasheets use them.

/// A quantity that did not parse: what was given and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} {given:?}: expected {expected}")]
pub struct UnitError {
    pub what: &'static str,
    pub given: String,
    pub expected: &'static str,
}

const BYTES: &str = "a number with a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 24GiB or 80GB";
const RATE: &str = "bytes per second: a number with a byte unit and /s, e.g. 600GB/s or 3.35TB/s";
const FLOPS: &str =
    "FLOP/s: a number with G, T or P (powers of 1000), optionally followed by FLOPS, e.g. 125T";
const PRICE: &str = "a price per device-hour in USD, e.g. 1.2 or $1.20";

/// Splits `"24GiB"` into `(24.0, "GiB")`; the number must be finite and not negative.
fn number_and_unit(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let value: f64 = s[..end].parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value, s[end..].trim()))
}

fn byte_unit(unit: &str) -> Option<f64> {
    let k = 1000f64;
    let ki = 1024f64;
    Some(match unit.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => k,
        "mb" => k * k,
        "gb" => k * k * k,
        "tb" => k * k * k * k,
        "kib" => ki,
        "mib" => ki * ki,
        "gib" => ki * ki * ki,
        "tib" => ki * ki * ki * ki,
        _ => return None,
    })
}

/// `24GiB`, `80GB`: a count of bytes.
pub fn parse_bytes(what: &'static str, s: &str) -> Result<u64, UnitError> {
    let err = || UnitError {
        what,
        given: s.to_string(),
        expected: BYTES,
    };
    let (n, unit) = number_and_unit(s).ok_or_else(err)?;
    let scale = byte_unit(unit).ok_or_else(err)?;
    let bytes = n * scale;
    if bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// `600GB/s`: bytes per second.
pub fn parse_rate(what: &'static str, s: &str) -> Result<f64, UnitError> {
    let err = || UnitError {
        what,
        given: s.to_string(),
        expected: RATE,
    };
    let (n, unit) = number_and_unit(s).ok_or_else(err)?;
    let unit = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("ps"))
        .ok_or_else(err)?;
    let rate = n * byte_unit(unit).ok_or_else(err)?;
    if rate <= 0.0 {
        return Err(err());
    }
    Ok(rate)
}

/// `125T`, `166G`, `1.98PFLOPS`: floating-point operations per second.
pub fn parse_flops(what: &'static str, s: &str) -> Result<f64, UnitError> {
    let err = || UnitError {
        what,
        given: s.to_string(),
        expected: FLOPS,
    };
    let (n, unit) = number_and_unit(s).ok_or_else(err)?;
    let lower = unit.to_ascii_lowercase();
    let prefix = ["flop/s", "flops", "flop"]
        .iter()
        .find_map(|suffix| lower.strip_suffix(suffix))
        .unwrap_or(&lower);
    let scale = match prefix {
        "g" => 1e9,
        "t" => 1e12,
        "p" => 1e15,
        _ => return Err(err()),
    };
    if n <= 0.0 {
        return Err(err());
    }
    Ok(n * scale)
}

/// `1.2`, `$1.20`: USD per device-hour.
pub fn parse_price(what: &'static str, s: &str) -> Result<f64, UnitError> {
    let err = || UnitError {
        what,
        given: s.to_string(),
        expected: PRICE,
    };
    let t = s.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    let (n, rest) = number_and_unit(t).ok_or_else(err)?;
    if !rest.is_empty() {
        return Err(err());
    }
    Ok(n)
}

/// Bytes as people read them: `93.4 GB`, `512 MiB` (decimal above a GB, binary below, so small
/// numbers stay exact in the units the flags take).
pub fn show_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_in_both_systems() {
        assert_eq!(parse_bytes("mem", "24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("mem", "80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("mem", "141 GB").unwrap(), 141_000_000_000);
        assert_eq!(parse_bytes("mem", "1.5TiB").unwrap(), 3 << 39);
        let e = parse_bytes("mem", "24").unwrap_err();
        assert_eq!(e.given, "24");
        assert!(
            e.to_string().contains("expected a number with a unit"),
            "{e}"
        );
        assert!(parse_bytes("mem", "24GiBs").is_err());
        assert!(parse_bytes("mem", "-1GB").is_err());
        assert!(parse_bytes("mem", "").is_err());
    }

    #[test]
    fn rates_flops_and_prices() {
        assert_eq!(parse_rate("bw", "600GB/s").unwrap(), 600e9);
        assert!((parse_rate("bw", "3.35TB/s").unwrap() / 3.35e12 - 1.0).abs() < 1e-12);
        assert!(parse_rate("bw", "600GB")
            .unwrap_err()
            .to_string()
            .contains("/s"));
        assert_eq!(parse_flops("flops", "125T").unwrap(), 125e12);
        assert_eq!(parse_flops("flops", "166GFLOPS").unwrap(), 166e9);
        assert!((parse_flops("flops", "1.98P").unwrap() / 1.98e15 - 1.0).abs() < 1e-12);
        assert!(parse_flops("flops", "125").is_err());
        assert!(parse_flops("flops", "0T").is_err());
        assert_eq!(parse_price("price", "$1.20").unwrap(), 1.2);
        assert_eq!(parse_price("price", "0").unwrap(), 0.0);
        assert!(parse_price("price", "1.2/h").is_err());
        assert!(parse_price("price", "cheap").is_err());
    }
}
