//! Holds the code to docs/architecture.md: every room (a top-level module of src/) must be listed
//! there, and may import only rooms on lower layers that its row names. Imports are read as text
//! (`crate::room` anywhere outside comments), so a `use crate::{a, b::c}` group counts each room.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// One room's row in the architecture page.
#[derive(Debug)]
struct Room {
    layer: u32,
    may_import: BTreeSet<String>,
}

/// The rooms, read from the architecture page's table: rows whose first cell is a backticked
/// room name, whose second is its layer (0 = bottom) and whose fourth lists, backticked, the rooms
/// it may import.
fn rooms(page: &str) -> BTreeMap<String, Room> {
    let mut rooms = BTreeMap::new();
    for line in page.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, name, layer, _job, may_import, ..] = cells.as_slice() else { continue };
        let (Some(name), Ok(layer)) =
            (name.strip_prefix('`').and_then(|r| r.strip_suffix('`')), layer.parse())
        else {
            continue;
        };
        let may_import = may_import.split(',').map(|r| r.trim().trim_matches('`').to_owned());
        let room = Room { layer, may_import: may_import.filter(|r| !r.is_empty()).collect() };
        assert!(rooms.insert(name.to_owned(), room).is_none(), "room {name} is listed twice");
    }
    rooms
}

/// The room a source file belongs to: `src/x.rs` and everything under `src/x/` are room `x`.
fn room_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let room = first.strip_suffix(".rs").unwrap_or(first);
    (room != "lib" && room != "main").then(|| room.to_owned())
}

/// The rooms a source text names through `crate::`, comments left out.
fn imports(text: &str) -> BTreeSet<String> {
    let code: Vec<&str> = text.lines().map(|line| line.split("//").next().unwrap_or_default()).collect();
    let code = code.join("\n");
    let mut rooms = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        // NB: `kmsgate::` paths (main.rs, tests) name the same crate from outside it.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        match rest.strip_prefix('{') {
            Some(group) => group_rooms(group, &mut rooms),
            None => {
                let room: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                rooms.insert(room);
            }
        }
    }
    rooms.remove("");
    rooms
}

/// The first segment of each path in a `crate::{..}` group, which may span lines and nest.
fn group_rooms(group: &str, rooms: &mut BTreeSet<String>) {
    let (mut depth, mut segment_start, mut word) = (1, true, String::new());
    for c in group.chars() {
        if segment_start && (c.is_alphanumeric() || c == '_') {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            rooms.insert(std::mem::take(&mut word));
            segment_start = false;
        }
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return,
            '}' => depth -= 1,
            ',' if depth == 1 => segment_start = true,
            _ => {}
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import that breaks the layering or the page, and every room the page does not list.
fn violations(rooms: &BTreeMap<String, Room>, files: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (name, text) in files {
        let Some(room) = rooms.get(name) else {
            found.push(format!("room {name} is not listed in docs/architecture.md"));
            continue;
        };
        for imported in imports(text) {
            if imported == *name || imported == "self" {
                continue;
            }
            match rooms.get(&imported) {
                None => found.push(format!("{name} imports {imported}, which the page does not list")),
                Some(other) if other.layer >= room.layer => found.push(format!(
                    "{name} (layer {}) imports {imported} (layer {})",
                    room.layer, other.layer
                )),
                Some(_) if !room.may_import.contains(&imported) => {
                    found.push(format!("{name} imports {imported}, which its row does not allow"))
                }
                Some(_) => {}
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_room_imports_only_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let rooms = rooms(&page);
    assert!(!rooms.is_empty(), "docs/architecture.md lists no rooms");
    let src = root.join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let files: Vec<(String, String)> =
        paths.iter().filter_map(|p| Some((room_of(&src, p)?, std::fs::read_to_string(p).unwrap()))).collect();
    let listed_but_gone: Vec<&String> =
        rooms.keys().filter(|room| !files.iter().any(|(r, _)| r == *room)).collect();
    assert!(listed_but_gone.is_empty(), "docs/architecture.md lists rooms src/ lacks: {listed_but_gone:?}");
    let found = violations(&rooms, &files);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

#[test]
fn a_back_import_an_unlisted_room_or_an_unlisted_door_is_caught() {
    let page = "| room | layer | job | may import |\n|---|---|---|---|\n\
                | `keyid` | 0 | x | |\n| `storage` | 0 | x | |\n| `audit` | 1 | y | `storage` |\n";
    let rooms = rooms(page);
    let ok = vec![("audit".to_owned(), "use crate::storage::Judge;".to_owned())];
    assert!(violations(&rooms, &ok).is_empty());
    let back =
        vec![("storage".to_owned(), "use crate::{\n    error,\n    audit::{Scanner, x},\n};".to_owned())];
    assert_eq!(
        violations(&rooms, &back),
        ["storage (layer 0) imports audit (layer 1)", "storage imports error, which the page does not list"]
    );
    let sideways = vec![("storage".to_owned(), "fn f() { crate::keyid::parse(); }".to_owned())];
    assert_eq!(violations(&rooms, &sideways), ["storage (layer 0) imports keyid (layer 0)"]);
    let undeclared =
        vec![("audit".to_owned(), "let x = crate::keyid::parse(); // crate::ignored".to_owned())];
    assert_eq!(violations(&rooms, &undeclared), ["audit imports keyid, which its row does not allow"]);
    let unlisted = vec![("signer".to_owned(), String::new())];
    assert_eq!(violations(&rooms, &unlisted), ["room signer is not listed in docs/architecture.md"]);
    let outside = vec![("storage".to_owned(), "use kmsgate::audit;".to_owned())];
    assert!(violations(&rooms, &outside).is_empty());
}
