//! `trace=FILE`: one JSON object per line for every request the device
//! completes, in completion order:
//!
//! ```text
//! {"seq":1,"op":"read","sector":0,"sectors":8,"status":"ok","us":41}
//! ```
//!
//! `us` is the time the backend below took for the request. Lines are
//! buffered; the buffer is written out at every FLUSH, when the VMM flushes
//! the disk as the VM stops (whatever the reason), when the disk loses power
//! (then the last line is `{"event":"power_cut","seq":N}`, N the next
//! sequence number), when the layer is dropped, and at the first completion
//! a second after the last time.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use addcow::{IoBufs, IoBufsMut};

use crate::virtio::block::backend::{BackendError, DiskBackend, Fate, Op, Served};

/// The buffer is also written out when a request completes this long after
/// the last time, so that even a killed VMM leaves a trace that is at most
/// this old.
const WRITE_OUT_EVERY: Duration = Duration::from_secs(1);

/// A disk that writes a line for every request it completes.
pub struct Trace {
    inner: Box<dyn DiskBackend>,
    log: Mutex<Log>,
}

struct Log {
    /// `None` once writing failed (reported once).
    out: Option<Box<dyn Write + Send>>,
    /// Sequence number of the last line.
    seq: u64,
    /// Backend time spent on the request being served.
    busy: Duration,
    /// When the buffer was last written out.
    written: Instant,
}

impl Trace {
    /// Traces `inner` into `out` (usually a buffered file).
    pub fn new(inner: Box<dyn DiskBackend>, out: Box<dyn Write + Send>) -> Self {
        Trace {
            inner,
            log: Mutex::new(Log {
                out: Some(out),
                seq: 0,
                busy: Duration::ZERO,
                written: Instant::now(),
            }),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one backend call and adds its time to the request's.
    fn timed<T>(&self, call: impl FnOnce(&dyn DiskBackend) -> T) -> T {
        let start = Instant::now();
        let result = call(self.inner.as_ref());
        self.log().busy += start.elapsed();
        result
    }
}

impl Log {
    fn line(&mut self, text: std::fmt::Arguments<'_>) {
        self.seq += 1;
        let seq = self.seq;
        self.emit(|out| writeln!(out, "{{\"seq\":{seq},{text}}}"));
    }

    fn flush(&mut self) {
        self.written = Instant::now();
        self.emit(|out| out.flush());
    }

    fn emit(&mut self, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = write(out.as_mut()) {
                eprintln!("vmm: trace: {e}; tracing stops");
                self.out = None;
            }
        }
    }
}

impl DiskBackend for Trace {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackendError> {
        self.timed(|d| d.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackendError> {
        self.timed(|d| d.write_at(buf, offset))
    }
    fn read_vectored_at(&self, bufs: &mut IoBufsMut<'_>, offset: u64) -> Result<(), BackendError> {
        self.timed(|d| d.read_vectored_at(bufs, offset))
    }
    fn write_vectored_at(&self, bufs: &IoBufs<'_>, offset: u64) -> Result<(), BackendError> {
        self.timed(|d| d.write_vectored_at(bufs, offset))
    }
    fn flush(&self) -> Result<(), BackendError> {
        // The trace first: it must be complete even if the disk fails.
        self.log().flush();
        self.timed(|d| d.flush())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.timed(|d| d.write_zeroes(offset, len, unmap))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.timed(|d| d.discard(offset, len))
    }
    fn discard_alignment(&self) -> u64 {
        self.inner.discard_alignment()
    }
    fn admit(&self, op: Op, offset: u64, len: u64) -> Result<(), BackendError> {
        self.timed(|d| d.admit(op, offset, len))
    }
    fn served(&self, request: &Served) -> Fate {
        let fate = self.inner.served(request);
        let mut log = self.log();
        let us = std::mem::take(&mut log.busy).as_micros();
        if fate == Fate::Lost {
            return fate;
        }
        log.line(format_args!(
            "\"op\":\"{}\",\"sector\":{},\"sectors\":{},\"status\":\"{}\",\"us\":{us}",
            request.op.name(),
            request.sector,
            request.sectors,
            request.status.name(),
        ));
        if fate == Fate::CompletesThenPowerCut {
            log.seq += 1;
            let seq = log.seq;
            log.emit(|out| writeln!(out, "{{\"event\":\"power_cut\",\"seq\":{seq}}}"));
            log.flush();
        } else if log.written.elapsed() >= WRITE_OUT_EVERY {
            log.flush();
        }
        fate
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        self.log().flush();
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::virtio::block::lab::tests::{served, Shared, Sink};

    /// A sink that fails every write.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_per_request_in_order_written_out_at_flush() -> Result<(), BackendError> {
        let (below, mem) = Shared::disk(8192);
        let sink = Sink::default();
        let out = io::BufWriter::with_capacity(1 << 16, sink.clone());
        let disk = Trace::new(below, Box::new(out));
        let mut buf = [0u8; 1024];
        disk.admit(Op::Read, 1024, 1024)?;
        disk.read_at(&mut buf, 1024)?;
        assert_eq!(disk.served(&served(Op::Read, 2, 2, true)), Fate::Completes);
        disk.write_at(&buf, 0)?;
        disk.served(&served(Op::Write, 0, 2, false));
        // Buffered: nothing is out before a flush.
        assert!(sink.lines().is_empty());
        disk.flush()?;
        disk.served(&served(Op::Flush, 0, 0, true));
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(
            "{\"seq\":1,\"op\":\"read\",\"sector\":2,\"sectors\":2,\"status\":\"ok\",\"us\":"
        ));
        assert!(lines[1].starts_with(
            "{\"seq\":2,\"op\":\"write\",\"sector\":0,\"sectors\":2,\"status\":\"ioerr\",\"us\":"
        ));
        // The trace is written out even when the disk's flush fails, and on drop.
        mem.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(disk.flush().is_err());
        assert_eq!(sink.lines().len(), 3);
        disk.served(&served(Op::GetId, 0, 0, true));
        drop(disk);
        let lines = sink.lines();
        assert!(
            lines[3].starts_with("{\"seq\":4,\"op\":\"get_id\""),
            "{lines:?}"
        );
        Ok(())
    }

    #[test]
    fn a_trace_that_cannot_be_written_does_not_stop_the_disk() -> Result<(), BackendError> {
        let (below, _) = Shared::disk(4096);
        let disk = Trace::new(below, Box::new(Broken));
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            disk.read_at(&mut buf, 0)?;
            assert_eq!(disk.served(&served(Op::Read, 0, 1, true)), Fate::Completes);
        }
        disk.flush()?;
        Ok(())
    }
}
