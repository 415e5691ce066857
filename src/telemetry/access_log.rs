//! The access log: one JSON line per connection, written off the data path.
//!
//! Connections hand their line to a bounded channel; a dedicated thread writes and
//! flushes. If the writer falls behind (a blocked stdout pipe), lines are dropped and
//! counted rather than stalling connections.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use crate::model::AccessLogTarget;

const QUEUE: usize = 64 * 1024;

pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued but not yet written and flushed.
    pending: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn off() -> Self {
        AccessLog {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
            pending: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts the writer thread for the configured target.
    pub fn open(target: &AccessLogTarget) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::off()),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(open_append(path)?),
        };
        let (tx, rx) = sync_channel(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let written = pending.clone();
        std::thread::Builder::new()
            .name("strait-access-log".into())
            .spawn(move || write_lines(rx, out, &written))?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
            pending,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, line: String) {
        if let Some(tx) = &self.tx {
            self.pending.fetch_add(1, Ordering::AcqRel);
            match tx.try_send(line) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until every queued line is written and flushed; call it
    /// before the process exits so the last connections' lines are not lost.
    /// Returns whether everything was written.
    pub fn flush(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn write_lines(rx: Receiver<String>, out: Box<dyn Write + Send>, pending: &AtomicU64) {
    let mut out = BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let mut ok = writeln!(out, "{line}").is_ok();
        let mut n = 1;
        // Drain whatever else is queued before paying for a flush.
        while let Ok(line) = rx.try_recv() {
            ok &= writeln!(out, "{line}").is_ok();
            n += 1;
        }
        if !ok || out.flush().is_err() {
            tracing::warn!("access log write failed");
        }
        pending.fetch_sub(n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_flush_waits_for_them() {
        let path = std::env::temp_dir().join(format!("strait-access-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AccessLog::open(&AccessLogTarget::File(path.clone())).unwrap();
        assert!(log.enabled());
        for i in 0..1000 {
            log.write(format!("{{\"n\":{i}}}"));
        }
        assert!(log.flush(std::time::Duration::from_secs(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count() as u64 + log.dropped(), 1000);
        assert_eq!(text.lines().last(), Some("{\"n\":999}"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn off_writes_nothing_and_flushes_at_once() {
        let log = AccessLog::open(&AccessLogTarget::Off).unwrap();
        assert!(!log.enabled());
        log.write("x".into());
        assert!(log.flush(std::time::Duration::ZERO));
    }
}
