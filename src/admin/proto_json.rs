//! Protobuf messages as Envoy's admin prints them: proto3 JSON with the `.proto` field
//! names (`filter_chains`, not `filterChains`), `Any` expanded with its `@type`, and the
//! well-known types in their JSON forms (`"10s"`, RFC 3339 times, wrappers as bare
//! values). This is what `istioctl proxy-config … --file` reads.
//!
//! The schemas are a descriptor set compiled from the `.proto` files of Envoy's API
//! (as `envoy-types` ships them) and of the two Istio extensions istiod configures on a
//! gateway (`istio.stats`, `istio.metadata_exchange`); `tests/descriptors.rs` rebuilds it
//! and fails when the file in the tree differs. A message of a type outside the set (an
//! extension strait has no schema for) is shown by its `@type` alone.

use std::sync::LazyLock;

use base64::Engine;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use serde_json::{Map, Value as Json, json};

/// The compiled schemas (`FileDescriptorSet`, without source comments).
pub const DESCRIPTORS: &[u8] = include_bytes!("envoy.pb");

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    // The set is compiled by protox from the files in the tree and checked by
    // tests/descriptors.rs, so decoding it cannot fail; an empty pool would only make
    // every message show as its `@type`.
    DescriptorPool::decode(DESCRIPTORS).unwrap_or_else(|e| {
        tracing::error!("the built-in protobuf descriptors do not decode: {e}");
        DescriptorPool::new()
    })
});

const TYPE_PREFIX: &str = "type.googleapis.com/";

/// `Any`'s JSON form for a message of `type_url` encoded as `value`.
pub fn any(type_url: &str, value: &[u8]) -> Json {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let mut out = Map::new();
    out.insert("@type".into(), Json::String(type_url.to_string()));
    let Some(desc) = POOL.get_message_by_name(name) else {
        return Json::Object(out);
    };
    let Ok(msg) = DynamicMessage::decode(desc.clone(), value) else {
        out.insert(
            "@error".into(),
            Json::String(format!(
                "{} bytes that do not decode as {name}",
                value.len()
            )),
        );
        return Json::Object(out);
    };
    match message(&msg) {
        // A well-known type's JSON is not an object: it goes under `value`.
        Json::Object(fields) if !is_well_known(desc.full_name()) => out.extend(fields),
        other => {
            out.insert("value".into(), other);
        }
    }
    Json::Object(out)
}

/// A message encoded as the Envoy or Istio type `name`'s JSON, `@type` included.
pub fn typed(name: &str, value: &[u8]) -> Json {
    any(&format!("{TYPE_PREFIX}{name}"), value)
}

/// A prost message (from `envoy-types`) as its `Any` JSON.
pub fn of<M: prost::Name>(msg: &M) -> Json {
    typed(&M::full_name(), &msg.encode_to_vec())
}

fn is_well_known(name: &str) -> bool {
    name.starts_with("google.protobuf.") && name != "google.protobuf.Empty"
}

fn message(msg: &DynamicMessage) -> Json {
    let desc = msg.descriptor();
    if let Some(j) = well_known(&desc, msg) {
        return j;
    }
    let mut out = Map::new();
    for (field, value) in msg.fields() {
        let kind = field.kind();
        let j = if field.is_map() {
            let value_kind = match &kind {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other.clone(),
            };
            match value {
                Value::Map(m) => {
                    let mut entries: Vec<_> = m.iter().collect();
                    entries.sort_by_key(|(k, _)| map_key(k));
                    Json::Object(
                        entries
                            .into_iter()
                            .map(|(k, v)| (map_key(k), scalar(&value_kind, v)))
                            .collect(),
                    )
                }
                other => scalar(&value_kind, other),
            }
        } else {
            match value {
                Value::List(items) => Json::Array(items.iter().map(|v| scalar(&kind, v)).collect()),
                other => scalar(&kind, other),
            }
        };
        out.insert(field.name().to_string(), j);
    }
    Json::Object(out)
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

fn scalar(kind: &Kind, v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::I32(n) => json!(n),
        Value::U32(n) => json!(n),
        // proto3 JSON writes 64-bit integers as strings.
        Value::I64(n) => Json::String(n.to_string()),
        Value::U64(n) => Json::String(n.to_string()),
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => Json::String(s.clone()),
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::EnumNumber(n) => match kind {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or_else(|| json!(n), |v| Json::String(v.name().to_string())),
            _ => json!(n),
        },
        Value::Message(m) => message(m),
        Value::List(items) => Json::Array(items.iter().map(|v| scalar(kind, v)).collect()),
        Value::Map(_) => Json::Null,
    }
}

fn float(f: f64) -> Json {
    if f.is_nan() {
        Json::String("NaN".into())
    } else if f.is_infinite() {
        Json::String(if f > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        json!(f)
    }
}

/// The JSON forms of the well-known types Envoy's API uses.
fn well_known(desc: &MessageDescriptor, msg: &DynamicMessage) -> Option<Json> {
    let get = |name: &str| msg.get_field_by_name(name).map(|v| v.into_owned());
    let int = |name: &str| match get(name) {
        Some(Value::I64(n)) => n,
        Some(Value::I32(n)) => i64::from(n),
        _ => 0,
    };
    Some(match desc.full_name() {
        "google.protobuf.Any" => {
            let url = match get("type_url") {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            let value = match get("value") {
                Some(Value::Bytes(b)) => b.to_vec(),
                _ => Vec::new(),
            };
            any(&url, &value)
        }
        "google.protobuf.Duration" => Json::String(duration(int("seconds"), int("nanos"))),
        "google.protobuf.Timestamp" => {
            let t = time::OffsetDateTime::from_unix_timestamp(int("seconds"))
                .ok()
                .and_then(|t| {
                    t.replace_nanosecond(int("nanos").clamp(0, 999_999_999) as u32)
                        .ok()
                });
            Json::String(t.map(rfc3339).unwrap_or_default())
        }
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let field = desc.get_field_by_name("value")?;
            scalar(&field.kind(), &msg.get_field(&field))
        }
        "google.protobuf.Struct" => match get("fields") {
            Some(Value::Map(m)) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by_key(|(k, _)| map_key(k));
                Json::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (map_key(k), scalar(&Kind::Bool, v)))
                        .collect(),
                )
            }
            _ => Json::Object(Map::new()),
        },
        "google.protobuf.ListValue" => match get("values") {
            Some(Value::List(items)) => {
                Json::Array(items.iter().map(|v| scalar(&Kind::Bool, v)).collect())
            }
            _ => Json::Array(Vec::new()),
        },
        "google.protobuf.Value" => {
            let Some((field, value)) = msg.fields().next() else {
                return Some(Json::Null);
            };
            match (field.name(), value) {
                ("null_value", _) => Json::Null,
                (_, v) => scalar(&field.kind(), v),
            }
        }
        _ => return None,
    })
}

/// A duration as proto3 JSON writes it: seconds with 0, 3, 6 or 9 fractional digits.
fn duration(seconds: i64, nanos: i64) -> String {
    let sign = if seconds < 0 || nanos < 0 { "-" } else { "" };
    let (s, n) = (seconds.unsigned_abs(), nanos.unsigned_abs());
    if n == 0 {
        format!("{sign}{s}s")
    } else if n % 1_000_000 == 0 {
        format!("{sign}{s}.{:03}s", n / 1_000_000)
    } else if n % 1_000 == 0 {
        format!("{sign}{s}.{:06}s", n / 1_000)
    } else {
        format!("{sign}{s}.{n:09}s")
    }
}

/// RFC 3339 in UTC, as Envoy writes `last_updated`.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
    use envoy_types::pb::google::protobuf::{Duration, UInt32Value};

    #[test]
    fn a_cluster_reads_as_envoy_prints_it() {
        let c = Cluster {
            name: "outbound_.9080_._.reviews.default.svc.cluster.local".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            )),
            connect_timeout: Some(Duration {
                seconds: 10,
                nanos: 0,
            }),
            per_connection_buffer_limit_bytes: Some(UInt32Value { value: 32768 }),
            ..Default::default()
        };
        let j = of(&c);
        assert_eq!(
            j["@type"],
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
        assert_eq!(j["name"], c.name);
        assert_eq!(j["type"], "EDS");
        assert_eq!(j["connect_timeout"], "10s");
        assert_eq!(j["per_connection_buffer_limit_bytes"], 32768);
    }

    #[test]
    fn durations_keep_protojson_precision() {
        assert_eq!(duration(1, 500_000_000), "1.500s");
        assert_eq!(duration(0, 1_000), "0.000001s");
        assert_eq!(duration(0, 1), "0.000000001s");
        assert_eq!(duration(3600, 0), "3600s");
    }

    #[test]
    fn an_unknown_type_shows_its_type_alone() {
        let j = any("type.googleapis.com/example.Unknown", b"\x08\x01");
        assert_eq!(j, json!({"@type": "type.googleapis.com/example.Unknown"}));
    }
}
