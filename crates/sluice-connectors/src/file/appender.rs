//! Appends records to one file for many concurrent deliveries, several records per write.
//!
//! A thread owns the file. Each delivery hands it a record and waits for the answer; the thread
//! writes everything that arrived while it was busy with one `write_all` (and one `fsync` when
//! asked), then answers every delivery in that write. Idle, a record is written as soon as it
//! arrives; under load, N small writes (each a hop to a blocking thread and a system call)
//! become a few large ones, the same group commit the durable store does. Records never
//! interleave: each is written whole, in the order the deliveries reached the queue.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use sluice_core::{ErrorKind, ProcessError};
use tokio::sync::{mpsc, oneshot};

/// Most records written together.
const MAX_BATCH_RECORDS: usize = 256;
/// A batch stops growing once it holds this many bytes.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Deliveries waiting for the writer beyond this wait for room (backpressure).
const QUEUE: usize = 1024;

struct Request {
    record: Bytes,
    done: oneshot::Sender<Result<(), ProcessError>>,
}

/// The appending side of a `file` sink in `append` mode.
#[derive(Debug)]
pub(super) struct Appender {
    path: PathBuf,
    separator: Vec<u8>,
    fsync: bool,
    /// Started on the first append, so building a flow (`sluice validate`) starts no thread.
    queue: OnceLock<mpsc::Sender<Request>>,
}

impl Appender {
    pub(super) fn new(path: PathBuf, separator: Vec<u8>, fsync: bool) -> Self {
        Appender {
            path,
            separator,
            fsync,
            queue: OnceLock::new(),
        }
    }

    /// Appends `record` followed by the separator; returns once it is written (and synced).
    pub(super) async fn append(&self, record: Bytes) -> Result<(), ProcessError> {
        let queue = match self.queue.get() {
            Some(queue) => queue,
            None => {
                let started = self.start()?;
                self.queue.get_or_init(|| started)
            }
        };
        let (done, answer) = oneshot::channel();
        queue
            .send(Request { record, done })
            .await
            .map_err(|_| self.writer_gone())?;
        answer.await.map_err(|_| self.writer_gone())?
    }

    fn start(&self) -> Result<mpsc::Sender<Request>, ProcessError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            path: self.path.clone(),
            separator: self.separator.clone(),
            fsync: self.fsync,
            file: None,
            buffer: Vec::new(),
        };
        std::thread::Builder::new()
            .name("sluice-file-append".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_error(&self.path, "starting the writer thread for", &e))?;
        Ok(tx)
    }

    fn writer_gone(&self) -> ProcessError {
        ProcessError::new(
            ErrorKind::Internal,
            format!(
                "the writer of `{}` stopped; the message was not written",
                self.path.display()
            ),
        )
    }
}

struct Writer {
    path: PathBuf,
    separator: Vec<u8>,
    fsync: bool,
    /// Opened on first use, dropped after an error so the next batch reopens it.
    file: Option<File>,
    buffer: Vec<u8>,
}

impl Writer {
    /// Writes batches until every sender is gone (the sink was dropped).
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH_RECORDS);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.record.len();
            batch.push(first);
            while batch.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += next.record.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let result = self.write(&batch);
            for request in batch.drain(..) {
                // A delivery that stopped waiting (its task was cancelled) needs no answer.
                let _ = request.done.send(result.clone());
            }
        }
    }

    fn write(&mut self, batch: &[Request]) -> Result<(), ProcessError> {
        self.buffer.clear();
        for request in batch {
            self.buffer.extend_from_slice(&request.record);
            self.buffer.extend_from_slice(&self.separator);
        }
        let file = match self.file.as_mut() {
            Some(file) => file,
            None => self.file.insert(open(&self.path)?),
        };
        let written = file
            .write_all(&self.buffer)
            .and_then(|()| if self.fsync { file.sync_data() } else { Ok(()) });
        // Keep big batches from pinning their memory for the life of the sink.
        if self.buffer.capacity() > MAX_BATCH_BYTES * 2 {
            self.buffer = Vec::new();
        }
        written.map_err(|e| {
            // The handle may be in an unknown state (a partial write); reopen next time.
            self.file = None;
            io_error(&self.path, "appending to", &e)
        })
    }
}

fn open(path: &Path) -> Result<File, ProcessError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, "creating directory", &e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error(path, "opening", &e))
}

pub(super) fn io_error(path: &Path, what: &str, e: &std::io::Error) -> ProcessError {
    ProcessError::new(
        ErrorKind::Io,
        format!("{what} `{}` failed: {e}", path.display()),
    )
}
