//! The files' shapes as serde reads them: strict (`deny_unknown_fields`, duplicate keys
//! refused) and still unvalidated in context.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::size::Size;

use super::spec::{DesiredState, ReplacePolicy};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub cluster: String,
    pub hosts: StrictMap<RawHost>,
    #[serde(default)]
    pub policies: RawPolicies,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub beanstalkd: String,
    #[serde(default)]
    pub next: Option<String>,
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Size,
    pub storage: Size,
    pub vms: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicies {
    pub reconcile_interval: Option<Seconds>,
    pub prune_guard: Option<f64>,
    pub hop_limit: Option<u32>,
    pub ttr: Option<Seconds>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub cpu: u32,
    pub memory: Size,
    pub disk: Size,
    pub swap: Size,
    pub template: String,
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVm {
    pub name: String,
    pub profile: String,
    #[serde(default)]
    pub cpu: Option<u32>,
    #[serde(default)]
    pub memory: Option<Size>,
    #[serde(default)]
    pub disk: Option<Size>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub start_at: Option<String>,
    #[serde(default)]
    pub every_host: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub state: DesiredState,
    #[serde(default)]
    pub protect: bool,
    #[serde(default)]
    pub replace: ReplacePolicy,
    #[serde(default)]
    pub config: StrictMap<Scalar>,
    #[serde(default)]
    pub hooks: StrictMap<Scalar>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// A mapping that keeps its order and refuses a key seen twice (serde's own maps keep
/// the last value silently, which would hide a mistake).
#[derive(Debug)]
pub(crate) struct StrictMap<V>(pub Vec<(String, V)>);

impl<V> Default for StrictMap<V> {
    fn default() -> Self {
        StrictMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for StrictMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = StrictMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(StrictMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(de::Error::custom(format_args!("duplicate key `{k}`")));
                    }
                    let v = m.next_value()?;
                    out.push((k, v));
                }
                Ok(StrictMap(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

/// A scalar of any YAML type, kept as text: vm-bhyve config values and hook options are
/// strings in the end, and `cpu_sockets: 2` should not need quotes.
#[derive(Debug, Clone)]
pub(crate) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `90`, `90s`, `250ms`, `5m`, `1h` or `2d`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seconds(pub Duration);

/// Parses a duration written as `90`, `90s`, `250ms`, `5m`, `1h` or `2d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(d) = parse_short(s) {
        return Some(d);
    }
    // As operators write them elsewhere: `1h30m`, `1h 30m`, `2days`. A sign or a
    // fraction is refused by humantime too.
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        humantime::parse_duration(s).ok()
    } else {
        None
    }
}

/// The forms accepted first: plain seconds, or one number with `ms`, `s`, `m`, `h`, `d`.
fn parse_short(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return ms.parse().ok().map(Duration::from_millis);
    }
    let (digits, mult) = match s.as_bytes().last()? {
        b's' => (&s[..s.len() - 1], 1),
        b'm' => (&s[..s.len() - 1], 60),
        b'h' => (&s[..s.len() - 1], 3600),
        b'd' => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(mult).map(Duration::from_secs)
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30s, 5m or 1h")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).ok_or_else(|| {
                    E::custom(format_args!(
                        "`{v}` is not a duration (expected e.g. 90, 30s, 5m, 1h30m or 2d)"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(Duration::from_secs(v)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("-1s"), None);
    }

    /// Guards issue 15, conventions (durations as operators write them): `1h30m` was
    /// refused. The same parser serves cluster.yaml, agent.yaml and the CLI's flags.
    #[test]
    fn durations_as_operators_write_them() {
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2m30s"), Some(Duration::from_secs(150)));
        assert_eq!(parse_duration("1s500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2days"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("soon"), None);
    }
}
