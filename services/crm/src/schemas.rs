//! `crm schemas write|check`: the JSON Schemas of every event payload, kept
//! in `schemas/<stream_type>/<EventType>.v<N>.json` and checked in CI to match
//! what the Rust types generate.
use std::collections::BTreeMap;
use std::path::Path;

/// Every schema file's relative path and content, as the code generates them.
pub fn render() -> BTreeMap<String, String> {
    crm_domain::schemas::event_schemas()
        .into_iter()
        .map(|event| {
            let json = serde_json::to_string_pretty(&event.schema).expect("a schema is plain JSON");
            (event.path(), format!("{json}\n"))
        })
        .collect()
}

/// Writes every schema under `dir`; returns how many files changed.
pub fn write(dir: &Path) -> std::io::Result<usize> {
    let mut changed = 0;
    for (path, content) in render() {
        let file = dir.join(&path);
        if std::fs::read_to_string(&file).ok().as_deref() == Some(content.as_str()) {
            continue;
        }
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        changed += 1;
    }
    Ok(changed)
}

/// The differences between `dir` and the generated schemas: missing,
/// outdated, or unknown files. Empty when current.
pub fn check(dir: &Path) -> Vec<String> {
    let expected = render();
    let mut problems = Vec::new();
    for (path, content) in &expected {
        match std::fs::read_to_string(dir.join(path)) {
            Ok(found) if found == *content => {}
            Ok(_) => problems.push(format!("{path} is out of date")),
            Err(_) => problems.push(format!("{path} is missing")),
        }
    }
    for stream_dir in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(stream_dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let relative = format!(
                "{}/{}",
                stream_dir.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            );
            if relative.ends_with(".json") && !expected.contains_key(&relative) {
                problems.push(format!("{relative} matches no event type of the code"));
            }
        }
    }
    problems
}
