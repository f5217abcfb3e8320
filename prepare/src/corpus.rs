//! Corpus readers: plain text, JSONL and Parquet files as a stream of documents.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::Type;

use lillm_data::{Error, Result};

/// How a plain-text file is cut into documents (each document is followed by `</s>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextUnit {
    /// The whole file is one document.
    File,
    /// Blank-line separated paragraphs are documents.
    Paragraph,
    /// Every non-empty line is a document.
    Line,
}

impl std::str::FromStr for TextUnit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "file" => Ok(Self::File),
            "paragraph" => Ok(Self::Paragraph),
            "line" => Ok(Self::Line),
            other => Err(format!(
                "unknown text unit `{other}`: use file, paragraph or line"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
    Parquet,
}

/// Where the documents come from and how to read them.
#[derive(Debug, Clone)]
pub struct CorpusSpec {
    /// Files or directories (searched recursively for .txt, .jsonl, .json, .parquet).
    pub inputs: Vec<PathBuf>,
    /// JSONL / Parquet field holding the text.
    pub field: String,
    pub text_unit: TextUnit,
    /// Skip and count malformed records instead of failing.
    pub skip_bad: bool,
}

/// Counters shared with whoever consumes the stream.
#[derive(Debug, Default)]
pub struct CorpusStats {
    pub bytes_read: AtomicU64,
    pub bad_records: AtomicU64,
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "txt" | "text" | "md" => Some(Format::Text),
        "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

impl CorpusSpec {
    /// The input files in a stable order; a missing path or an unknown extension is an error.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        if self.inputs.is_empty() {
            return Err(Error::Usage(
                "no input files given; pass --input FILE…".into(),
            ));
        }
        let mut files = Vec::new();
        for input in &self.inputs {
            let meta = fs::metadata(input).map_err(|e| Error::io(input, e))?;
            if meta.is_dir() {
                let mut found = Vec::new();
                collect_dir(input, &mut found)?;
                if found.is_empty() {
                    return Err(Error::invalid(
                        input,
                        "directory holds no .txt, .jsonl or .parquet file",
                    ));
                }
                found.sort();
                files.extend(found);
            } else if format_of(input).is_some() {
                files.push(input.clone());
            } else {
                return Err(Error::invalid(
                    input,
                    "unknown file type; use .txt, .jsonl (or .json) or .parquet",
                ));
            }
        }
        Ok(files)
    }

    /// Total size in bytes of the input files (for progress bars).
    pub fn total_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for f in self.files()? {
            total += fs::metadata(&f).map_err(|e| Error::io(&f, e))?.len();
        }
        Ok(total)
    }

    /// Every document of every file, in order. Errors end the stream.
    pub fn documents(&self, stats: Arc<CorpusStats>) -> Result<Documents> {
        let files = self.files()?;
        Ok(Documents {
            spec: self.clone(),
            files: files.into_iter().rev().collect(),
            current: Vec::new().into_iter(),
            stats,
        })
    }
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_dir(&path, out)?;
        } else if format_of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Iterator over documents; reads one file at a time.
pub struct Documents {
    spec: CorpusSpec,
    files: Vec<PathBuf>,
    current: std::vec::IntoIter<String>,
    stats: Arc<CorpusStats>,
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(doc) = self.current.next() {
                return Some(Ok(doc));
            }
            let path = self.files.pop()?;
            match read_file(&self.spec, &path, &self.stats) {
                Ok(docs) => self.current = docs.into_iter(),
                Err(e) => {
                    self.files.clear();
                    return Some(Err(e));
                }
            }
        }
    }
}

fn read_file(spec: &CorpusSpec, path: &Path, stats: &CorpusStats) -> Result<Vec<String>> {
    let docs = match format_of(path) {
        Some(Format::Text) => read_text(spec, path, stats)?,
        Some(Format::Jsonl) => read_jsonl(spec, path, stats)?,
        Some(Format::Parquet) => read_parquet(spec, path, stats)?,
        None => return Err(Error::invalid(path, "unknown file type")),
    };
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    stats.bytes_read.fetch_add(size, Ordering::Relaxed);
    Ok(docs)
}

/// A bad record either fails the read or, with `skip_bad`, is counted and dropped.
fn bad(spec: &CorpusSpec, stats: &CorpusStats, err: Error) -> Result<()> {
    if spec.skip_bad {
        stats.bad_records.fetch_add(1, Ordering::Relaxed);
        Ok(())
    } else {
        Err(err)
    }
}

/// Splits bytes into lines, checking each is UTF-8 so an error can name its line.
fn utf8_lines<'a>(
    spec: &CorpusSpec,
    path: &Path,
    bytes: &'a [u8],
    stats: &CorpusStats,
) -> Result<Vec<(usize, &'a str)>> {
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(line) => lines.push((i + 1, line)),
            Err(e) => bad(
                spec,
                stats,
                Error::bad_record(
                    path,
                    i + 1,
                    format!(
                        "invalid UTF-8 at byte {} of the line; re-encode the file as UTF-8 or pass --skip-bad",
                        e.valid_up_to()
                    ),
                ),
            )?,
        }
    }
    Ok(lines)
}

fn read_text(spec: &CorpusSpec, path: &Path, stats: &CorpusStats) -> Result<Vec<String>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let lines = utf8_lines(spec, path, &bytes, stats)?;
    let mut docs = Vec::new();
    match spec.text_unit {
        TextUnit::File => {
            let text = lines.iter().map(|(_, l)| *l).collect::<Vec<_>>().join("\n");
            if !text.trim().is_empty() {
                docs.push(text);
            }
        }
        TextUnit::Line => docs.extend(
            lines
                .iter()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(_, l)| l.to_string()),
        ),
        TextUnit::Paragraph => {
            let mut para: Vec<&str> = Vec::new();
            for (_, line) in lines.iter().chain(std::iter::once(&(0, ""))) {
                if line.trim().is_empty() {
                    if !para.is_empty() {
                        docs.push(para.join("\n"));
                        para.clear();
                    }
                } else {
                    para.push(line);
                }
            }
        }
    }
    Ok(docs)
}

fn read_jsonl(spec: &CorpusSpec, path: &Path, stats: &CorpusStats) -> Result<Vec<String>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut docs = Vec::new();
    for (line_no, line) in utf8_lines(spec, path, &bytes, stats)? {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                bad(
                    spec,
                    stats,
                    Error::bad_record(
                        path,
                        line_no,
                        format!("not valid JSON ({e}); fix the line or pass --skip-bad"),
                    ),
                )?;
                continue;
            }
        };
        match value.get(&spec.field).and_then(|v| v.as_str()) {
            Some(text) => docs.push(text.to_string()),
            None => bad(
                spec,
                stats,
                Error::bad_record(
                    path,
                    line_no,
                    format!(
                        "no string field `{}`; set --field to the field that holds the text, or pass --skip-bad",
                        spec.field
                    ),
                ),
            )?,
        }
    }
    Ok(docs)
}

fn read_parquet(spec: &CorpusSpec, path: &Path, stats: &CorpusStats) -> Result<Vec<String>> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::invalid(path, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema();
    let column = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == spec.field)
        .ok_or_else(|| {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            Error::invalid(
                path,
                format!(
                    "no column `{}` (columns: {}); set --field to the text column",
                    spec.field,
                    names.join(", ")
                ),
            )
        })?;
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![column.clone()])
        .build()
        .map_err(|e| Error::invalid(path, e.to_string()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| Error::invalid(path, e.to_string()))?;
    let mut docs = Vec::new();
    for (i, row) in rows.enumerate() {
        let row =
            row.map_err(|e| Error::bad_record(path, i + 1, format!("unreadable row: {e}")))?;
        match parquet::record::RowAccessor::get_string(&row, 0) {
            Ok(text) => docs.push(text.clone()),
            Err(e) => bad(
                spec,
                stats,
                Error::bad_record(
                    path,
                    i + 1,
                    format!(
                        "column `{}` is not a string here ({e}); pass --skip-bad to skip such rows",
                        spec.field
                    ),
                ),
            )?,
        }
    }
    Ok(docs)
}
