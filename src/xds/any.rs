//! A `google.protobuf.Any` read as the message its type URL names, for every xDS
//! resource and typed filter config.

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

pub(super) fn decode<M: Message + Default>(any: &Any, want: &str) -> Result<M, String> {
    if any.type_url != want {
        return Err(format!("type {} where {want} was expected", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"))
}
