//! The crate's layers, checked: every top-level module of `src/` belongs to a layer and imports
//! only from layers below its own (so there is no import cycle between top-level modules).
//! Reads the sources as text; `crate::x` paths (including `use crate::{x, y}` groups) count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bottom up. A module may use modules of a lower layer only.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &["error", "json", "metrics", "ratelimit", "payload"],
    ),
    ("protocol cores", &["ws", "auth"]),
    ("I/O", &["io"]),
    ("cluster", &["cluster"]),
    ("endpoints", &["rooms", "agent", "echo", "proxy"]),
    ("server", &["server"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules named after `crate::` in `text`.
fn crate_refs(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        // Skip `ringgate::crate::`-like false hits: the char before must not be an identifier.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    refs.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            refs.push(name);
        }
    }
    refs
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = BTreeMap::new();
    let mut unplaced = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("component");
        let name = first.as_os_str().to_string_lossy();
        let module = name.trim_end_matches(".rs");
        // The crate root, the binaries and their own modules sit above every layer.
        if matches!(module, "lib" | "main" | "bin") {
            continue;
        }
        let Some(own) = layer_of(module) else {
            unplaced.push(module.to_string());
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        for used in crate_refs(&text) {
            if used == module {
                continue;
            }
            let ok = layer_of(&used).is_some_and(|l| l < own);
            if !ok {
                violations
                    .entry(format!("{} ({})", rel.display(), LAYERS[own].0))
                    .or_insert_with(Vec::new)
                    .push(used);
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(
        unplaced.is_empty(),
        "top-level modules with no layer (add them to LAYERS): {unplaced:?}"
    );
    assert!(
        violations.is_empty(),
        "imports from the same or a higher layer:\n{}",
        violations
            .iter()
            .map(|(f, m)| format!("  {f} uses {m:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn crate_refs_reads_paths_and_groups() {
    let refs =
        crate_refs("use crate::ws::frame;\nuse crate::{io, rooms::Hub};\nx = crate::metrics::X;");
    assert_eq!(refs, ["ws", "io", "rooms", "metrics"]);
}
