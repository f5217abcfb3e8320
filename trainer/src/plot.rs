//! Loss curves as PNG (`RUN/loss.png`), from `metrics.jsonl`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::{read_records, METRICS_FILE};
use crate::{Error, Result};

pub const PLOT_FILE: &str = "loss.png";

/// The family the chart's text asks for.
const FONT: &str = "sans-serif";

/// Registers the embedded DejaVu Sans as the chart's font, once per process. Fonts come
/// from the binary, not the system: a GPU node's container has no fonts and no
/// fontconfig configuration, and looking them up printed errors on every plot.
fn embed_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| Error::Plot("the embedded DejaVu Sans font did not load".into()))
}

/// Draws train loss (per log record) and val loss (per evaluation) against steps.
pub fn plot_run(run: &Path) -> Result<PathBuf> {
    let records = read_records(&run.join(METRICS_FILE))?;
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.step as f64, r.loss?)))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.step as f64, r.val_loss?)))
        .collect();
    if train.is_empty() && val.is_empty() {
        return Err(Error::Plot(format!(
            "{} has no loss records yet",
            run.join(METRICS_FILE).display()
        )));
    }
    embed_font()?;
    let out = run.join(PLOT_FILE);
    let all = train.iter().chain(&val);
    let max_step = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(&out, (900, 540)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| Error::Plot(e.to_string());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("lillm loss", (FONT, 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross entropy")
        .draw()
        .map_err(|e| draw(&e))?;
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|e| draw(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
    }
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label("val")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        chart
            .draw_series(val.into_iter().map(|p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    drop(chart);
    drop(root);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text is drawn with the embedded font: dark pixels where the caption goes, on a
    /// machine whose font configuration is never read.
    #[test]
    fn text_renders_from_the_embedded_font() {
        embed_font().unwrap();
        let (w, h) = (160u32, 40u32);
        let mut pixels = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
            root.draw_text("lillm loss", &(FONT, 24).into_font().color(&BLACK), (4, 4))
                .unwrap();
            root.present().unwrap();
        }
        let dark = pixels
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 128))
            .count();
        assert!(
            dark > 100,
            "only {dark} dark pixels: the caption did not render"
        );
    }
}
