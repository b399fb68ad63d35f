//! The run's table as it is computed: the header once the prompt is checked, then one row
//! per step as soon as it is compared (above the step counter on a terminal), then the rest
//! when the run ends. The text is the same as [`crate::report::table::render_table`]'s,
//! whether stdout is a terminal, a pipe or a file.

use crate::lockstep::run::{self as driver, RunEvent};
use crate::report::table::{self, RowLayout};
use crate::ui;

/// What the streamed table prints before the rows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The run's header and prompt line (`run`, `record`).
    Full,
    /// The rows only (`bisect`: its own report follows).
    RowsOnly,
}

/// Streams the table of the runs on this thread until the guard is dropped; nothing with
/// `--quiet`.
pub fn stream(head: Head) -> Streaming {
    if ui::get().quiet {
        return Streaming;
    }
    let mut layout: Option<RowLayout> = None;
    let mut header_done = false;
    driver::set_observer(Some(Box::new(move |e: RunEvent<'_>| match e {
        RunEvent::Started { opts, engine, refs, prompt } => {
            if head == Head::Full {
                let sha = crate::golden::trace::model_sha256_cached(&opts.model).unwrap_or_else(|_| "?".into());
                let info = crate::lockstep::summary::engine_info(engine, opts);
                ui::print_above(&ui::paint_verdicts(&table::render_head(&info, refs, &opts.model, &sha)));
                ui::print_above(&table::render_prompt(prompt));
            }
            layout = Some(RowLayout::new(refs, engine.model.info().config.num_layers, ui::get().width));
            header_done = false;
            ui::steps_started(opts.steps.max(1));
        }
        RunEvent::Step { record, planned: _ } => {
            let Some(l) = layout.as_ref() else { return };
            if !header_done {
                ui::print_above(&l.header());
                header_done = true;
            }
            ui::print_above(&l.row(record));
            ui::step_done(record.step + 1);
        }
        RunEvent::Bisecting => {}
    })));
    Streaming
}

/// Stops the streaming (and the step counter) when dropped.
pub struct Streaming;

impl Drop for Streaming {
    fn drop(&mut self) {
        driver::set_observer(None);
        ui::live_done();
    }
}
