//! Turning a stream of token ids into a stream of text deltas: incomplete UTF-8 and text
//! that may be the start of a stop sequence are held back until they resolve.

use anyhow::Result;
use lillm_data::tokenizer::Tokenizer;

/// What the caller should do after a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Keep generating; print this delta (possibly empty).
    Continue(String),
    /// A stop sequence appeared: print this last delta (the text before it) and stop.
    Stop(String),
}

pub struct IncrementalText<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    sent: usize,
    stops: Vec<String>,
}

impl<'a> IncrementalText<'a> {
    pub fn new(tok: &'a Tokenizer, stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            tok,
            ids: Vec::new(),
            sent: 0,
            stops,
        }
    }

    /// Tokens received so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    fn decoded(&self) -> Result<String> {
        let text = self.tok.decode(&self.ids)?;
        Ok(text.trim_end_matches('\u{FFFD}').to_string())
    }

    pub fn push(&mut self, id: u32) -> Result<Step> {
        self.ids.push(id);
        let text = self.decoded()?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let delta = text.get(self.sent..cut).unwrap_or("").to_string();
            self.sent = text.len();
            return Ok(Step::Stop(delta));
        }
        // Hold back the longest tail that could still grow into a stop sequence.
        let hold = text
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| i >= self.sent && self.stops.iter().any(|s| s.starts_with(&text[i..])))
            .unwrap_or(text.len());
        let delta = text.get(self.sent..hold).unwrap_or("").to_string();
        self.sent = self.sent.max(hold);
        Ok(Step::Continue(delta))
    }

    /// Whatever is still held back when generation ends for another reason.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tok.decode(&self.ids)?;
        let rest = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        Ok(rest)
    }
}
