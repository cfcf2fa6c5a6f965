//! The progress line and the messages of a run.

use crate::config::StageAt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub(super) fn progress_bar(steps: u64, start: u64, quiet: bool) -> ProgressBar {
    let target = if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let pb = ProgressBar::with_draw_target(Some(steps), target);
    pb.set_style(progress_style());
    pb.set_position(start);
    pb
}

/// The progress line: the losses (the message) are cut to what the terminal's width leaves, so
/// that the line never wraps (a wrapped line is redrawn as a new line at every tick).
pub(super) fn progress_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:20} {pos}/{len} steps ({per_sec}, eta {eta}) {wide_msg}",
    )
    .expect("template")
    .progress_chars("=> ")
}

pub(super) fn describe_stage(s: &StageAt, default_crop: u32, stages: usize) -> String {
    let until = if s.until == u64::MAX { "the end".to_string() } else { format!("step {}", s.until) };
    let which =
        if s.stage < stages { format!("data stage {}/{stages}", s.stage + 1) } else { "the last data stage".into() };
    format!("{which}: crop {}, batch {} until {until}", s.crop.unwrap_or(default_crop), s.batch_size)
}

pub(super) fn short_losses(v: &[(String, f64)]) -> String {
    v.iter().map(|(k, x)| format!("{k} {x:.4}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::Mutex;

    /// A terminal of a given width that keeps what is drawn.
    #[derive(Debug)]
    struct Screen {
        width: u16,
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.lines.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.lines.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_progress_line_fits_the_terminal() {
        let losses: Vec<(String, f64)> =
            ["encoder", "disc", "correction_std", "disc_acc", "gan", "lowres_mse", "decoder", "decoder_mse"]
                .iter()
                .map(|k| (k.to_string(), 0.123456))
                .collect();
        for width in [100u16, 120] {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let screen = Screen { width, lines: lines.clone() };
            let pb = ProgressBar::with_draw_target(Some(100_000), ProgressDrawTarget::term_like(Box::new(screen)));
            pb.set_style(progress_style());
            pb.set_position(12_345);
            pb.set_message(short_losses(&losses));
            pb.finish();
            let lines = lines.lock().unwrap();
            assert!(!lines.is_empty());
            for l in lines.iter() {
                let n = l.chars().count();
                assert!(n <= width as usize, "{n} > {width} columns: {l:?}");
            }
            assert!(lines.iter().any(|l| l.contains("12345/100000") && l.contains("encoder 0.1235")), "{lines:?}");
        }
    }
}
