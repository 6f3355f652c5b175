//! Which field of a JSON object keeps it from reading as a type. serde names the field of an
//! error through `serde_path_to_error`, except for fields of a `#[serde(flatten)]`ed struct
//! (they are buffered and read later, without their path): for those, each field is read on
//! its own to find the one at fault.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The first field of `object` that does not read as part of a `T` (its name and why), if
/// any. `T` must read from an object with any one of its fields alone (every field optional);
/// fields `T` does not know are passed over.
pub fn field_error<T: DeserializeOwned>(object: &Map<String, Value>) -> Option<(String, String)> {
    object.iter().find_map(|(key, value)| {
        let alone = Map::from_iter([(key.clone(), value.clone())]);
        match serde_json::from_value::<T>(Value::Object(alone)) {
            Err(e) if !e.to_string().starts_with("unknown field") => Some((key.clone(), e.to_string())),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::GenerateRequest;

    #[test]
    fn the_field_that_does_not_read_is_named_even_through_flatten() {
        let Value::Object(body) = serde_json::json!({"prompt": "x", "top_k": 2, "temperature": "hot", "bogus": 1})
        else {
            unreachable!()
        };
        let whole = serde_json::from_value::<GenerateRequest>(Value::Object(body.clone())).expect_err("bad");
        assert!(!whole.to_string().contains("temperature"), "serde names it itself now: {whole}");
        let (field, why) = field_error::<GenerateRequest>(&body).expect("found");
        assert_eq!(field, "temperature");
        assert!(why.contains("invalid type"), "{why}");
        let Value::Object(fine) = serde_json::json!({"prompt": "x", "bogus": 1}) else { unreachable!() };
        assert_eq!(field_error::<GenerateRequest>(&fine), None);
    }
}
