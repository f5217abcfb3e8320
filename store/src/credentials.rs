//! Credentials for a bucket: the usual environment variables of each cloud, or a file named
//! by a flag (a mounted Secret, say) — never a value on the command line, where `ps` shows it.
//!
//! The file is the AWS shared-credentials form: `key = value` lines, optionally under a
//! `[default]` section, `#` comments. Keys are object_store's configuration keys
//! (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`, `region`,
//! `endpoint_url`, `allow_http`, `google_service_account`, `azure_storage_account_key`, …).

use std::path::Path;

use crate::{Error, Result};

/// `(key, value)` pairs for the object store builder, keys lower-case.
pub fn read_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text).map_err(|message| Error::Usage(format!("{}: {message}", path.display())))
}

fn parse(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut section = String::from("default");
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section != "default" {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: expected `key = value` (the key, not its value, is shown here: `{}`)",
                n + 1,
                line.split_whitespace().next().unwrap_or_default()
            ));
        };
        let value = value.trim().trim_matches('"');
        pairs.push((key.trim().to_ascii_lowercase(), value.to_string()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_default_profile_and_skips_others() {
        let text = "# a comment\n[default]\naws_access_key_id = AKID\naws_secret_access_key=\"s3cr3t\"\n\n[other]\naws_access_key_id = NOT\n";
        let pairs = parse(text).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("aws_access_key_id".into(), "AKID".into()),
                ("aws_secret_access_key".into(), "s3cr3t".into())
            ]
        );
    }

    #[test]
    fn a_line_without_equals_is_refused_without_echoing_a_secret() {
        let err = parse("aws_secret_access_key s3cr3t-value\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
