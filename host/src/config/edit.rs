//! The changes the configuration verbs make, on the file's JSON.

use serde_json::{Map, Value};

use super::{ConfigError, Object};

/// Sets a top-level key (profile None) or a key of a profile (created if missing).
///
/// Anything in the way that is not an object (the top level, `profile`, the profile entry)
/// is replaced by an empty object first.
pub fn set_key(rc: &mut Value, profile: Option<&str>, key: &str, value: Value) {
    if let Some(map) = section(rc, profile) {
        map.insert(key.to_owned(), value);
    }
}

/// Removes a top-level key (profile None) or a key of a profile, so it is inherited again.
/// The other keys keep their order.
pub fn del_key(rc: &mut Value, profile: Option<&str>, key: &str) {
    if let Some(map) = section(rc, profile) {
        map.shift_remove(key);
    }
}

/// Appends `item` to the list at `key` (a missing or `null` list counts as empty), first
/// dropping equal items so it is listed once, as `aemp addseed`/`addbind` do.
pub fn list_add(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: Value,
) -> Result<(), ConfigError> {
    let list = list_at(rc, profile, key)?;
    list.retain(|x| *x != item);
    list.push(item);
    Ok(())
}

/// Removes every item equal to `item` from the list at `key` (`aemp delseed`/`delbind`).
pub fn list_remove(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: &Value,
) -> Result<(), ConfigError> {
    list_at(rc, profile, key)?.retain(|x| x != item);
    Ok(())
}

/// Appends `item` to the list at `key`, even if it is listed already (`aemp addservice`:
/// one more instance of a service).
pub fn list_push(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: Value,
) -> Result<(), ConfigError> {
    list_at(rc, profile, key)?.push(item);
    Ok(())
}

/// Removes the first item equal to `item` from the list at `key` (`aemp delservice`: one
/// instance).
pub fn list_remove_first(
    rc: &mut Value,
    profile: Option<&str>,
    key: &str,
    item: &Value,
) -> Result<(), ConfigError> {
    let list = list_at(rc, profile, key)?;
    if let Some(at) = list.iter().position(|x| x == item) {
        list.remove(at);
    }
    Ok(())
}

/// The list at `key` of the section, created empty if missing or `null`.
fn list_at<'a>(
    rc: &'a mut Value,
    profile: Option<&str>,
    key: &str,
) -> Result<&'a mut Vec<Value>, ConfigError> {
    let at = match profile {
        Some(name) => format!("profile.{name}.{key}"),
        None => key.to_owned(),
    };
    let err = || ConfigError::Type {
        key: at.clone(),
        expected: "a list",
    };
    let slot = section(rc, profile)
        .ok_or_else(err)?
        .entry(key)
        .or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().ok_or_else(err)
}

/// Creates profile `name` (empty) unless it exists, as the reference's `aemp profile` does.
pub fn add_profile(rc: &mut Value, name: &str) {
    section(rc, Some(name));
}

/// Removes profile `name` altogether.
pub fn del_profile(rc: &mut Value, name: &str) {
    if let Some(Value::Object(profiles)) = rc.get_mut("profile") {
        profiles.shift_remove(name);
    }
}

/// The keys set in profile `name` itself, nothing inherited (`{}` if it does not exist).
pub fn own_profile(rc: &Value, name: &str) -> Value {
    rc.get("profile")
        .and_then(|p| p.get(name))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// The object holding the keys of `profile` (the top level for None), created (or
/// replacing a non-object in the way) as needed; `None` never happens in practice, it only
/// spares a panic path.
fn section<'a>(rc: &'a mut Value, profile: Option<&str>) -> Option<&'a mut Object> {
    let mut target = object(rc)?;
    if let Some(name) = profile {
        target = object(target.entry("profile").or_insert(Value::Null))?;
        target = object(target.entry(name).or_insert(Value::Null))?;
    }
    Some(target)
}

/// `value` as an object, replacing it by an empty one if it is something else.
fn object(value: &mut Value) -> Option<&mut Object> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    value.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::config::pretty;

    #[test]
    fn set_key_creates_as_needed() {
        let mut rc = json!({});
        set_key(&mut rc, None, "secret", json!("s"));
        set_key(&mut rc, Some("seed"), "binds", json!(["*:4040"]));
        set_key(&mut rc, Some("seed"), "nodeid", json!("seed1"));
        set_key(&mut rc, Some("other"), "cert", json!("PEM"));
        assert_eq!(
            rc,
            json!({
                "secret": "s",
                "profile": {
                    "seed": {"binds": ["*:4040"], "nodeid": "seed1"},
                    "other": {"cert": "PEM"},
                },
            })
        );
        set_key(&mut rc, None, "secret", json!("t"));
        assert_eq!(rc["secret"], "t");

        // Non-objects in the way are replaced.
        let mut rc = json!({"profile": 3});
        set_key(&mut rc, Some("p"), "k", json!(1));
        assert_eq!(rc, json!({"profile": {"p": {"k": 1}}}));
        let mut rc = json!(null);
        set_key(&mut rc, None, "k", json!(1));
        assert_eq!(rc, json!({"k": 1}));
    }

    #[test]
    fn editing_keys_lists_and_profiles() {
        let mut rc = json!({"version": 1});
        set_key(&mut rc, None, "seeds", json!(["a:1"]));
        list_add(&mut rc, None, "seeds", json!("b:2")).unwrap();
        list_add(&mut rc, None, "seeds", json!("a:1")).unwrap();
        assert_eq!(rc["seeds"], json!(["b:2", "a:1"]));
        list_remove(&mut rc, None, "seeds", &json!("b:2")).unwrap();
        list_remove(&mut rc, None, "seeds", &json!("nope")).unwrap();
        assert_eq!(rc["seeds"], json!(["a:1"]));
        // A missing (or null) list starts empty; in a profile, created as needed.
        list_add(&mut rc, Some("p"), "binds", json!("*:4040")).unwrap();
        assert_eq!(rc["profile"]["p"]["binds"], json!(["*:4040"]));
        set_key(&mut rc, Some("p"), "seeds", Value::Null);
        list_remove(&mut rc, Some("p"), "seeds", &json!("x")).unwrap();
        assert_eq!(rc["profile"]["p"]["seeds"], json!([]));
        // Not a list: an error naming the key.
        set_key(&mut rc, Some("p"), "binds", json!("*:1"));
        let err = list_add(&mut rc, Some("p"), "binds", json!("x")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Type { key, .. } if key == "profile.p.binds"),
            "{err}"
        );

        // Deleting keeps the order of the others.
        let mut ordered = json!({"a": 1, "b": 2, "c": 3});
        del_key(&mut ordered, None, "a");
        assert_eq!(pretty(&ordered), "{\n   \"b\" : 2,\n   \"c\" : 3\n}\n");

        del_key(&mut rc, Some("p"), "binds");
        del_key(&mut rc, None, "seeds");
        del_key(&mut rc, None, "absent");
        assert_eq!(rc, json!({"version": 1, "profile": {"p": {"seeds": []}}}));
        assert_eq!(own_profile(&rc, "p"), json!({"seeds": []}));
        assert_eq!(own_profile(&rc, "q"), json!({}));
        add_profile(&mut rc, "q");
        add_profile(&mut rc, "p");
        assert_eq!(rc["profile"], json!({"p": {"seeds": []}, "q": {}}));
        del_profile(&mut rc, "p");
        del_profile(&mut rc, "absent");
        assert_eq!(rc["profile"], json!({"q": {}}));
    }
}
