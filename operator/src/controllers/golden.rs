//! Whole-object expectations for the builders: each built object, as YAML, is compared
//! with its file in `operator/tests/golden/`. `VELLUM_BLESS=1 cargo test -p vellum-operator`
//! rewrites the files from the builders; the diff is then reviewed like any change.

use serde::Serialize;

/// Asserts that `object` serializes to the content of `tests/golden/<name>.yaml`.
pub fn assert_golden(name: &str, object: &impl Serialize) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.yaml"));
    let actual = serde_yaml::to_string(object).expect("objects serialize");
    if std::env::var_os("VELLUM_BLESS").is_some() {
        std::fs::write(&path, &actual).expect("writing a golden file");
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; VELLUM_BLESS=1 writes it", path.display()));
    if actual != expected {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (e, a))| e != a)
            .take(10)
            .map(|(i, (e, a))| format!("line {}:\n  expected: {e}\n  built:    {a}", i + 1))
            .collect();
        panic!(
            "{name}: the built object differs from {} ({} vs {} lines)\n{}\nVELLUM_BLESS=1 rewrites the file",
            path.display(),
            actual.lines().count(),
            expected.lines().count(),
            diff.join("\n")
        );
    }
}
