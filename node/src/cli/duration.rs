//! Durations on the command line: a number with a unit (`500ms`, `1s`, `2m`,
//! `12h`, `30d`), or a bare number of milliseconds as the flags always took.

/// Units and their length in ms (an exact match: `m` is minutes, `ms` milliseconds).
const UNITS: [(&str, u64); 7] = [
    ("", 1),
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("min", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// A century is surely a typo.
const MAX_MS: u64 = 100 * 365 * 86_400_000;

fn parse(s: &str, allow_zero: bool) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a number with a unit, e.g. 500ms, 1s, 2m, 12h, 30d"))?;
    let unit = unit.trim();
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, m)| *m)
        .ok_or_else(|| format!("`{unit}`: unknown unit; use ms, s, m, h or d (a bare number is ms)"))?;
    let ms = n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too long"))?;
    if (ms == 0 && !allow_zero) || ms > MAX_MS {
        let low = if allow_zero { "at least 0" } else { "more than 0" };
        return Err(format!("`{s}`: must be {low} and at most 100 years"));
    }
    Ok(ms)
}

/// A positive duration in ms: `30d`, `12h`, `90m`, `45s`, `500ms`, or bare ms.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    parse(s, false)
}

/// As [`parse_duration_ms`], but zero is allowed (e.g. "no added latency").
pub(crate) fn parse_duration_ms_or_zero(s: &str) -> Result<u64, String> {
    parse(s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        assert_eq!(parse_duration_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_duration_ms("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_duration_ms("90m"), Ok(90 * 60_000));
        assert_eq!(parse_duration_ms("2min"), Ok(120_000));
        assert_eq!(parse_duration_ms("45s"), Ok(45_000));
        assert_eq!(parse_duration_ms("1s"), Ok(1_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms(" 250 ms "), Ok(250));
        assert_eq!(parse_duration_ms("1500"), Ok(1500));
        for bad in [
            "",
            "d",
            "0",
            "0d",
            "30x",
            "-5d",
            "1.5d",
            "36501d",
            "99999999999999999999",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration_ms_or_zero("0"), Ok(0));
        assert_eq!(parse_duration_ms_or_zero("0ms"), Ok(0));
        assert!(parse_duration_ms_or_zero("-1").is_err());
    }
}
