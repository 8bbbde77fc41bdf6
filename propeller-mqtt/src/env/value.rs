//! Parsers for the scalar values in the env contract. Each returns the problem in
//! words, with the accepted forms, for the caller to wrap with the variable name.

use std::time::Duration;

use rumqttc::QoS;

/// Parses a Go-style duration (`30s`, `500ms`, `1m30s`, `1.5h`) or bare seconds (`30`).
///
/// Upstream's Go services write `30s` and its old Rust proplet read bare integers;
/// operators have both in their `.env`, so both must work.
pub fn duration(text: &str) -> Result<Duration, String> {
    const FORMS: &str = "write a duration such as 30s, 500ms, 1m or bare seconds such as 30";
    let text = text.trim();
    if text.is_empty() {
        return Err(FORMS.to_owned());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let unit_len = rest[number_len..]
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len() - number_len);
        let (number, unit) = (
            &rest[..number_len],
            &rest[number_len..number_len + unit_len],
        );
        let value: f64 = number.parse().map_err(|_| FORMS.to_owned())?;
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit {unit:?}; {FORMS}")),
        };
        total += value * seconds_per_unit;
        rest = &rest[number_len + unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| FORMS.to_owned())
}

/// A [`duration`] that must be more than zero: timeouts and intervals.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        d if d.is_zero() => Err("it must be more than zero, such as 10s or 500ms".to_owned()),
        d => Ok(d),
    }
}

/// Parses an MQTT quality of service level.
pub fn qos(text: &str) -> Result<QoS, String> {
    match text.trim() {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err("QoS must be 0, 1 or 2".to_owned()),
    }
}

/// Parses a size in bytes: `1048576`, or with a unit, `512KiB`, `10MiB`, `1MB`.
pub fn byte_size(text: &str) -> Result<usize, String> {
    const FORMS: &str = "write a number of bytes such as 10485760, or 512KiB, 10MiB";
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number: usize = text[..digits].parse().map_err(|_| FORMS.to_owned())?;
    let multiplier = match text[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        unit => return Err(format!("unknown unit {unit:?}; {FORMS}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| FORMS.to_owned())
}

/// Parses a boolean the way Go's `strconv.ParseBool` does, which upstream uses.
pub fn boolean(text: &str) -> Result<bool, String> {
    match text.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("write true or false".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_go_and_bare_forms() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration(" 10s "), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn bad_durations_say_which_forms_work() {
        for bad in ["", "s", "30x", "-1s", "1..5s", "thirty", "1e400s", "ms30"] {
            let problem = duration(bad).unwrap_err();
            assert!(problem.contains("30s"), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn qos_levels() {
        assert_eq!(qos("0"), Ok(QoS::AtMostOnce));
        assert_eq!(qos("2"), Ok(QoS::ExactlyOnce));
        assert!(qos("3").is_err());
        assert!(qos("-1").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(byte_size("1024"), Ok(1024));
        assert_eq!(byte_size("10MiB"), Ok(10 << 20));
        assert_eq!(byte_size("1 MB"), Ok(1_000_000));
        assert!(byte_size("ten").is_err());
        assert!(byte_size("99999999999999999999").is_err());
        assert!(byte_size("1GiB").is_err());
    }
}
