//! What the documents API takes and returns, and the checks on what it takes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who is asking: the `sub` of their token and whether they hold the admin role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub user: String,
    pub admin: bool,
}

/// The user the operator's smoke checks act as, with a token only the platform can sign
/// (see [`crate::signing::smoke_token_key`]). Its documents appear in no one else's listing
/// and its changes emit no event; a user token naming it is refused.
pub const SMOKE_USER: &str = "vellum:smoke";

impl Actor {
    /// The smoke checks' actor.
    pub fn smoke() -> Self {
        Self { user: SMOKE_USER.to_owned(), admin: false }
    }

    /// Whether this is the smoke checks' actor.
    pub fn is_smoke(&self) -> bool {
        self.user == SMOKE_USER
    }

    /// Whether the actor may see a document owned by `owner`.
    pub fn sees(&self, owner: &str) -> bool {
        self.admin || self.user == owner
    }
}

/// A document as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub id: i64,
    pub filename: String,
    /// Lowercase extension (`pdf`), empty when the name has none.
    pub file_type: String,
    pub content_type: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    /// Custom metadata: any JSON object.
    pub metadata: Map<String, Value>,
    /// The owner: the `sub` of the token that uploaded the first version.
    pub uploaded_by: String,
    /// Size in bytes of the current version.
    pub size: i64,
    /// `sha256:<hex>` of the current version's bytes.
    pub checksum: String,
    pub current_version: i64,
    pub storage_tier: String,
    pub legal_hold: bool,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    /// When a retention policy archived the document; absent unless it is archived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_at: Option<String>,
    /// The archive's id, as DOCUMENT_ARCHIVED announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_id: Option<String>,
}

impl Document {
    /// The document's entity tag, quoted as `ETag` carries it: a digest of everything the
    /// document says of itself, so that any change (metadata, a version, a tier, a hold)
    /// gives a new one.
    pub fn etag(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(serde_json::to_vec(self).unwrap_or_default());
        format!("\"{}\"", hex::encode(&digest[..16]))
    }

    /// Whether an `If-Match` header's value (`*`, or a comma-separated list of entity tags)
    /// lets a change of the document as it is now go ahead: strong comparison, so a weak
    /// tag (`W/"…"`) never matches.
    pub fn matches(&self, if_match: &str) -> bool {
        let etag = self.etag();
        if_match.split(',').map(str::trim).any(|tag| tag == "*" || tag == etag)
    }
}

/// The answer to an upload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Uploaded {
    #[serde(flatten)]
    pub document: Document,
    /// Whether the bytes were already stored (by anyone) and were not stored again.
    pub deduplicated: bool,
    pub version_number: i64,
}

/// What an upload says about its document, besides the bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewDocument {
    pub filename: String,
    pub content_type: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Map<String, Value>,
}

/// What a new version says about itself, besides the bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewVersion {
    /// A new file name, or the document's current one.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub change_description: Option<String>,
    /// The document as the uploader last saw it (an `If-Match` header's value): the
    /// version is refused, with [`super::DocError::PreconditionFailed`], when the document
    /// has changed since.
    pub if_match: Option<String>,
}

/// A change of a document's descriptive metadata; absent fields are left alone, and a
/// `null` title or description clears it.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[allow(clippy::option_option)]
pub struct MetadataPatch {
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 500)]
    pub title: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, max_length = 5000)]
    pub description: Option<Option<String>>,
    #[schema(max_items = 32)]
    pub tags: Option<Vec<String>>,
    pub metadata: Option<Map<String, Value>>,
    pub filename: Option<String>,
}

// Absent, null and a value mean three different things in a patch.
#[allow(clippy::option_option)]
fn double_option<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// One version in a document's history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Version {
    pub version_number: i64,
    pub created_at: String,
    pub created_by: String,
    pub change_description: Option<String>,
    pub size: i64,
    pub checksum: String,
    pub filename: String,
    pub content_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from_version: Option<i64>,
    pub is_latest: bool,
}

/// A document's version history, newest first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionHistory {
    pub document_id: i64,
    pub current_version: i64,
    pub versions: Vec<Version>,
}

/// The answer to restoring a version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub document_id: i64,
    pub version_number: i64,
    pub restored_from_version: i64,
    pub message: String,
}

/// Filters and paging of a listing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListQuery {
    pub tag: Option<String>,
    pub file_type: Option<String>,
    pub owner: Option<String>,
    /// Created at or after, in ms.
    pub created_from: Option<i64>,
    /// Created before, in ms.
    pub created_to: Option<i64>,
    /// Words that must appear in the file name or title (case-insensitive).
    pub q: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// A page of a listing; `nextCursor` fetches the next one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub items: Vec<Document>,
    pub next_cursor: Option<String>,
}

pub const MAX_FILENAME_CHARS: usize = 255;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_CHARS: usize = 64;
pub const MAX_TITLE_CHARS: usize = 500;
pub const MAX_DESCRIPTION_CHARS: usize = 5000;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 50;

// The rules of `check_filename` and `check_tags` as patterns (ECMA-262, for the OpenAPI
// document): white space as Rust's `char::is_whitespace` sees it, control characters as
// `char::is_control`, and the bidirectional controls.
/// A file name `check_filename` accepts.
pub const FILENAME_PATTERN: &str = concat!(
    r"^(?!\.\.?$)",
    r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069/\\]",
    r"(?:[^\x00-\x1F\x7F-\x9F\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069/\\]{0,253}",
    r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069/\\])?$",
);
/// A tag `check_tags` accepts: 1 to 64 characters, no control characters, once trimmed.
pub const TAG_PATTERN: &str = concat!(
    r"^[\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*",
    r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F]",
    r"(?:[^\x00-\x1F\x7F-\x9F]{0,62}",
    r"[^\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F])?",
    r"[\t\n\x0B\x0C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$",
);

/// The characters that change the direction text is shown in.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Checks a file name: a plain name, never a path.
pub fn check_filename(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("filename is empty".into());
    }
    if name.chars().count() > MAX_FILENAME_CHARS {
        return Err(format!("filename is longer than {MAX_FILENAME_CHARS} characters"));
    }
    if name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(format!("filename {name:?} is a path; give a plain file name"));
    }
    if name.chars().any(char::is_control) {
        return Err("filename contains control characters".into());
    }
    // Bidirectional controls reorder what a person reads: `invoice\u{202E}fdp.exe`
    // shows as `invoiceexe.pdf`.
    if name.chars().any(is_bidi_control) {
        return Err(
            "filename contains bidirectional text controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069)"
                .into(),
        );
    }
    if name.trim() != name {
        return Err("filename starts or ends with white space".into());
    }
    Ok(())
}

/// Checks and normalises tags: trimmed, unique, in the order given.
pub fn check_tags(tags: &[String]) -> Result<Vec<String>, String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("more than {MAX_TAGS} tags"));
    }
    let mut out: Vec<String> = Vec::new();
    for tag in tags {
        let tag = tag.trim();
        if tag.is_empty() || tag.chars().count() > MAX_TAG_CHARS || tag.chars().any(char::is_control) {
            return Err(format!("tag {tag:?} must be 1 to {MAX_TAG_CHARS} printable characters"));
        }
        if !out.iter().any(|t| t == tag) {
            out.push(tag.to_owned());
        }
    }
    Ok(out)
}

pub fn check_text(field: &str, value: Option<&str>, max: usize) -> Result<(), String> {
    match value {
        Some(v) if v.chars().count() > max => Err(format!("{field} is longer than {max} characters")),
        _ => Ok(()),
    }
}

pub fn check_metadata(metadata: &Map<String, Value>) -> Result<(), String> {
    if Value::Object(metadata.clone()).to_string().len() > MAX_METADATA_BYTES {
        return Err(format!("metadata is larger than {MAX_METADATA_BYTES} bytes"));
    }
    Ok(())
}

/// Checks a content type: `type/subtype`, optionally with parameters.
pub fn check_content_type(value: &str) -> Result<(), String> {
    match value.parse::<mime_guess::mime::Mime>() {
        Ok(_) if value.len() <= 255 => Ok(()),
        _ => Err(format!("content type {value:?} is not a media type like text/plain")),
    }
}

/// The lowercase extension of a file name, or "" when it has none we can use.
pub fn file_type(filename: &str) -> String {
    match filename.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && !ext.is_empty()
                && ext.len() <= 16
                && ext.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            ext.to_ascii_lowercase()
        }
        _ => String::new(),
    }
}

/// The content type given, or the one the file name suggests.
pub fn content_type_for(filename: &str, given: Option<&str>) -> String {
    match given {
        Some(given) if !given.is_empty() && given != "application/octet-stream" => given.to_owned(),
        _ => mime_guess::from_path(filename).first_or_octet_stream().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_are_plain_names() {
        for ok in ["contract.pdf", "Q4 report (final).docx", "résumé.txt", ".env", "a"] {
            assert_eq!(check_filename(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "x\u{0}y",
            "tab\there",
            " lead",
            &"x".repeat(256),
            "invoice\u{202E}fdp.exe",
            "a\u{2066}b",
        ] {
            assert!(check_filename(bad).is_err(), "{bad:?}");
        }
    }

    /// The OpenAPI document's patterns say what the checks do, name for name.
    #[test]
    fn the_published_patterns_agree_with_the_checks() {
        let filename = fancy_regex::Regex::new(FILENAME_PATTERN).unwrap();
        let tag = fancy_regex::Regex::new(TAG_PATTERN).unwrap();
        let samples = [
            "contract.pdf",
            ".env",
            "a",
            "..",
            ".",
            "...",
            "a/b",
            "a\\b",
            "x\u{0}y",
            "tab\there",
            " lead",
            "trail ",
            "in side",
            "\u{85}x",
            "x\u{a0}",
            "é",
            "invoice\u{202E}fdp.exe",
            "\u{3000}",
            "a\u{7f}",
            "\u{2028}a",
            "\u{1c}",
            "日本語",
            "ok\u{200b}",
            "  spaced tag  ",
            "\t",
            "",
            "-",
        ];
        let long = ["x".repeat(255), "x".repeat(256), "y".repeat(64), "y".repeat(65), format!(" {} ", "z".repeat(64))];
        for sample in samples.iter().map(|s| (*s).to_owned()).chain(long) {
            assert_eq!(filename.is_match(&sample).unwrap(), check_filename(&sample).is_ok(), "file name {sample:?}");
            assert_eq!(
                tag.is_match(&sample).unwrap(),
                check_tags(std::slice::from_ref(&sample)).is_ok(),
                "tag {sample:?}"
            );
        }
    }

    #[test]
    fn file_types_come_from_extensions() {
        assert_eq!(file_type("contract.PDF"), "pdf");
        assert_eq!(file_type("archive.tar.gz"), "gz");
        assert_eq!(file_type("README"), "");
        assert_eq!(file_type(".env"), "");
        assert_eq!(file_type("weird.ex t"), "");
    }

    #[test]
    fn tags_are_trimmed_deduplicated_and_bounded() {
        assert_eq!(check_tags(&[" legal ".into(), "legal".into(), "q4".into()]), Ok(vec!["legal".into(), "q4".into()]));
        assert!(check_tags(&[String::new()]).is_err());
        assert!(check_tags(&vec!["t".to_owned(); 33]).is_err());
    }

    #[test]
    fn content_types_are_guessed_or_checked() {
        assert_eq!(content_type_for("a.pdf", None), "application/pdf");
        assert_eq!(content_type_for("a.pdf", Some("application/octet-stream")), "application/pdf");
        assert_eq!(content_type_for("a.bin", Some("text/csv")), "text/csv");
        assert_eq!(content_type_for("noext", None), "application/octet-stream");
        assert!(check_content_type("text/plain; charset=utf-8").is_ok());
        assert!(check_content_type("not a type").is_err());
    }

    #[test]
    fn a_patch_tells_clearing_from_leaving_alone() {
        let patch: MetadataPatch = serde_json::from_str(r#"{"title": null, "tags": ["a"]}"#).unwrap();
        assert_eq!(patch.title, Some(None));
        assert_eq!(patch.description, None);
        assert!(serde_json::from_str::<MetadataPatch>(r#"{"titel": "x"}"#).is_err());
    }
}
