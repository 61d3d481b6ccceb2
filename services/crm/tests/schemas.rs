//! The checked-in JSON Schemas match the Rust types.
use std::path::PathBuf;

#[test]
fn checked_in_schemas_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let problems = crm::schemas::check(&dir);
    assert!(
        problems.is_empty(),
        "schemas/ differs from the code; run `just schemas` and commit:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn schemas_mark_personal_fields_and_carry_their_version() {
    let rendered = crm::schemas::render();
    let created: serde_json::Value =
        serde_json::from_str(&rendered["contact/ContactCreated.v2.json"]).unwrap();
    assert_eq!(created["properties"]["emails"]["x-personal"], true);
    assert_eq!(created["properties"]["name"]["x-personal"], true);
    assert!(created["properties"]["title"].get("x-personal").is_none());
    assert_eq!(created["x-schema-version"], 2);
    assert!(
        rendered.contains_key("contact/ContactCreated.v1.json"),
        "old versions stay"
    );
}
