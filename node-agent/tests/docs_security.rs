//! Keeps `docs/security.md`'s table of attacks current: every test it names
//! must exist, in the file it names.

use std::path::Path;

#[test]
fn every_test_named_in_the_attack_table_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/security.md")).expect("docs/security.md");
    let table = doc
        .split("## Attacks tried, and their tests")
        .nth(1)
        .expect("docs/security.md has the section \"Attacks tried, and their tests\"")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let mut named = 0;
    for row in table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| attack")) {
        let cell = row.trim_end_matches('|').rsplit('|').next().unwrap_or_default().trim();
        let Some(reference) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            panic!("row without a test reference: {row}");
        };
        let (file, test) = reference.split_once("::").unwrap_or_else(|| panic!("not file::test: {reference}"));
        let source = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            source.contains(&format!("fn {test}(")),
            "docs/security.md names {reference}, but {file} has no fn {test}"
        );
        named += 1;
    }
    assert!(named >= 10, "the attack table names only {named} tests");
}
